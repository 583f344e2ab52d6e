"""AlpacaEval-style pairwise comparison: an LLM judge picks the better of two answers to the same
instruction, once in each order, and the verdicts become a win rate of model A over model B.

Entry points: `load_outputs`, `pair_outputs`, `judge_pair`, `win_rate`, `summarize`, `main`
(`python evaluate.py pairwise A.json B.json --judge ollama --annotations annotations.json`).
Plain Python; the judge client is evaluate.py's.
"""
import argparse
import collections
import math
import re
import sys
from pathlib import Path
from typing import Callable

from data import ArgumentParser, input_file, write_json
from evaluate import DEFAULT_URLS, JudgeError, add_judge_args, ask_judge, check_judge
from evals.common import check_outputs, markdown_table, read_json_file, write_results
from generate import check_writable

JUDGE_PROMPT = """You are comparing two responses to the same instruction. Choose the response \
that follows the instruction better: the more helpful, correct and relevant one. The order in \
which they are shown and their length do not matter.

## Instruction
{instruction}

## Response A
{output_1}

## Response B
{output_2}

Which response is better? Answer with the single letter A or B."""


# ---- reading model outputs -------------------------------------------------------------------
def load_outputs(path, name: str | None = None) -> list[dict]:
    """AlpacaEval's model_outputs shape, [{"instruction", "output", "generator", "dataset"}], from
    either the book's response file (answer in `model_response`, `input` joined to the
    instruction, `task` as dataset) or an AlpacaEval model_outputs.json (answer in `output`)."""
    data = read_json_file(path, "a response file or AlpacaEval model_outputs.json")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of entries")
    outputs = []
    for i, e in enumerate(data):
        book = isinstance(e, dict) and "model_response" in e
        answer = e.get("model_response" if book else "output") if isinstance(e, dict) else None
        if not isinstance(answer, str) or not isinstance(e.get("instruction"), str):
            raise ValueError(f"{path}: entry {i} needs a string 'instruction' and a string "
                             "'model_response' (book) or 'output' (AlpacaEval)")
        extra = e.get("input") if book else None
        outputs.append({
            "instruction": e["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra
                                               else ""),
            "output": answer,
            "generator": name or str(e.get("generator") or path),
            "dataset": str(e.get("dataset", e.get("task", "-")))})
    return outputs


