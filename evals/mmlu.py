"""MMLU: four-way multiple choice in the published CSV layout, scored as the MMLU paper's
evaluation does: a few-shot prompt from the subject's dev file ending in "Answer:", and the model's
choice is whichever of " A" .. " D" has the highest next-token logit. Accuracy per subject.

`python evaluate.py mmlu path/to/mmlu --model-path out/model.pt [--shots 5]`.
"""
import argparse
import csv
import sys
from pathlib import Path

import torch

from data import input_file, non_negative_int
from evals.common import (add_common_args, benchmark_parser, check_run, check_string_list,
                          input_folder, load_scoring_model, read_json_file, write_results)

LETTERS = ("A", "B", "C", "D")


def read_mmlu_csv(path: Path) -> list[tuple[str, list[str], str]]:
    """(question, [A, B, C, D], answer letter) rows of one MMLU CSV file (no header row)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if len(row) != 6 or row[5].strip().upper() not in LETTERS:
                    got = f"answer {row[5]!r}" if len(row) == 6 else f"{len(row)} columns"
                    raise ValueError(f"{path}:{reader.line_num}: expected question, A, B, C, D, "
                                     f"answer letter (got {got})")
                rows.append((row[0], row[1:5], row[5].strip().upper()))
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path}: not a UTF-8 CSV file ({e.__class__.__name__})") from None
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


def find_mmlu_subjects(root) -> dict[str, tuple[Path, Path | None]]:
    """{subject: (test csv, dev csv or None)} from DIR/test/*_test.csv or a flat DIR/*_test.csv."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    test_dir = root / "test" if (root / "test").is_dir() else root
    subjects = {}
    for test in sorted(test_dir.glob("*_test.csv")):
        subject = test.name.removesuffix("_test.csv")
        devs = [root / "dev" / f"{subject}_dev.csv", root / f"{subject}_dev.csv"]
        subjects[subject] = (test, next((d for d in devs if d.is_file()), None))
    if not subjects:
        raise FileNotFoundError(f"{root}: no *_test.csv files (in {root}/test or {root})")
    return subjects


def format_question(question: str, choices: list[str], answer: str = "") -> str:
    text = question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices))
    return text + "\nAnswer:" + (f" {answer}\n\n" if answer else "")


def mmlu_prompt_ids(tokenizer, subject: str, shots: list, question: tuple,
                    max_len: int) -> list[int]:
    """Few-shot prompt ending in "Answer:"; too long: drop shots from the end, then crop left."""
    header = ("The following are multiple choice questions (with answers) about "
              f"{subject.replace('_', ' ')}.\n\n")
    for k in range(len(shots), -1, -1):
        shown = "".join(format_question(*shot) for shot in shots[:k])
        ids = tokenizer.encode(header + shown + format_question(*question[:2]))
        if len(ids) <= max_len:
            return ids
    return ids[-max_len:]


def load_mmlu(root, shots: int = 5, limit: int | None = None) -> dict[str, tuple[list, list]]:
    """{subject: (test questions, few-shot examples)}, every file read (and checked) up front."""
    subjects = {}
    for subject, (test, dev) in find_mmlu_subjects(root).items():
        examples = read_mmlu_csv(dev)[:shots] if dev and shots > 0 else []
        subjects[subject] = (read_mmlu_csv(test)[:limit], examples)
    return subjects


@torch.no_grad()
def mmlu_answers(model, tokenizer, subjects: dict, context_length: int,
                 progress: bool = True) -> dict[str, list[str]]:
    """{subject: [the model's letter per question]}: the letter whose token scores highest."""
    letter_ids = [tokenizer.encode(f" {letter}") for letter in LETTERS]
    assert all(len(ids) == 1 for ids in letter_ids), "' A' .. ' D' must be single tokens"
    device = next(model.parameters()).device
    letter_ids = torch.tensor([ids[0] for ids in letter_ids], device=device)
    answers = {}
    for subject, (questions, examples) in subjects.items():
        answers[subject] = []
        for q in questions:
            ids = mmlu_prompt_ids(tokenizer, subject, examples, q, context_length)
            # only the last position's logits matter: (1, C) -> (V,)
            logits = model.out_head(model.hidden(torch.tensor([ids], device=device))[:, -1])[0]
            answers[subject].append(LETTERS[int(logits[letter_ids].argmax())])
        if progress:
            print(f"mmlu {subject}: {len(questions)} questions", file=sys.stderr, flush=True)
    return answers


def mmlu_results(subjects: dict, answers: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """{subject: (correct, total)}; a subject or question without an answer counts as wrong."""
    results = {}
    for subject, (questions, _) in subjects.items():
        given = answers.get(subject, [])
        correct = sum(i < len(given) and given[i] == q[2] for i, q in enumerate(questions))
        results[subject] = (correct, len(questions))
    return results


def render_mmlu(results: dict[str, tuple[int, int]]) -> str:
    """Markdown accuracy per subject; overall counts every question once (micro average)."""
    lines = ["| Subject | Questions | Accuracy |", "|---|---:|---:|"]
    lines += [f"| {s} | {n} | {100 * c / n:.1f} |" for s, (c, n) in results.items()]
    c, n = sum(c for c, _ in results.values()), sum(n for _, n in results.values())
    return "\n".join(lines + [f"| **overall** | {n} | {100 * c / n:.1f} |"]) + "\n"


def mmlu_scores(results: dict[str, tuple[int, int]]) -> dict:
    """Accuracy in percent overall (micro average) and per subject, for --json."""
    c, n = sum(c for c, _ in results.values()), sum(n for _, n in results.values())
    return {"accuracy": 100 * c / n, "n": n,
            "subjects": {s: {"accuracy": 100 * c / n, "n": n} for s, (c, n) in results.items()}}


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = benchmark_parser("mmlu", __doc__)
    p.add_argument("dir", type=input_folder,
                   help="MMLU folder: DIR/test/*_test.csv, optional DIR/dev/*_dev.csv")
    p.add_argument("--shots", type=non_negative_int, default=5,
                   help="few-shot examples from the dev file")
    p.add_argument("--predictions", type=input_file,
                   help="score this {subject: [letter per question]} JSON (what --output "
                        "writes) instead of running a model")
    add_common_args(p)
    return p


def read_mmlu_predictions(path) -> dict[str, list[str]]:
    """{subject: [letters]} as --output writes it; a missing letter counts as wrong."""
    preds = read_json_file(path, "a {subject: [letters]} JSON object")
    if not isinstance(preds, dict):
        raise ValueError(f"{path}: expected a {{subject: [letters]}} JSON object")
    for subject, letters in preds.items():
        check_string_list(letters, f"{path}: {subject}")
    return preds


def main(argv=None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_run(args)
    subjects = load_mmlu(args.dir, args.shots, args.limit)
    if args.predictions:
        answers, written = read_mmlu_predictions(args.predictions), None
    else:
        model, cfg, tokenizer = load_scoring_model(args.model_path, args.device)
        answers = written = mmlu_answers(model, tokenizer, subjects, cfg["context_length"],
                                         not args.quiet)
    results = mmlu_results(subjects, answers)
    write_results(args, f"MMLU: {args.dir}", render_mmlu(results), mmlu_scores(results), written)


if __name__ == "__main__":
    from data import cli_main
    cli_main(main, debug="--debug" in sys.argv)
