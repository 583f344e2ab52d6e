"""How well does a fine-tuned model answer new questions? New entries of every rule-made family.

The test split has 2-6 entries a family, so the demo's "every family at least 30 %" flips on one
answer. This draws new entries (default 100 a family) of the families data/make_dataset.py makes by
rule (numbers, lists, letters, words; not its fact tables, whose rows the instruction set already
asks about), none with an (instruction, input) of data/instruction-data.json, answers them with
each model (greedy, cached generation) and prints "answer contained" per family, as evaluate.py
scores it.
Run: python benchmarks/tiny_families.py out/model.pt [other/model.pt ...] [--per-family 100]
"""
import argparse
import collections
import itertools
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import make_dataset as md  # noqa: E402
from data import (ArgumentParser, cli_main, get_tokenizer, input_file, load_data,  # noqa: E402
                  non_negative_int, positive_int)
from evaluate import answer_contained  # noqa: E402
from generate import generate_responses  # noqa: E402
from gpt import load_model  # noqa: E402


def rule_families() -> list[tuple]:
    """make_dataset.FAMILIES without the fact tables (`from_table`): those drawn from endless rules."""
    return [f for f in md.FAMILIES if not f[1].__qualname__.startswith("from_table")]


def new_entries(per_family: int, seed: int, known: list[dict]) -> list[dict]:
    """Up to `per_family` entries of each rule family, none whose (instruction, input) is in `known`
    (compared normalised, as make_dataset does); a family with fewer possible subjects gives fewer."""
    rng = random.Random(seed)
    seen = {md.normalize(e["instruction"] + " " + e.get("input", "")) for e in known}
    entries = []
    for task, make, _, phrasings, input_phrasings in rule_families():
        def capped(r, make=make):  # a small family runs out of new subjects: stop drawing
            return itertools.islice(make(r), 50 * per_family)
        entries += md.build_family(rng, task, capped, per_family, phrasings, input_phrasings, seen)
    return entries


def contained_by_family(responses: list[str], entries: list[dict]) -> dict[str, float]:
    """Share of responses that contain the entry's answer, per family, and over all ("all")."""
    hits: dict[str, list[float]] = {}
    for response, entry in zip(responses, entries, strict=True):
        hits.setdefault(entry["task"], []).append(answer_contained(response, entry["answer"]))
    shares = {task: sum(h) / len(h) for task, h in hits.items()}
    shares["all"] = sum(map(sum, hits.values())) / len(entries)
    return shares


def render(columns: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    """A Markdown table: one row per family, one column per model, percentages."""
    names = list(columns)
    lines = ["| family (new entries) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for task in ["all"] + [t for t in counts if t != "all"]:
        cells = " | ".join(f"{columns[n][task] * 100:.1f}" for n in names)
        lines.append(f"| {task} ({counts[task]}) | {cells} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="tiny_families.py")
    p.add_argument("models", nargs="+", type=input_file,
                   help="fine-tuned model files (train.py's model.pt)")
    p.add_argument("--per-family", type=positive_int, default=100, help="new entries a family")
    p.add_argument("--seed", type=non_negative_int, default=99, help="draws of the new entries")
    p.add_argument("--data", type=input_file, default=str(ROOT / "data" / "instruction-data.json"),
                   help="the instruction set whose entries are left out")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens per response")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    entries = new_entries(args.per_family, args.seed, load_data(args.data))
    counts = {"all": len(entries), **collections.Counter(e["task"] for e in entries)}
    tokenizer, columns = get_tokenizer(), {}
    for path in args.models:  # generate_responses runs in eval and inference mode
        print(f"answering {len(entries)} new entries with {path}", file=sys.stderr, flush=True)
        responses = generate_responses(load_model(path)[0], entries, tokenizer,
                                       max_new_tokens=args.max_new_tokens, batch_size=32)
        columns[str(path)] = contained_by_family(responses, entries)
    print(render(columns, counts))


if __name__ == "__main__":
    cli_main(main)
