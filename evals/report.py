"""HELM-style report on one model: a row per task with accuracy, calibration (ECE), robustness
(worst of original, typos, lower-case, extra spaces), fairness (worst of original, swapped
gendered words, swapped names) and efficiency (tokens/s, seconds per item, peak memory).

Entry points: `load_task`, `run_reference`, `run_choice`, `evaluate_task`, `main`
(`python evaluate.py report MODEL.pt --tasks instructions mc:quiz.json mmlu:DIR`).
"""
import argparse
import importlib
import math
import random
import resource
import string
import sys
import time
from pathlib import Path

import torch

from data import (PROMPT_STYLES, ArgumentParser, format_input, input_file, load_data,
                  non_negative_int, positive_int, response_header, split_data)
from evals.calibration import expected_calibration_error
from evals.common import (add_common_args, check_outputs, continuation_logprobs, generate_texts,
                          load_scoring_model, markdown_table, read_json_file, write_results)
from evals.perturb import FAIRNESS, ROBUSTNESS
from evaluate import score_entry

EMBEDDED_DATA = Path(__file__).resolve().parents[1] / "data" / "instruction-data.json"
LETTERS = string.ascii_uppercase


# ---- tasks: reference answers (instruction entries) or multiple choice -----------------------
def check_choice_item(item, where: str) -> dict:
    """{"question", "choices": [2..26 strings], "answer": index}; the answer may be a letter."""
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise ValueError(f"{where}: expected an object with a string 'question'")
    choices, answer = item.get("choices"), item.get("answer")
    if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
            and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to 26 strings")
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)]:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or \
            not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be a choice's index or letter, got {answer!r}")
    return dict(item, answer=answer)


def choice_task(path) -> list[dict]:
    data = read_json_file(path, "a JSON list of {question, choices, answer}")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    return [check_choice_item(item, f"{path}: question {i}") for i, item in enumerate(data)]


def mmlu_task(root) -> list[dict]:
    """MMLU's test questions, zero-shot, with MMLU's subject header. The CSV reading comes from
    evals/mmlu.py when it has it (the MMLU benchmark's own file), else from evaluate.py."""
    try:
        source = importlib.import_module("evals.mmlu")
    except ModuleNotFoundError as e:
        if e.name != "evals.mmlu":
            raise
        source = None
    if not (source and hasattr(source, "find_mmlu_subjects") and hasattr(source, "read_mmlu_csv")):
        source = importlib.import_module("evaluate")
    items = []
    for subject, (test, _) in source.find_mmlu_subjects(root).items():
        header = ("The following are multiple choice questions (with answers) about "
                  f"{subject.replace('_', ' ')}.\n\n")
        items += [{"question": q, "choices": choices, "answer": "ABCD".index(letter),
                   "header": header} for q, choices, letter in source.read_mmlu_csv(test)]
    return items


def instruction_choices(entries: list[dict], test: list[dict], seed, n: int = 4) -> list[dict]:
    """The test entries as multiple choice: the right `answer` among up to n - 1 others drawn
    (seeded) from the answers of the same task in the whole file, in a seeded order."""
    by_task = {}
    for e in entries:
        by_task.setdefault(e.get("task", "-"), set()).add(str(e["answer"]))
    items = []
    for i, e in enumerate(test):
        rng = random.Random(f"{seed}:{i}")
        others = sorted(by_task[e.get("task", "-")] - {str(e["answer"])})
        choices = rng.sample(others, min(n - 1, len(others))) + [str(e["answer"])]
        rng.shuffle(choices)
        if len(choices) > 1:
            question = e["instruction"] + (f"\n{e['input']}" if e.get("input") else "")
            items.append({"question": question, "choices": choices,
                          "answer": choices.index(str(e["answer"]))})
    return items


def load_task(spec: str, seed=123) -> tuple[str, str, list[dict]]:
    """(name, kind, items) for a --tasks entry: instructions[:FILE] (the test split of the
    embedded data or FILE), choices[:FILE] (that split as multiple choice, for entries with an
    `answer`), ref:FILE (all entries), mc:FILE, mmlu:DIR."""
    kind, _, arg = spec.partition(":")
    if kind == "instructions":
        return spec, "reference", split_data(load_data(arg or str(EMBEDDED_DATA)))[2]
    if kind == "choices":
        entries = load_data(arg or str(EMBEDDED_DATA))
        if not all("answer" in e for e in entries):
            raise ValueError(f"{arg or EMBEDDED_DATA}: choices needs an 'answer' in every entry")
        return spec, "choice", instruction_choices(entries, split_data(entries)[2], seed)
    if kind == "ref" and arg:
        return f"ref:{Path(arg).stem}", "reference", load_data(arg)
    if kind == "mc" and arg:
        return f"mc:{Path(arg).stem}", "choice", choice_task(arg)
    if kind == "mmlu" and arg:
        return "mmlu", "choice", mmlu_task(arg)
    raise ValueError(f"unknown task {spec!r}; use {TASK_FORMS}")


