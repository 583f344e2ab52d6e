"""Write data/preference-data.json, the offline preference data set of extras/dpo.py.

One entry per entry of data/instruction-data.json, in its order (so data.split_data holds out the
same entries), in the book's format {instruction, input, output, chosen, rejected}: chosen is the
correct output; rejected is, by a seeded draw, a wrong answer (another entry's answer of the same
task put in its place), a rude refusal, or the correct answer padded with filler. Seeded: running
it rewrites the file byte for byte; `--check` exits 1 if the committed file differs.
"""
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from make_dataset import cli_main, generator_cli, generator_parser  # the same JSON and flags

SEED = 123
SOURCE = Path(__file__).with_name("instruction-data.json")
OUT = Path(__file__).with_name("preference-data.json")

RUDE = ["Figure it out yourself.", "I am not going to answer that.",
        "That is a silly question. Look it up.", "Why would I tell you? Ask someone else.",
        "No. Do your own homework.", "Whatever. I do not care about this."]
OPENINGS = ["Great question! Let me think about this very carefully before I answer.",
            "Thank you so much for asking! This is a really interesting question.",
            "Sure, I would be delighted to help you with this one, step by step."]
CLOSINGS = ["I hope this helps, and please feel free to ask me anything else at any time!",
            "Let me know if you have any other questions, I am always happy to help!",
            "Have a wonderful day, and good luck with all of your future questions!"]


def wrong_answer(entry: dict, others: list[str], rng: random.Random) -> str | None:
    """The output with its answer swapped for another one of the same task, or None if it can't be."""
    answer = entry.get("answer", "")
    candidates = [a for a in others if a != answer and answer not in a and a not in answer]
    if not answer or answer not in entry["output"] or not candidates:
        return None
    head, _, tail = entry["output"].rpartition(answer)  # the last mention: the answer itself
    return head + rng.choice(candidates) + tail


def rude_answer(rng: random.Random) -> str:
    return rng.choice(RUDE)


def padded_answer(entry: dict, rng: random.Random) -> str:
    return f"{rng.choice(OPENINGS)} {entry['output']} {rng.choice(CLOSINGS)}"


def build_entries(source: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    answers = defaultdict(list)  # task -> its answers, each once, in file order
    for entry in source:
        if entry.get("answer") and entry["answer"] not in answers[entry.get("task")]:
            answers[entry.get("task")].append(entry["answer"])
    entries = []
    for entry in source:
        kind = rng.choice(("wrong", "rude", "padded"))
        rejected = wrong_answer(entry, answers[entry.get("task")], rng) if kind == "wrong" else None
        if rejected is None:
            rejected = padded_answer(entry, rng) if kind == "padded" else rude_answer(rng)
        entries.append({"instruction": entry["instruction"], "input": entry["input"],
                        "output": entry["output"], "chosen": entry["output"],
                        "rejected": rejected})
    return entries


def build_parser():
    return generator_parser(__doc__, OUT, "make_preferences.py")


def main(argv: list[str] | None = None) -> int:
    return generator_cli(build_parser(),
                         lambda: build_entries(json.loads(SOURCE.read_text(encoding="utf-8"))),
                         lambda entries: f"{len(entries)} preference pairs", argv)


if __name__ == "__main__":
    cli_main(lambda: sys.exit(main()))
