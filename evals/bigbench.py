"""BIG-bench JSON tasks (and BIG-Bench Hard, which uses the same file form): multiple_choice_grade
by the log-likelihood of each option (`target_scores` examples), or exact_str_match of the
generated answer (`target` examples), with the task's own prefixes and few-shot examples.

`python evaluate.py bigbench task.json --model-path out/model.pt [--shots 3] [--cot]`.
"""
import argparse
import re
import sys
from pathlib import Path

from data import input_file, non_negative_int
from evals.common import (add_answer_args, add_common_args, benchmark_parser, check_run,
                          check_string_list, continuation_logprobs, field, generate_texts,
                          load_scoring_model, markdown_table, mean_percent, read_json_file,
                          read_predictions_list, styled_prompt, write_results)

# json_task.py's defaults for the fields a task may leave out
DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "few_shot_example_separator": "\n",
            "append_choices_to_input": True, "stop_string": None, "output_regex": None}


# ---- the file ---------------------------------------------------------------------------------
def read_task(path, metric: str = "auto") -> dict:
    """The task: its formatting fields (defaults filled in), name, metric and examples, each
    {input, target: [str], target_scores: {choice: score} or None}. metric "auto" is
    multiple_choice_grade when every example has target_scores, else exact_str_match."""
    raw = read_json_file(path, 'a BIG-bench task {"examples": [{"input", "target" or '
                               '"target_scores"}], ...}')
    task = {k: raw.get(k, v) if isinstance(raw, dict) else v for k, v in DEFAULTS.items()}
    examples = field(raw, "examples", list, str(path))
    if not examples:
        raise ValueError(f"{path}: 'examples' is empty")
    for key, value in task.items():
        if value is not None and not isinstance(value, type(DEFAULTS[key] or "")):
            raise ValueError(f"{path}: '{key}' should be {type(DEFAULTS[key] or '').__name__}")
    if metric == "auto":
        every_mc = all(isinstance(e, dict) and "target_scores" in e for e in examples)
        metric = "multiple_choice_grade" if every_mc else "exact_str_match"
    stem = Path(path).stem  # BIG-bench's <task>/task.json, BBH's <task>.json
    task.update(name=str(raw.get("name") or (Path(path).parent.name if stem == "task" else stem)),
                metric=metric,
                examples=[read_example(e, f"{path}: examples[{i}]", metric)
                          for i, e in enumerate(examples)])
    return task


def read_example(example, where: str, metric: str) -> dict:
    """One example checked for what the metric needs (target_scores, or target)."""
    text = field(example, "input", str, where)
    scores = None
    if metric == "multiple_choice_grade":
        scores = field(example, "target_scores", dict, where)
        if not scores:
            raise ValueError(f"{where}: 'target_scores' is empty")
        for choice, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: target_scores[{choice!r}] should be a number")
    if metric == "exact_str_match" or "target" in example:
        target = field(example, "target", (str, list), where)
        target = check_string_list([target] if isinstance(target, str) else target,
                                   f"{where}.target")
        if not target:
            raise ValueError(f"{where}: 'target' is empty")
    else:  # the best-scored choice, the first of equals, is the answer a few-shot example shows
        target = [max(scores, key=scores.get)]
    return {"input": text, "target": target, "target_scores": scores}


# ---- prompts: json_task.py's layout ------------------------------------------------------------
def format_input(task: dict, example: dict) -> str:
    """input prefix + input (+ the choices when the task appends them) + output prefix.
    The choices come in file order (BIG-bench shuffles them with its own random generator)."""
    text = example["input"]
    if task["metric"] == "multiple_choice_grade" and task["append_choices_to_input"]:
        p = task["choice_prefix"]
        text += p + p.join(example["target_scores"])
    return task["example_input_prefix"] + text + task["example_output_prefix"]


def build_prompt(task: dict, index: int, shots: int, style: str = "raw") -> str:
    """The task prefix, `shots` solved examples (the first ones other than this one; BIG-bench
    draws them at random), then this example, joined by the task's separator."""
    examples = task["examples"]
    solved = [format_input(task, e) + e["target"][0]
              for j, e in enumerate(examples) if j != index][:shots]
    sep = task["few_shot_example_separator"]
    body = sep.join(solved + [format_input(task, examples[index])])
    instruction = task["task_prefix"].strip() or "Complete the last example."
    return styled_prompt(style, instruction, body.strip(), raw=task["task_prefix"] + body)


def with_prompt_options(task: dict, prefix: str | None, cot: bool) -> dict:
    """The task with a prompt file's text before its own prefix (a BIG-Bench Hard cot-prompts
    file loses its header, up to the "-----" line) and, with cot, the answer prefix ending in
    "Let's think step by step.", as BIG-Bench Hard lays out its prompts: the prompt file, a blank
    line, "Q: <input>", then "A: Let's think step by step."."""
    task = dict(task)
    if prefix is not None:
        head, rule, body = prefix.partition("\n-----\n")
        task["task_prefix"] = (body if rule else head).strip("\n") + "\n" + task["task_prefix"]
    if cot:
        task["example_output_prefix"] += "Let's think step by step."
    return task


def check_shots(task: dict, shots: int) -> None:
    if shots < 0 or shots >= len(task["examples"]):
        raise ValueError(f"--shots {shots}: the task has {len(task['examples'])} examples, so "
                         f"0 to {len(task['examples']) - 1} other examples can be shown")