TASK_FORMS = "instructions[:FILE], choices[:FILE], ref:FILE, mc:FILE or mmlu:DIR"


def task_spec(spec: str) -> str:
    """--tasks' type: one of TASK_FORMS, its FILE a file to read, checked as the flags are read."""
    kind, _, arg = spec.partition(":")
    if kind not in ("instructions", "choices", "ref", "mc", "mmlu") or \
            not arg and kind not in ("instructions", "choices"):
        raise argparse.ArgumentTypeError(f"unknown task {spec!r}; use {TASK_FORMS}")
    return spec if kind == "mmlu" or not arg else f"{kind}:{input_file(arg)}"


# ---- running the model on a task's items --------------------------------------------------------
REFERENCE_METRICS = ("exact_match", "answer_contained", "token_f1", "rouge_l")


def reference_metric(items: list[dict], choice: str = "auto") -> str:
    """`choice`, or for "auto": answer_contained when every entry has a short `answer`,
    ROUGE-L against `output` else."""
    if choice != "auto":
        if choice == "answer_contained" and not all("answer" in e for e in items):
            raise ValueError("--reference-metric answer_contained needs an 'answer' in every entry")
        return choice
    return "answer_contained" if all("answer" in e for e in items) else "rouge_l"


def run_reference(model, tokenizer, items: list[dict], args) -> tuple[list, list, int]:
    """(score per item, no confidences, tokens processed): greedy answers, scored by
    evaluate.py's offline scores."""
    prompts = [format_input(e, args.prompt_style) + response_header(args.prompt_style)
               for e in items]
    texts = [t.strip() for t in generate_texts(model, tokenizer, prompts, args.max_new_tokens,
                                               args.batch_size)]
    metric = reference_metric(items, args.reference_metric)
    scores = [score_entry(dict(e, model_response=t))[metric] for e, t in zip(items, texts)]
    tokens = sum(len(tokenizer.encode(p)) + len(tokenizer.encode(t))
                 for p, t in zip(prompts, texts))
    return scores, [None] * len(items), tokens


def choice_prompt(item: dict) -> str:
    return (item.get("header", "") + item["question"] +
            "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, item["choices"])) +
            "\nAnswer:")


def choice_probabilities(logprobs: list[float]) -> list[float]:
    """Softmax over the options' letters only: the model's belief among the allowed answers."""
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    return [w / sum(weights) for w in weights]


def run_choice(model, tokenizer, items: list[dict], args) -> tuple[list, list, int]:
    """(1/0 per item, top-choice probability per item, tokens processed): the answer is the
    letter (" A", " B", ...) the model finds likeliest after "Answer:"."""
    letter_ids = [tokenizer.encode(f" {letter}") for letter in LETTERS]
    assert all(len(ids) == 1 for ids in letter_ids), "' A' .. ' Z' must be single tokens"
    contexts = [tokenizer.encode(choice_prompt(item)) for item in items]
    pairs = [(ctx, letter_ids[k]) for ctx, item in zip(contexts, items)
             for k in range(len(item["choices"]))]
    logprobs = continuation_logprobs(model, pairs, args.batch_size)
    scores, confidences, at = [], [], 0
    for item in items:
        probs = choice_probabilities(logprobs[at:at + len(item["choices"])])
        at += len(item["choices"])
        pick = max(range(len(probs)), key=probs.__getitem__)
        scores.append(float(pick == item["answer"]))
        confidences.append(probs[pick])
    return scores, confidences, sum(len(ctx) + 1 for ctx, _ in pairs)


# ---- perturbations and the report row ------------------------------------------------------------
def perturb_item(item: dict, kind: str, fn, seed: str, with_reference: bool) -> dict:
    """The item with its input perturbed (instruction and input; question and choices); with
    `with_reference` also the reference answer, for swaps that change what is correct."""
    fields = ["instruction", "input"] if kind == "reference" else ["question"]
    fields += ["output", "answer"] if with_reference and kind == "reference" else []
    out = dict(item)
    for f in fields:
        if isinstance(out.get(f), str):  # fairness swaps: one seed per item, so names match
            out[f] = fn(out[f], seed if with_reference else f"{seed}:{f}")
    if kind == "choice":
        out["choices"] = [fn(c, seed if with_reference else f"{seed}:{k}")
                          for k, c in enumerate(item["choices"])]
    return out


