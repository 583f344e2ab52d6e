"""HumanEval: the model completes Python functions and each completion runs against the task's
unit tests in the sandbox (evals/sandbox.py); reported as pass@k with the unbiased estimator.

`python evaluate.py humaneval HumanEval.jsonl.gz --model-path M --samples-per-task N`, or
`--samples FILE.jsonl` to score completions written elsewhere (no model needed).
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

from data import (atomic_write_bytes, cli_main, input_file, non_negative_float, non_negative_int,
                  positive_float, positive_int, probability, write_json)
from evals.common import (add_common_args, benchmark_parser, check_outputs, markdown_table,
                          write_results)
from evals.sandbox import Limits, isolation_warning, run_programs

# Codex's stop sequences: the function body ends where top-level code starts again
STOPS = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")


# ---- files -----------------------------------------------------------------------------------
def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a (gzipped) UTF-8 JSONL file ({e.__class__.__name__})") \
            from None
    return rows


def read_problems(path) -> dict[str, dict]:
    """{task_id: problem} from HumanEval.jsonl(.gz); each needs prompt, test and entry_point."""
    problems = {}
    for n, row in read_jsonl(path):
        missing = [k for k in PROBLEM_FIELDS if not isinstance(row.get(k), str)] \
            if isinstance(row, dict) else list(PROBLEM_FIELDS)
        if missing:
            raise ValueError(f"{path}:{n}: a HumanEval problem needs string fields {missing}")
        problems[row["task_id"]] = row
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def read_samples(path, problems: dict) -> list[dict]:
    """{"task_id", "completion"} lines, each naming a problem of the problem file."""
    samples = []
    for n, row in read_jsonl(path):
        if not (isinstance(row, dict) and isinstance(row.get("task_id"), str)
                and isinstance(row.get("completion"), str)):
            raise ValueError(f"{path}:{n}: expected {{\"task_id\": str, \"completion\": str}}")
        if row["task_id"] not in problems:
            raise ValueError(f"{path}:{n}: task_id {row['task_id']!r} is not in the problem file")
        samples.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def write_samples(path, samples: list[dict]) -> None:
    """JSONL (one sample a line, readable by --samples) for *.jsonl, else a JSON list."""
    if str(path).endswith(".jsonl"):
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        atomic_write_bytes(path, text.encode("utf-8"))
    else:
        write_json(path, samples)


# ---- running and scoring ---------------------------------------------------------------------
def build_program(problem: dict, completion: str) -> str:
    """What runs: the prompt, the model's body, the tests, and the call that checks the function."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n samples drawn
    without replacement include a correct one; the product form avoids huge binomials."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def score_samples(samples: list[dict], ks: list[int]) -> dict:
    """pass@k averaged over tasks, for each k no larger than every task's sample count."""
    counts: dict[str, list[int]] = {}
    for s in samples:
        n_c = counts.setdefault(s["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(s["passed"])
    fewest = min(n for n, _ in counts.values())
    scores = {"tasks": len(counts), "samples": len(samples)}
    for k in ks:
        if k <= fewest:
            scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return scores


def execute(problems: dict, samples: list[dict], timeout: float, limits: Limits, workers: int,
            progress: bool) -> list[dict]:
    """Each sample with "passed" and "result" added, its program run in the sandbox."""
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    outcomes = run_programs(programs, timeout, limits, workers, progress)
    return [{**s, "passed": o.passed, "result": o.result} for s, o in zip(samples, outcomes)]


def generate_samples(model, tokenizer, problems: dict, n: int, args) -> list[dict]:
    """n completions per problem, cut at the stop sequences; sampled unless temperature is 0."""
    import torch
    from evals.common import generate_texts
    ids = [tid for tid in problems for _ in range(n)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    texts = generate_texts(model, tokenizer, [problems[t]["prompt"] for t in ids],
                           args.max_new_tokens, args.batch_size, STOPS, not args.quiet,
                           temperature=args.temperature, top_p=args.top_p, generator=generator)
    return [{"task_id": t, "completion": c} for t, c in zip(ids, texts)]


# ---- command line ----------------------------------------------------------------------------
def k_values(text: str) -> list[int]:
    """--k's type: "1,10,100" -> [1, 10, 100]."""
    try:
        return sorted({positive_int(k) for k in text.split(",")})
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1 joined by commas, got "
                                         f"{text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("humaneval", __doc__)
    p.add_argument("problems", type=input_file,
                   help="HumanEval.jsonl.gz (task_id, prompt, test, entry_point)")
    p.add_argument("--samples", type=input_file,
                   help="score this JSONL of {task_id, completion} instead of a model")
    p.add_argument("--samples-per-task", type=positive_int, default=1,
                   help="completions per problem")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0: greedy (one distinct sample); 0.2 for pass@1, 0.8 for pass@100")
    p.add_argument("--top-p", type=probability, default=0.95,
                   help="when sampling, draw from the likeliest tokens whose probabilities add "
                        "up to P only")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="completion length cap, in tokens")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    p.add_argument("--k", type=k_values, default="1,10,100",
                   help="pass@k for these k that are <= the samples per task")
    p.add_argument("--timeout", type=positive_float, default=3.0, help="seconds per program")
    p.add_argument("--memory-mb", type=positive_int, default=1024,
                   help="address space per program, in MiB")
    p.add_argument("--workers", type=positive_int, default=4, help="programs run at once")
    add_common_args(p)
    return p


def parse_args(argv) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.samples and not args.model_path:
        p.error("give --model-path to generate completions, or --samples FILE.jsonl")
    if args.samples_per_task > 1 and args.temperature == 0 and not args.samples:
        print("warning: --temperature 0 is greedy: every sample of a task is the same",
              file=sys.stderr)
    return args


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_outputs(args)  # fail now, not after the generation
    problems = read_problems(args.problems)
    if args.samples:
        samples = read_samples(args.samples, problems)
        if args.limit:  # the first N problems that have samples
            kept = list(dict.fromkeys(s["task_id"] for s in samples))[:args.limit]
            samples = [s for s in samples if s["task_id"] in kept]
        output = args.output or str(Path(args.samples)) + "_results.jsonl"  # as the official tool
    else:
        if args.limit:
            problems = dict(list(problems.items())[:args.limit])
        from evals.common import load_scoring_model
        model, _, tokenizer = load_scoring_model(args.model_path, args.device)
        samples, output = generate_samples(model, tokenizer, problems, args.samples_per_task,
                                           args), args.output
    if (warning := isolation_warning()) and not args.quiet:
        print(warning, file=sys.stderr, flush=True)
    results = execute(problems, samples, args.timeout, Limits(memory_mb=args.memory_mb),
                      args.workers, not args.quiet)
    scores = score_samples(results, args.k)
    rows = [[k, 100 * v] for k, v in scores.items() if k.startswith("pass@")]
    table = (f"HumanEval: {scores['tasks']} tasks, {scores['samples']} samples\n\n"
             + markdown_table(["metric", "%"], rows))
    write_results(args, "HumanEval", table, scores)
    if output:
        write_samples(output, results)
        print(f"per-sample results written to {output}", file=sys.stderr)


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