def pair_outputs(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """(A's entry, B's entry) with the same instruction; a repeated instruction pairs in order."""
    waiting = collections.defaultdict(list)
    for e in b:
        waiting[e["instruction"]].append(e)
    return [(e, waiting[e["instruction"]].pop(0)) for e in a if waiting[e["instruction"]]]


# ---- the judge ---------------------------------------------------------------------------------
def parse_choice(reply: str) -> int | None:
    """1 if the reply picks the first response ("A"), 2 for the second ("B"), None otherwise."""
    bare = reply.strip().strip("*`\"'.:!() \n").strip()
    m = re.fullmatch(r"(?:(?:response|output)\s*)?\(?([ab])\)?", bare, re.IGNORECASE)
    if m:
        return 1 if m[1].lower() == "a" else 2
    named = {x.upper() for x in re.findall(r"\b(?:response|output)\s*\(?([ab])\b", reply,
                                           re.IGNORECASE)}
    return (1 if named == {"A"} else 2) if len(named) == 1 else None  # both named: ambiguous


def ask_choice(ask: Callable[[str], str], instruction: str, first: str, second: str
               ) -> tuple[int | None, str]:
    """(choice, reply) for one order; one retry when the reply names no response."""
    prompt = JUDGE_PROMPT.format(instruction=instruction, output_1=first, output_2=second)
    reply = ask(prompt)
    if parse_choice(reply) is None:
        reply = ask(prompt)
    return parse_choice(reply), reply


def judge_pair(ask: Callable[[str], str], instruction: str, output_1: str, output_2: str) -> dict:
    """AlpacaEval's preference (1: output_1 better, 2: output_2 better, 1.5: tie; None: the judge
    gave no usable answer), judged in both orders: a judge that changes its mind when the
    answers swap places is showing position bias, so a disagreement counts as a tie."""
    if output_1 == output_2:  # nothing to choose between, and no judge call spent on it
        return {"preference": 1.5, "preferences_by_order": [1.5, 1.5], "raw_completion": []}
    shown, reply_1 = ask_choice(ask, instruction, output_1, output_2)
    swapped, reply_2 = ask_choice(ask, instruction, output_2, output_1)
    by_order = [shown, None if swapped is None else 3 - swapped]  # back to output_1/output_2
    if None in by_order:
        preference = None
    else:
        preference = float(by_order[0]) if by_order[0] == by_order[1] else 1.5
    return {"preference": preference, "preferences_by_order": by_order,
            "raw_completion": [reply_1, reply_2]}


def connect_judge(args) -> Callable[[str], str]:
    """Check the judge is up (fail before any work), then return prompt -> reply."""
    url = args.judge_url or DEFAULT_URLS[args.judge]
    check_judge(args.judge, url, args.judge_model, args.judge_timeout)
    return lambda prompt: ask_judge(args.judge, url, args.judge_model, prompt, args.judge_timeout)


# ---- annotations: AlpacaEval's annotations.json records ----------------------------------------
def check_preference(value, where: str) -> float | None:
    """A preference on AlpacaEval's 1..2 scale (its old 0 means a draw); None if not annotated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value == 0 or 1 <= value <= 2):
        raise ValueError(f"{where}: preference {value!r} is not on AlpacaEval's 1..2 scale")
    return 1.5 if value == 0 else float(value)


def load_annotations(path) -> list[dict]:
    """The records of an annotations.json ([] if the file does not exist yet), checked."""
    if not Path(path).exists():
        return []
    data = read_json_file(path, "AlpacaEval annotations (a JSON list)")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of annotations")
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in
                                              ("instruction", "output_1", "output_2")):
            raise ValueError(f"{path}: annotation {i} needs string 'instruction', 'output_1' "
                             "and 'output_2'")
        r["preference"] = check_preference(r.get("preference"), f"{path}: annotation {i}")
    return data


def annotation_key(r: dict) -> tuple:
    return r["instruction"], r["output_1"], r["output_2"]


def annotate(pairs: list[tuple[dict, dict]], records: list[dict], ask, annotator: str,
             save: Callable[[list], None], progress: bool = True) -> list[dict]:
    """One record per (A, B) pair with A as output_2, as AlpacaEval puts the model beside its
    baseline. Pairs already annotated are reused; each new verdict is saved at once, so an
    interrupted run keeps everything judged so far."""
    known = {annotation_key(r): r for r in records if r["preference"] is not None}
    out = []

    def snapshot() -> list[dict]:  # the new verdicts, and every older record not yet replaced
        done = {annotation_key(r) for r in out}
        return out + [r for r in records if annotation_key(r) not in done]
    for n, (a, b) in enumerate(pairs, 1):
        record = {"instruction": a["instruction"], "output_1": b["output"],
                  "generator_1": b["generator"], "output_2": a["output"],
                  "generator_2": a["generator"], "dataset": a["dataset"]}
        if annotation_key(record) in known:
            out.append(dict(known[annotation_key(record)], **record))
            continue
        if ask is None:
            raise ValueError(f"pair {n} ({a['instruction'][:40]!r}...) has no annotation; give "
                             "--judge to annotate it")
        record.update(judge_pair(ask, record["instruction"], record["output_1"],
                                 record["output_2"]), annotator=annotator)
        out.append(record)
        known[annotation_key(record)] = record
        save(snapshot())
        if progress:
            print(f"\rjudged {n}/{len(pairs)} pairs", end="\n" if n == len(pairs) else "",
                  file=sys.stderr, flush=True)
    return out


# ---- win rates ---------------------------------------------------------------------------------
def win_rate(preferences: list) -> dict:
    """AlpacaEval's head-to-head numbers for output_2 over output_1: win rate = mean of
    (preference - 1) x 100 (a tie adds 0.5), its standard error (sample sd / sqrt(n), x 100),
    wins, losses (wins of the baseline), draws; unannotated (None) preferences are left out."""
    d = [(1.5 if p == 0 else p) - 1 for p in preferences if p is not None]
    n = len(d)
    mean = sum(d) / n if n else None
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None
    return {"win_rate": None if mean is None else 100 * mean,
            "standard_error": None if se is None else 100 * se,
            "n_wins": sum(x > 0.5 for x in d), "n_wins_base": sum(x < 0.5 for x in d),
            "n_draws": sum(x == 0.5 for x in d), "n_total": n,
            "n_unannotated": len(preferences) - n}


def summarize(records: list[dict]) -> list[dict]:
    """One summary per (model, baseline), overall and per dataset (task)."""
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        pair = (str(r.get("generator_2", "output_2")), str(r.get("generator_1", "output_1")))
        groups[pair]["all"].append(r["preference"])
        groups[pair][str(r.get("dataset", "-"))].append(r["preference"])
    return [{"model": model, "baseline": base, "overall": win_rate(tasks.pop("all")),
             "tasks": {t: win_rate(p) for t, p in sorted(tasks.items())}}
            for (model, base), tasks in groups.items()]


def render(summaries: list[dict]) -> str:
    rows = []
    for s in summaries:
        parts = [("**all**", s["overall"])]
        parts += list(s["tasks"].items()) if list(s["tasks"]) != ["-"] else []
        for task, w in parts:
            rows.append([s["model"], s["baseline"], task] + [
                "-" if w[k] is None else w[k] for k in ("win_rate", "standard_error")] +
                [w["n_wins"], w["n_wins_base"], w["n_draws"], w["n_total"]])
    table = markdown_table(["Model (A)", "Baseline (B)", "Task", "Win rate", "SE", "Wins",
                            "Losses", "Ties", "N"], rows)
    missing = sum(s["overall"]["n_unannotated"] for s in summaries)
    return table + (f"\n{missing} pairs without a usable verdict are left out (the judge named "
                    "no response; a run with --judge asks again).\n" if missing else "")


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="evaluate.py pairwise")
    p.add_argument("outputs", nargs="*", metavar="FILE", type=input_file,
                   help="A.json B.json: response files (book or AlpacaEval model_outputs shape); "
                        "none: recompute win rates from --annotations alone")
    p.add_argument("--names", nargs=2, metavar=("A", "B"),
                   help="model names for the two files (default: their `generator`, else paths)")
    p.add_argument("--annotations", help="AlpacaEval annotations.json: read (judged pairs are "
                                         "reused) and written after every new verdict; without "
                                         "FILEs, only read: it must exist")
    add_judge_args(p)
    p.add_argument("--json", help="write the win rates here (JSON)")
    p.add_argument("--report", help="append a Markdown section with the table to this file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.outputs) not in (0, 2):
        p.error("give two response files A.json B.json, or none with --annotations")
    if not args.outputs and not args.annotations:
        p.error("give A.json B.json, or --annotations FILE to recompute its win rates")
    if not args.outputs:  # nothing to judge: the annotations are all there is to read
        try:
            input_file(args.annotations)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --annotations: {e}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    check_outputs(args)  # --json, --report: fail now, not after the judging
    if args.annotations and args.outputs:
        check_writable(args.annotations, "--annotations")
    records = load_annotations(args.annotations) if args.annotations else []
    if args.outputs:
        names = args.names or (None, None)
        a, b = (load_outputs(path, name) for path, name in zip(args.outputs, names))
        pairs = pair_outputs(a, b)
        if not pairs:
            raise ValueError(f"{args.outputs[0]} and {args.outputs[1]} share no instruction")
        ask = connect_judge(args) if args.judge else None  # a judge that is down fails here
        if len(pairs) < max(len(a), len(b)) and not args.quiet:
            print(f"{len(pairs)} instructions are in both files ({len(a)} in A, {len(b)} in B)",
                  file=sys.stderr)
        mine = [r for r in records if (r.get("generator_2"), r.get("generator_1")) ==
                (pairs[0][0]["generator"], pairs[0][1]["generator"])]
        others = [r for r in records if r not in mine]  # other comparisons in the same file
        save = (lambda done: write_json(args.annotations, others + done)) if args.annotations \
            else (lambda done: None)
        try:
            records = annotate(pairs, mine, ask, f"{args.judge}:{args.judge_model}", save,
                               progress=not args.quiet)
        except JudgeError as e:
            kept = f"the pairs judged so far are kept in {args.annotations}; run again to go on" \
                if args.annotations else "give --annotations FILE to keep judged pairs"
            raise JudgeError(f"{e}; {kept}") from None
        save(records)
    summaries = summarize(records)
    write_results(args, "Pairwise win rates (AlpacaEval style)", render(summaries), summaries)
