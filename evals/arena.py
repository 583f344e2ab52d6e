"""The Chatbot Arena in a terminal: two randomly chosen models answer the same prompt as "A" and
"B" with their names hidden, a person (or an LLM judge) votes, and only then are the names shown.
Each vote becomes a line of a battles file that `python evaluate.py ratings` turns into ratings.

Entry points: `model_names`, `read_prompts`, `pick_pair`, `read_vote`, `battle_record`,
`record_battle`, `main` (`python evaluate.py arena A.pt B.pt [C.pt ...] --battles battles.jsonl`).
serve/arena.py puts the same battles on a web page.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from data import (PROMPT_STYLES, ArgumentParser, atomic_write_bytes, input_file, load_data,
                  non_negative_float, non_negative_int, positive_int)
from evals.common import load_scoring_model
from evals.pairwise import connect_judge, judge_pair
from evaluate import JudgeError, add_judge_args
from gpt import DEVICE_HELP, usable_device
from generate import check_writable, generate_responses

VOTES = {"a": "model_a", "b": "model_b", "t": "tie", "x": "tie (bothbad)"}
PREFERENCE_TO_WINNER = {1.0: "model_a", 2.0: "model_b", 1.5: "tie"}  # answer A is output_1


def model_names(paths: list[str], names: list[str] | None, flag: str = "--names") -> list[str]:
    """`names` (the `flag` option) if given, one per model, all different; else the paths."""
    names = names or list(paths)
    if len(names) != len(paths):
        raise ValueError(f"{flag} gives {len(names)} names for {len(paths)} models")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ: {', '.join(names)}")
    return names


def read_prompts(path) -> list[dict]:
    """Entries to answer: a JSON list of instruction entries, or a text file, a prompt a line."""
    if Path(path).suffix == ".json":
        return load_data(str(path), require_output=False)
    with open(path, encoding="utf-8") as f:
        prompts = [{"instruction": line.strip(), "input": ""} for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def pick_pair(rng: random.Random, n: int) -> tuple[int, int]:
    """Two different models, in random order: which one sits on side A is random too."""
    i, j = rng.sample(range(n), 2)
    return i, j


def read_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.strip()


def read_vote() -> str:
    """The user's vote as a battle-log winner; asks again until the answer is a, b, t or x."""
    while True:
        print("Your vote: a = A is better, b = B is better, t = tie, x = both are bad",
              flush=True)
        vote = read_line().lower()
        if vote in VOTES:
            return VOTES[vote]
        print(f"{vote!r} is not a vote", flush=True)


def battle_record(model_a: str, model_b: str, winner: str, entry: dict, answer_a: str,
                  answer_b: str, judge: str = "human") -> dict:
    """One battle in the layout of the Arena's published logs (`anony`: the names were hidden
    while voting), plus what was asked and answered."""
    return {"model_a": model_a, "model_b": model_b, "winner": winner, "judge": judge,
            "anony": True, "tstamp": time.time(), "prompt": entry["instruction"],
            "input": entry.get("input", ""), "answer_a": answer_a, "answer_b": answer_b}


def record_battle(path, record: dict) -> None:
    """Add one battle as a JSON line; the file is rewritten atomically, so a crash leaves the
    old file or the new one, never half a line."""
    old = Path(path).read_bytes() if Path(path).exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + (json.dumps(record, ensure_ascii=False) + "\n").encode())


def show_answers(entry: dict, answer_a: str, answer_b: str) -> None:
    print(f"\n=== Prompt ===\n{entry['instruction']}" +
          (f"\n{entry['input']}" if entry.get("input") else ""))
    print(f"\n=== Model A ===\n{answer_a}\n\n=== Model B ===\n{answer_b}\n", flush=True)


def prompt_stream(args):
    """Entries from --prompts (cycled up to --rounds), or typed by the user until an empty line
    or end of input."""
    if args.prompts:
        prompts = read_prompts(args.prompts)
        for r in range(args.rounds or len(prompts)):
            yield prompts[r % len(prompts)]
        return
    while True:
        print("\nType a prompt (an empty line or Ctrl-D ends):", flush=True)
        try:
            line = read_line()
        except EOFError:
            return
        if not line:
            return
        yield {"instruction": line, "input": ""}


def run_arena(models: list, names: list[str], tokenizer, args, ask=None) -> tuple[int, int]:
    """Battles until the prompts run out; returns (recorded, skipped for want of a verdict)."""
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    recorded = skipped = 0
    for entry in prompt_stream(args):
        i, j = pick_pair(rng, len(models))
        answer_a, answer_b = (generate_responses(
            models[k], [entry], tokenizer, style=args.prompt_style,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            generator=generator if args.temperature > 0 else None)[0] for k in (i, j))
        if ask is None:
            show_answers(entry, answer_a, answer_b)
            try:
                winner = read_vote()
            except EOFError:
                break
            print(f"Model A was {names[i]}; model B was {names[j]}.", flush=True)
        else:
            prompt = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
            preference = judge_pair(ask, prompt, answer_a, answer_b)["preference"]
            if preference is None:
                skipped += 1
                continue
            winner = PREFERENCE_TO_WINNER[preference]
        judge = "human" if ask is None else f"{args.judge}:{args.judge_model}"
        record_battle(args.battles, battle_record(names[i], names[j], winner, entry, answer_a,
                                                  answer_b, judge))
        recorded += 1
        if ask is not None and not args.quiet:
            print(f"\rbattle {recorded + skipped}: {names[i]} vs {names[j]}: {winner}",
                  file=sys.stderr, flush=True)
    return recorded, skipped


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="evaluate.py arena")
    p.add_argument("models", nargs="+", type=input_file,
                   help="two or more model files written by train.py")
    p.add_argument("--names", nargs="+", help="a name per model for the battle log "
                                              "(default: the paths)")
    p.add_argument("--battles", default="battles.jsonl",
                   help="JSON-lines file the votes are added to")
    p.add_argument("--prompts", type=input_file,
                   help="prompts to use instead of typing them: a JSON list of instruction "
                        "entries, or a text file with one a line")
    p.add_argument("--rounds", type=positive_int, help="battles to run with --prompts, cycling "
                                                       "through them (default: each prompt once)")
    add_judge_args(p)
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="alpaca",
                   help="the prompt format the models were trained with")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="answer length limit, in tokens")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0: greedy answers; above 0: sampled")
    p.add_argument("--seed", type=non_negative_int, default=123,
                   help="seed of the pairings and sampling")
    p.add_argument("--device", type=usable_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.models) < 2:
        p.error("the arena needs at least two models")
    if args.judge and not args.prompts:
        p.error("--judge needs --prompts: the judge does not type prompts")
    if args.rounds is not None and not args.prompts:
        p.error("--rounds needs --prompts")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    check_writable(args.battles, "--battles")  # fail now, not at the first vote
    names = model_names(args.models, args.names)
    ask = connect_judge(args) if args.judge else None  # a judge that is down fails here, early
    loaded = [load_scoring_model(path, args.device) for path in args.models]
    models, tokenizer = [m for m, _, _ in loaded], loaded[0][2]
    print(f"{len(models)} models loaded; their names stay hidden until you vote.", flush=True)
    try:
        recorded, skipped = run_arena(models, names, tokenizer, args, ask)
    except JudgeError as e:
        raise JudgeError(f"{e}; the battles so far are kept in {args.battles}") from None
    note = f" ({skipped} skipped: the judge gave no usable verdict)" if skipped else ""
    print(f"{recorded} battles added to {args.battles}{note}; ratings: "
          f"python evaluate.py ratings {args.battles}", flush=True)
