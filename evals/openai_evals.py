"""OpenAI Evals' basic evals on a samples JSONL file ({"input", "ideal"} per line): match (the
completion starts with an ideal answer), includes (an ideal answer appears in it) and fuzzy_match
(normalised containment either way, with token F1), as evals/elsuite/basic/*.py define them.

`python evaluate.py openai-evals samples.jsonl --eval-class match --model-path out/model.pt`.
"""
import argparse
import json
import sys
from pathlib import Path

from data import input_file
from evals.common import (add_answer_args, add_common_args, benchmark_parser, check_run,
                          check_string_list, generate_texts, load_scoring_model, markdown_table,
                          mean_percent, normalize_squad, overlap_f1, read_predictions_list,
                          styled_prompt, write_results)

CLASSES = {"evals.elsuite.basic.match:Match": "match",
           "evals.elsuite.basic.includes:Includes": "includes",
           "evals.elsuite.basic.fuzzy_match:FuzzyMatch": "fuzzy_match"}


# ---- the files --------------------------------------------------------------------------------
def read_samples(path) -> list[dict]:
    """The samples, each {"input": str or [{"role", "content"}], "ideal": [str]}; blank lines
    are skipped; a bad line is named by its number."""
    samples = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected samples JSONL") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}); expected one sample per line") from None
        samples.append(check_sample(sample, where))
    if not samples:
        raise ValueError(f"{path}: no samples (expected one JSON object per line)")
    return samples


def check_sample(sample, where: str) -> dict:
    if not isinstance(sample, dict) or "input" not in sample or "ideal" not in sample:
        raise ValueError(f"{where}: expected an object with 'input' and 'ideal'")
    prompt, ideal = sample["input"], sample["ideal"]
    if not isinstance(prompt, str):
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"{where}: 'input' should be a string or a list of messages")
        for i, msg in enumerate(prompt):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                raise ValueError(f"{where}: input[{i}] should be {{'role': str, 'content': str}}")
    ideal = check_string_list([ideal] if isinstance(ideal, str) else ideal, f"{where}: ideal")
    if not ideal:
        raise ValueError(f"{where}: 'ideal' is an empty list")
    return {"input": prompt, "ideal": ideal}


def parse_registry(text: str) -> dict:
    """The subset of YAML that registry files use: nested `key: value` maps by indentation,
    scalars (quotes removed), [a, b] lists and # comments."""
    root: dict = {}
    stack = [(-1, root)]
    for line in text.splitlines():
        body = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not body.strip():
            continue
        indent, (key, _, value) = len(body) - len(body.lstrip()), body.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        value = value.strip()
        if not value:
            stack[-1][1][key] = child = {}
            stack.append((indent, child))
        elif value.startswith("[") and value.endswith("]"):
            items = value[1:-1].split(",")
            stack[-1][1][key] = [v.strip().strip("'\"") for v in items if v.strip()]
        else:
            stack[-1][1][key] = value.strip("'\"")
    return root


def registry_eval(path, samples_path, name: str | None) -> tuple[str, dict]:
    """(eval class, its args) from a registry YAML: the eval `name` (an alias's `id` followed),
    else the one whose samples_jsonl ends the samples file's path."""
    evals = parse_registry(Path(path).read_text(encoding="utf-8"))
    specs = {k: v for k, v in evals.items() if isinstance(v, dict) and "class" in v}
    if name:
        spec = evals.get(name)
        if isinstance(spec, dict) and "id" in spec:
            spec = evals.get(spec["id"])
        if not isinstance(spec, dict) or "class" not in spec:
            raise ValueError(f"{path}: no eval {name!r} (evals: {', '.join(specs) or 'none'})")
    else:
        wanted = Path(samples_path).resolve().as_posix()
        found = [s for s in specs.values() if isinstance(s.get("args"), dict)
                 and wanted.endswith("/" + str(s["args"].get("samples_jsonl", "")).lstrip("/"))]
        if len(found) != 1:
            raise ValueError(f"{path}: {len(found)} evals read {Path(samples_path).name}; "
                             "name one with --eval")
        spec = found[0]
    if spec["class"] not in CLASSES:
        raise ValueError(f"{path}: eval class {spec['class']} is not one of the basic evals "
                         f"here ({', '.join(CLASSES)})")
    args = spec.get("args", {})
    return CLASSES[spec["class"]], args if isinstance(args, dict) else {}


# ---- the eval classes -------------------------------------------------------------------------
def match(sampled: str, ideal: list[str]) -> float:
    """Match: the stripped completion starts with one of the ideal answers."""
    return float(any(sampled.strip().startswith(i) for i in ideal))


