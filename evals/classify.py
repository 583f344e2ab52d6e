"""Classification by log-likelihood, shared by GLUE and SuperGLUE: each example becomes a prompt
and a few candidate continuations (label words), and the model's answer is the most likely one,
as lm-evaluation-harness scores them. Entry points: `Item`, `Task`, `option_scores`,
`evaluate_task`, and `main`, the command line both benchmarks use.
"""
import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data import non_negative_int
from evals.common import (add_common_args, benchmark_parser, check_outputs, continuation_logprobs,
                          input_folder, load_scoring_model, markdown_table, write_results)
from evals.metrics import accuracy, f1_score, macro_f1, matthews_corrcoef, pearson, spearman


@dataclass
class Item:
    context: str             # the prompt, ending where the label word goes ("...\nAnswer:")
    options: list[str]       # candidate continuations (" no", " yes"), scored after the context
    answer: int | float      # index of the right option; STS-B: the gold similarity 0..5
    group: str | None = None  # MultiRC: the items answering one question (for exact match)

    def gold_text(self) -> str:
        """The right continuation, as shown in a few-shot example (STS-B: the nearest score)."""
        return self.options[int(round(self.answer))]


@dataclass
class Task:
    name: str                 # as Hugging Face's config names it: "sst2", "boolq", ...
    folder: str               # the task's folder as downloaded: "SST-2", "BoolQ", ...
    files: dict[str, str]     # split -> file in that folder
    read: Callable[[Path], list[Item]]
    labels: list              # option i's label as the file writes it (what --output lists)
    metrics: tuple[str, ...]  # reported metrics; the task's score is their mean


def label_index(labels: list, raw, where: str) -> int:
    """Which option a file's label names (labels compared as given and as text)."""
    for i, label in enumerate(labels):
        if type(raw) is type(label) and raw == label or str(label) == str(raw):
            return i
    raise ValueError(f"{where}: label {raw!r} is not one of {labels}")