# ---- scores -----------------------------------------------------------------------------------
def extract_answer(text: str, task: dict, cot: bool) -> str:
    """The answer in a completion: cut at the task's stop_string, its output_regex's first match
    (empty if none), with --cot the first line after the last "the answer is" (one final "."
    dropped, as BIG-Bench Hard's answers carry none); then stripped."""
    if task["stop_string"]:
        text = text.split(task["stop_string"])[0]
    if task["output_regex"]:
        found = re.search(task["output_regex"], text)
        text = found[0] if found else ""
    if cot:
        parts = re.split(r"the answer is", text, flags=re.IGNORECASE)
        text = parts[-1].strip().split("\n")[0] if len(parts) > 1 else text
        text = text.strip().removesuffix(".")
    return text.strip()


def grade(task: dict, predictions: list[str], cot: bool = False) -> list[float]:
    """Per example: multiple_choice_grade gives the chosen option's target score (0 for text
    that is no option); exact_str_match 1 when the extracted answer equals a target (both
    stripped)."""
    out = []
    for e, pred in zip(task["examples"], predictions):
        if task["metric"] == "multiple_choice_grade":
            options = {c.strip(): s for c, s in e["target_scores"].items()}
            out.append(float(options.get(pred.strip(), 0.0)))
        else:
            out.append(float(extract_answer(pred, task, cot) in {t.strip() for t in e["target"]}))
    return out


def chance_grade(task: dict) -> float | None:
    """The expected multiple_choice_grade of a uniform random pick, in percent."""
    if task["metric"] != "multiple_choice_grade":
        return None
    return mean_percent(sum(e["target_scores"].values()) / len(e["target_scores"])
                        for e in task["examples"])


# ---- the model --------------------------------------------------------------------------------
def choose_options(model, tokenizer, examples: list[dict], prompts: list[str],
                   batch_size: int, progress: bool) -> list[str]:
    """Each example's option with the highest log p(option | prompt) (the first of equals).
    Prompt and option are tokenised apart, so the option's tokens are the same in every prompt."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    chosen, step = [], max(1, batch_size // 2)
    for first in range(0, len(examples), step):  # a few examples' options per call
        pairs, owners = [], []
        for i in range(first, min(first + step, len(examples))):
            context = ids(prompts[i])
            for option in examples[i]["target_scores"]:
                pairs.append((context, ids(option)))
                owners.append((i, option))
        logps = continuation_logprobs(model, pairs, batch_size)
        for i in range(first, min(first + step, len(examples))):
            mine = [(lp, o) for lp, (j, o) in zip(logps, owners) if j == i]
            chosen.append(max(mine, key=lambda pair: pair[0])[1])  # max keeps the first of equals
        if progress:
            print(f"scored {len(chosen)}/{len(examples)} examples", file=sys.stderr, flush=True)
    return chosen


def predict(args, task: dict, n: int) -> list[str]:
    """The chosen option (multiple choice) or the completion (generative) of the first n
    examples; few-shot examples may come from the whole file."""
    model, _, tokenizer = load_scoring_model(args.model_path, args.device)
    prompts = [build_prompt(task, i, args.shots, args.style) for i in range(n)]
    if task["metric"] == "multiple_choice_grade":
        return choose_options(model, tokenizer, task["examples"][:n], prompts, args.batch_size,
                              not args.quiet)
    stops = [task["stop_string"]] if task["stop_string"] else ["\n\n" if args.cot else "\n"]
    return generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                          stops=stops, progress=not args.quiet)


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("bigbench", __doc__)
    p.add_argument("file", type=input_file,
                   help="a BIG-bench task.json or a BIG-Bench Hard <task>.json")
    p.add_argument("--metric", default="auto",
                   choices=("auto", "multiple_choice_grade", "exact_str_match"),
                   help="auto: multiple_choice_grade if every example has target_scores")
    p.add_argument("--shots", type=non_negative_int, default=0, help="solved examples shown first")
    p.add_argument("--cot", action="store_true",
                   help='chain of thought: the answer prefix ends in "Let\'s think step by step.", '
                        'and the answer is the text after "the answer is"')
    p.add_argument("--prompt-file", type=input_file,
                   help="text put before every prompt, e.g. a BIG-Bench Hard "
                        "cot-prompts/<task>.txt (its header is dropped)")
    add_common_args(p)
    add_answer_args(p, "a JSON list of completions or chosen options, in file order",
                    style="raw", max_new_tokens=32)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_run(args)
    task = read_task(args.file, args.metric)
    check_shots(task, args.shots)
    prefix = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else None
    task = with_prompt_options(task, prefix, args.cot)
    # the shots come from the whole file; --limit only shortens the examples scored
    n = min(len(task["examples"]), args.limit or len(task["examples"]))
    if args.predictions:
        predictions, written = read_predictions_list(args.predictions, n), None
    else:
        predictions = written = predict(args, task, n)
    scored = dict(task, examples=task["examples"][:n])
    grades = grade(scored, predictions, args.cot)
    scores = {"task": task["name"], "metric": task["metric"], "n": n,
              task["metric"]: mean_percent(grades), "chance": chance_grade(scored)}
    row = [task["name"], n, scores[task["metric"]]]
    headers = ["Task", "Examples", task["metric"]]
    if scores["chance"] is not None:
        row, headers = row + [scores["chance"]], headers + ["random guess"]
    write_results(args, f"BIG-bench: {args.file}", markdown_table(headers, [row]), scores, written)


if __name__ == "__main__":
    from data import cli_main
    cli_main(main, debug="--debug" in sys.argv)