def includes(sampled: str, ideal: list[str], ignore_case: bool = False) -> float:
    """Includes: an ideal answer occurs in the completion (case-blind with ignore_case)."""
    if ignore_case:
        sampled, ideal = sampled.lower(), [i.lower() for i in ideal]
    return float(any(i in sampled for i in ideal))


def fuzzy_match(sampled: str, ideal: list[str]) -> tuple[float, float]:
    """FuzzyMatch: (accuracy, F1). Accuracy: after normalising, either text contains the other
    (an empty text matches only an empty one); F1: the best token F1 over the ideal answers."""
    s = normalize_squad(sampled)

    def contains(i: str) -> bool:
        i = normalize_squad(i)
        return s == i if not s or not i else (s in i or i in s)
    return (float(any(contains(i) for i in ideal)),
            max(overlap_f1(s.split(), normalize_squad(i).split()) for i in ideal))


def score_samples(samples: list[dict], completions: list[str], eval_class: str,
                  ignore_case: bool = False) -> dict:
    """{"accuracy"} in percent (and "f1_score" for fuzzy_match), with "n"."""
    if eval_class == "fuzzy_match":
        pairs = [fuzzy_match(c, s["ideal"]) for s, c in zip(samples, completions)]
        return {"n": len(samples), "accuracy": mean_percent(a for a, _ in pairs),
                "f1_score": mean_percent(f for _, f in pairs)}
    if eval_class == "includes":
        hits = [includes(c, s["ideal"], ignore_case) for s, c in zip(samples, completions)]
    else:
        hits = [match(c, s["ideal"]) for s, c in zip(samples, completions)]
    return {"n": len(samples), "accuracy": mean_percent(hits)}


# ---- the model --------------------------------------------------------------------------------
def chat_to_text(messages, for_completion: bool = True) -> str:
    """A prompt as OpenAI Evals shows one to a completion model: one message as it is; several
    as "Role: content" lines (system unprefixed, example_user/example_assistant as User/Assistant),
    ending in "Assistant: "."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return messages[0]["content"]
    prefixes = {"system": "", "example_user": "User: ", "example_assistant": "Assistant: "}
    text = ""
    for m in messages:
        role = m.get("name", m["role"])
        text += prefixes.get(role, role.capitalize() + ": ") + m["content"] + "\n"
    return (text + ("Assistant: " if for_completion else "")).lstrip()


def predict(args, samples: list[dict]) -> list[str]:
    model, _, tokenizer = load_scoring_model(args.model_path, args.device)
    prompts = [styled_prompt(args.style, chat_to_text(s["input"], False).strip(), "",
                             raw=chat_to_text(s["input"])) for s in samples]
    return generate_texts(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                          stops=["\nUser:", "\n### "], progress=not args.quiet)


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("openai-evals", __doc__)
    p.add_argument("samples", type=input_file,
                   help="samples JSONL as in evals/registry/data/<eval>/")
    p.add_argument("--eval-class", choices=("match", "includes", "fuzzy_match"),
                   help="how completions are scored (default: from --registry, else match)")
    p.add_argument("--registry", type=input_file,
                   help="registry YAML (evals/registry/evals/<eval>.yaml) giving the class and "
                        "its args")
    p.add_argument("--eval", help="which eval of --registry (default: the one reading SAMPLES)")
    p.add_argument("--ignore-case", action="store_true", help="includes: case-blind")
    add_common_args(p)
    add_answer_args(p, "a JSON list of completions, one per sample", max_new_tokens=64)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_run(args)
    eval_class, ignore_case = args.eval_class or "match", args.ignore_case
    if args.registry:
        found, spec_args = registry_eval(args.registry, args.samples, args.eval)
        eval_class = args.eval_class or found
        ignore_case = ignore_case or str(spec_args.get("ignore_case", "")).lower() == "true"
    samples = read_samples(args.samples)[:args.limit]
    if args.predictions:
        completions, written = read_predictions_list(args.predictions, len(samples)), None
    else:
        completions = written = predict(args, samples)
    scores = {"eval_class": eval_class,
              **score_samples(samples, completions, eval_class, ignore_case)}
    headers, row = ["Eval class", "Samples", "Accuracy"], [eval_class, scores["n"],
                                                            scores["accuracy"]]
    if "f1_score" in scores:
        headers, row = headers + ["F1"], row + [scores["f1_score"]]
    write_results(args, f"OpenAI Evals ({eval_class}): {args.samples}",
                  markdown_table(headers, [row]), scores, written)


if __name__ == "__main__":
    from data import cli_main
    cli_main(main, debug="--debug" in sys.argv)