def worst_case(scores: list[float], variants: list[list[float]]) -> list[float]:
    """Per item, the lowest score over the original and every perturbed version."""
    return [min(values) for values in zip(scores, *variants)]


def peak_memory_mb(device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (Linux
    reports it in KiB), which covers everything the process did before too."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate_task(model, tokenizer, name: str, kind: str, items: list[dict], args
                  ) -> tuple[dict, list[dict]]:
    """(the task's report row, per-item predictions). Perturbed versions are run only for the
    items a perturbation changes; the others keep their original score."""
    run = run_reference if kind == "reference" else run_choice
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    scores, confidences, tokens = run(model, tokenizer, items, args)
    seconds = time.perf_counter() - start
    metric = reference_metric(items, args.reference_metric) if kind == "reference" else "accuracy"
    row = {"task": name, "metric": metric,
           "n": len(items), "accuracy": 100 * mean(scores),
           "ece": None if kind == "reference" else
           100 * expected_calibration_error(confidences, scores, bins=10),
           "tokens_per_second": tokens / seconds, "seconds_per_item": seconds / len(items),
           "peak_memory_mb": peak_memory_mb(device), "changed": {}}
    per_item = [{"task": name, "index": i, "score": s, "confidence": c}
                for i, (s, c) in enumerate(zip(scores, confidences))]
    for group, perturbations, with_ref in (("robustness", ROBUSTNESS, False),
                                           ("fairness", FAIRNESS, True)):
        variants = []
        for pname, fn in perturbations.items():
            changed = {i: perturb_item(item, kind, fn, f"{args.seed}:{name}:{i}:{pname}", with_ref)
                       for i, item in enumerate(items)}
            changed = {i: p for i, p in changed.items() if p != items[i]}
            if not args.quiet:
                print(f"report {name}: {pname} changes {len(changed)}/{len(items)} items",
                      file=sys.stderr, flush=True)
            new = run(model, tokenizer, list(changed.values()), args)[0] if changed else []
            variant = list(scores)
            for i, s in zip(changed, new):
                variant[i] = s
            variants.append(variant)
            row["changed"][pname] = len(changed)
            for p, s in zip(per_item, variant):
                p[pname] = s
        row[group] = 100 * mean(worst_case(scores, variants))
    return row, per_item


def render(rows: list[dict]) -> str:
    def num(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f}"
    return markdown_table(
        ["Task", "Metric", "N", "Accuracy", "ECE", "Robustness", "Fairness", "Tokens/s",
         "s/item", "Peak MiB"],
        [[r["task"], r["metric"], r["n"], r["accuracy"], num(r["ece"]), r["robustness"],
          r["fairness"], r["tokens_per_second"],
          num(r["seconds_per_item"], 3), num(r["peak_memory_mb"], 0)] for r in rows])


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="evaluate.py report")
    p.add_argument("model", nargs="?", type=input_file,
                   help="model written by train.py (or --model-path)")
    p.add_argument("--tasks", nargs="+", type=task_spec, default=["instructions"],
                   help="instructions[:FILE] (test split of the embedded data or FILE), "
                        "choices[:FILE] (that split as 4-way multiple choice), ref:FILE (every "
                        "entry), mc:FILE (JSON list of {question, choices, answer}), mmlu:DIR "
                        "(MMLU CSVs, zero-shot)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="answer length limit on reference-answer tasks, in tokens")
    p.add_argument("--reference-metric", choices=("auto",) + REFERENCE_METRICS, default="auto",
                   help="score of reference-answer tasks; auto: answer_contained when every "
                        "entry has an `answer`, else rouge_l")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="alpaca",
                   help="the prompt format the model was trained with")
    p.add_argument("--seed", type=non_negative_int, default=123,
                   help="seed of the perturbations and of the choices task's distractors")
    add_common_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.model = args.model or args.model_path
    if not args.model:
        p.error("give the model file (MODEL.pt or --model-path)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    check_outputs(args)  # fail now, not after the model has run
    tasks = [load_task(spec, args.seed) for spec in args.tasks]  # bad files fail before loading
    model, _, tokenizer = load_scoring_model(args.model, args.device)
    rows, predictions = [], []
    for name, kind, items in tasks:
        row, per_item = evaluate_task(model, tokenizer, name, kind, items[:args.limit], args)
        rows.append(row)
        predictions += per_item
    result = {"model": str(args.model), "tasks": rows,
              "settings": {"seed": args.seed, "limit": args.limit, "prompt_style":
                           args.prompt_style, "max_new_tokens": args.max_new_tokens,
                           "reference_metric": args.reference_metric}}
    write_results(args, f"HELM-style report: {args.model}", render(rows), result, predictions)