# ---- scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def next_token_logprobs(model, contexts: list[list[int]], option_ids: list[list[int]],
                        batch_size: int = 16) -> list[list[float]]:
    """log p(token | context) for each row's single-token options, one forward pass per context.

    Rows are sorted by length and right-padded (padding after the last real token cannot change
    it under causal attention); only the last real position goes through the output head.
    """
    device = next(model.parameters()).device
    n_ctx = model.cfg["context_length"]
    rows = [c[-n_ctx:] or [50256] for c in contexts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        width = max(len(rows[i]) for i in batch)
        idx = torch.tensor([rows[i] + [0] * (width - len(rows[i])) for i in batch], device=device)
        last = torch.tensor([len(rows[i]) - 1 for i in batch], device=device)
        hidden = model.hidden(idx)[torch.arange(len(batch), device=device), last]  # (B, C)
        logp = model.out_head(hidden).float().log_softmax(dim=-1)  # (B, V)
        for r, i in enumerate(batch):
            out[i] = logp[r, option_ids[i]].tolist()
    return out


def option_scores(model, tokenizer, items: list[Item], prefix: str = "", batch_size: int = 16,
                  length_norm: bool = False) -> list[list[float]]:
    """Summed log-likelihood of each item's options after prefix + context.

    Single-token options all come from one forward pass per item; longer ones are scored pair by
    pair. length_norm divides by the option's length in characters without the space that
    separates it from the context, as lm-evaluation-harness's acc_norm does (len("no"), not
    len(" no")).
    """
    contexts = [tokenizer.encode(prefix + it.context) for it in items]
    options = [[tokenizer.encode(o) for o in it.options] for it in items]
    if all(len(o) == 1 for opts in options for o in opts):
        scores = next_token_logprobs(model, contexts, [[o[0] for o in opts] for opts in options],
                                     batch_size)
    else:
        flat = continuation_logprobs(model, [(c, o) for c, opts in zip(contexts, options)
                                             for o in opts], batch_size)
        scores, at = [], 0
        for opts in options:
            scores.append(flat[at:at + len(opts)])
            at += len(opts)
    if length_norm:
        scores = [[s / max(len(o.removeprefix(" ")), 1) for s, o in zip(row, it.options)]
                  for row, it in zip(scores, items)]
    return scores


def expected_value(logps: list[float]) -> float:
    """Sum of i * p(i) over options 0..n-1, p renormalised over the options (STS-B's score)."""
    top = max(logps)
    weights = [math.exp(v - top) for v in logps]
    return sum(i * w for i, w in enumerate(weights)) / sum(weights)


def compute_metrics(task: Task, items: list[Item], preds: list) -> dict[str, float]:
    """Each of the task's metrics, as a percentage (correlations times 100)."""
    gold = [it.answer for it in items]
    groups: dict[str, bool] = {}
    for it, p in zip(items, preds):  # MultiRC exact match: every answer of a question right
        groups[it.group] = groups.get(it.group, True) and p == it.answer
    known = {"acc": lambda: accuracy(preds, gold), "f1": lambda: f1_score(preds, gold),
             "f1a": lambda: f1_score(preds, gold), "mcc": lambda: matthews_corrcoef(preds, gold),
             "macro_f1": lambda: macro_f1(preds, gold, list(range(len(task.labels)))),
             "em": lambda: sum(groups.values()) / len(groups),
             "pearson": lambda: pearson(preds, gold), "spearman": lambda: spearman(preds, gold)}
    return {m: 100 * known[m]() for m in task.metrics}


def task_score(task: Task, metrics: dict[str, float]) -> float:
    """A task's single number: the mean of its metrics (as the GLUE leaderboard averages them)."""
    return sum(metrics[m] for m in task.metrics) / len(task.metrics)


def majority(task: Task, items: list[Item]) -> list:
    """The baseline that always answers the most frequent gold label (STS-B: a constant score,
    which correlates with nothing)."""
    if task.metrics == ("pearson", "spearman"):
        return [0.0] * len(items)
    answers = [it.answer for it in items]
    return [max(set(answers), key=answers.count)] * len(items)


# ---- one task --------------------------------------------------------------------------------
def few_shot_prefix(train: list[Item], shots: int, seed: int) -> str:
    """`shots` solved examples drawn from the train items, each followed by a blank line."""
    if shots > len(train):
        raise ValueError(f"--shots {shots} but the train file has only {len(train)} examples")
    chosen = random.Random(seed).sample(train, shots)
    return "".join(it.context + it.gold_text() + "\n\n" for it in chosen)


def task_file(task: Task, root: Path, split: str) -> Path:
    """root/<Folder>/<file> when root holds the task's folder, else root/<file>."""
    folder = root / task.folder if (root / task.folder).is_dir() else root
    path = folder / task.files[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the {task.name} {split} split)")
    return path


def load_task(task: Task, root: Path, args) -> tuple[list[Item], str]:
    """(the items scored, the few-shot prefix) for one task; read before the model loads, so a
    bad file fails at once."""
    items = task.read(task_file(task, root, args.split))[:args.limit]
    prefix = few_shot_prefix(task.read(task_file(task, root, "train")), args.shots, args.seed) \
        if args.shots else ""
    return items, prefix


def evaluate_task(model, tokenizer, task: Task, items: list[Item], prefix: str,
                  args) -> tuple[list, dict]:
    """(predicted labels in file order, {"n", metrics..., "score"}) for one task."""
    start = time.perf_counter()
    scores = option_scores(model, tokenizer, items, prefix, args.batch_size, args.length_norm)
    if task.metrics == ("pearson", "spearman"):
        preds = [expected_value(s) for s in scores]
        shown = [round(p, 4) for p in preds]
    else:
        preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
        shown = [task.labels[p] for p in preds]
    result = {"n": len(items), **compute_metrics(task, items, preds)}
    result["score"] = task_score(task, result)
    result["majority"] = task_score(task, compute_metrics(task, items, majority(task, items)))
    if not args.quiet:
        print(f"{task.name}: {len(items)} examples, score {result['score']:.1f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return shown, result


# ---- command line (GLUE and SuperGLUE alike) -------------------------------------------------
def pick_tasks(tasks: dict[str, Task], names: str, root: Path) -> list[Task]:
    """Tasks named "a,b", or "all" for every task whose folder is in root."""
    if names == "all":
        found = [t for t in tasks.values() if (root / t.folder).is_dir()]
        if not found:
            raise FileNotFoundError(f"{root}: holds none of the folders "
                                    f"{[t.folder for t in tasks.values()]}")
        return found
    unknown = [n for n in names.split(",") if n not in tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(tasks)} or all")
    return [tasks[n] for n in names.split(",")]


def build_parser(benchmark: str, tasks: dict[str, Task], doc: str) -> argparse.ArgumentParser:
    """The parser of `evaluate.py glue` or `superglue`, described by `doc`, its file's docstring."""
    p = benchmark_parser(benchmark.lower(), doc)
    p.add_argument("task", help=f"{', '.join(tasks)}; several joined by commas, or all")
    folders = "/, ".join(dict.fromkeys(t.folder for t in tasks.values()))
    p.add_argument("dir", type=input_folder, help=f"the task's folder as downloaded ({folders}/), "
                                                  f"or the folder holding the task folders")
    p.add_argument("--split", default="dev", choices=("dev", "train"), help="examples scored")
    p.add_argument("--shots", type=non_negative_int, default=0,
                   help="solved examples from the train file put before each prompt")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="which train examples are the shots")
    p.add_argument("--length-norm", action="store_true",
                   help="divide each option's log-likelihood by its length in characters, the "
                        "space before it not counted (lm-evaluation-harness's acc_norm)")
    add_common_args(p, model_required=True)
    return p


def parse_args(benchmark: str, tasks: dict[str, Task], doc: str, argv) -> argparse.Namespace:
    p = build_parser(benchmark, tasks, doc)
    args = p.parse_args(argv)
    if args.shots and args.split == "train":
        p.error("--shots with --split train would show the model answers it is scored on")
    return args


def main(benchmark: str, tasks: dict[str, Task], doc: str, argv) -> None:
    """Run the tasks asked for and report each task's metrics and their average."""
    args = parse_args(benchmark, tasks, doc, argv)
    check_outputs(args)  # fail now, not after the scoring
    root = Path(args.dir)
    chosen = pick_tasks(tasks, args.task, root)
    loaded = [load_task(task, root, args) for task in chosen]
    model, _, tokenizer = load_scoring_model(args.model_path, args.device)
    preds, results = {}, {}
    for task, (items, prefix) in zip(chosen, loaded):
        preds[task.name], results[task.name] = evaluate_task(model, tokenizer, task, items,
                                                             prefix, args)
    average = sum(r["score"] for r in results.values()) / len(results)
    rows = [[name, r["n"], ", ".join(f"{m} {r[m]:.1f}" for m in tasks[name].metrics), r["score"],
             r["majority"]] for name, r in results.items()]
    rows.append([f"{benchmark} average", sum(r["n"] for r in results.values()), "", average,
                 sum(r["majority"] for r in results.values()) / len(results)])
    table = markdown_table(["task", "n", "metrics (%)", "score", "majority class"], rows)
    scores = {"tasks": results, "average": average, "split": args.split, "shots": args.shots}
    write_results(args, f"{benchmark} ({args.split}, {args.shots}-shot)", table, scores,
                  preds[chosen[0].name] if len(chosen) == 1 else preds)
