"""How fast is data/near_duplicates.py on an Alpaca-sized file? 52,000 generated entries, seeded.

The book's script builds the full n x n similarity matrix (~21 GB at 52,002 entries); this runs
data/near_duplicates.py on a generated file of the same size in a child process and reports its
wall time, its peak memory (ru_maxrss of the children), the CPU and the number of pairs.
The text: words of GPT-2's vocabulary in Zipf proportions, each entry on a topic of its own, in
Alpaca's shape (40 % with an input, outputs of 1-8 sentences, lists, a few long ones), and ~3 %
of entries planted as near-copies of an earlier one. `--check N` also compares the pairs among N
random entries with the brute force n x n matrix.
Run: python benchmarks/near_duplicates_52k.py [--entries 52000] [--seed 0] [--check 2000]
"""
import argparse
import collections
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
from data import (ArgumentParser, cli_main, get_tokenizer, non_negative_int,  # noqa: E402
                  positive_int, write_json)
import near_duplicates as nd  # noqa: E402
import tfidf_pairs  # noqa: E402

SHORT_WORDS = "a an as at be by do go he if in is it me my no of on or so to up us we".split()
INSTRUCTIONS = [  # Alpaca-like tasks; {w} is a topic word, {n} a small number
    "Generate a list of {n} {w} ideas for a {w} {w}.", "Explain why {w} {w} is important for {w}.",
    "Rewrite the sentence about {w} {w} in the {w} voice.", "Summarize the text on {w} {w} {w}.",
    "Classify the following {w} as {w} or {w}.", "Write a short story about a {w} {w} and a {w}.",
    "Describe the {w} of a {w} {w} in {n} sentences.", "Give {n} examples of {w} {w} {w}.",
    "Translate the {w} sentence about {w} into {w}.", "Find {n} synonyms of {w} {w} {w}.",
    "What is the difference between {w} {w} and {w}?", "How can I improve my {w} {w} at {w}?",
    "Create a {w} plan for a {w} {w}.", "Edit the {w} sentence to make it more {w} and {w}.",
    "Compare and contrast {w} and {w} {w}.", "Suggest a name for a new {w} {w} {w}.",
    "Identify the main {w} of the {w} {w} below.", "Write a haiku about {w} {w} and {w}.",
    "Explain how {w} {w} {w} {w}.", "Why do {w} {w} {w} {w}?", "{W} {w} {w} {w} {w} {w}.",
]


def english_words() -> list[str]:
    """Real English words from GPT-2's vocabulary (the project's offline tokenizer), most common
    first: its space-led lowercase tokens in merge order, word fragments ("th", "con") left out."""
    enc = get_tokenizer()
    tokens = (enc.decode([i]) for i in range(enc.n_vocab - 1))
    words = [t[1:] for t in tokens if t.startswith(" ") and t[1:].isalpha() and t[1:].islower()]
    return [w for w in words if w in SHORT_WORDS or (len(w) > 2 and set(w) & set("aeiouy"))]


def sentence(rng: random.Random, words: list[str], cum: list[float], topic: list[str], lo: int,
             hi: int) -> str:
    """lo..hi words as one sentence: Zipf-drawn (`cum`: cumulative weights) or, nearly half of
    them, the entry's topic words, as a text keeps to its subject; a comma now and then."""
    chosen = [rng.choice(topic) if rng.random() < 0.45 else rng.choices(words, cum_weights=cum)[0]
              for _ in range(rng.randint(lo, hi))]
    text = " ".join(w + ("," if rng.random() < 0.06 else "") for w in chosen).rstrip(",")
    return text[0].upper() + text[1:] + rng.choice(".....!?")


def make_entry(rng: random.Random, words: list[str], cum: list[float]) -> dict:
    """One entry shaped like Alpaca's: 40 % with an input, outputs of 1-8 sentences or a list,
    now and then a long one, all on a topic of 25 content words."""
    topic = list(dict.fromkeys(rng.choices(words[150:], cum_weights=cum[150:], k=40)))[:25]
    template = rng.choice(INSTRUCTIONS)
    for slot, pick in (("{W}", lambda: rng.choice(topic).title()),
                       ("{w}", lambda: rng.choice(topic)),
                       ("{n}", lambda: str(rng.randint(2, 10)))):
        while slot in template:
            template = template.replace(slot, pick(), 1)
    text_input = sentence(rng, words, cum, topic, 5, 40) if rng.random() < 0.4 else ""
    if rng.random() < 0.15:
        output = "\n".join(f"{k + 1}. {sentence(rng, words, cum, topic, 2, 8)}"
                           for k in range(rng.randint(3, 10)))
    else:
        output = " ".join(sentence(rng, words, cum, topic, 4, 22)
                          for _ in range(rng.randint(1, 30 if rng.random() < 0.05 else 8)))
    return {"instruction": template, "input": text_input, "output": output}


def perturb(rng: random.Random, text: str) -> str:
    """A near-copy: the same text, or with one word dropped, case or punctuation changed."""
    tokens = text.split(" ")
    change = rng.choice(("same", "drop", "case", "punct"))
    if change == "drop" and len(tokens) > 8:
        del tokens[rng.randrange(len(tokens))]
    elif change == "case":
        return text.lower()
    elif change == "punct":
        return text.replace(".", "").replace(",", ";")
    return " ".join(tokens)


def make_entries(n: int, seed: int, planted: float = 0.03) -> list[dict]:
    """n entries; about `planted` of them near-copy an earlier entry in one field or in all."""
    rng = random.Random(seed)
    words = english_words()
    cum = list(itertools.accumulate(1 / (rank + 2.7) for rank in range(len(words))))  # Zipf
    entries = []
    for _ in range(n):
        entry = make_entry(rng, words, cum)
        if entries and rng.random() < planted:
            source = rng.choice(entries)
            for field in rng.choice((("instruction",), ("output",), ("input", "output"),
                                     ("instruction", "input", "output"))):
                entry[field] = perturb(rng, source[field]) if source[field] else ""
        entries.append(entry)
    return entries


def machine() -> str:
    """The CPU as lscpu names it, torch's CPU capability, cores, and the load average: other
    programs on the same cores slow a run down."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return (f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


def run_finder(path: Path) -> tuple[float, float, collections.Counter]:
    """(wall seconds, peak resident MB, pairs per field) of data/near_duplicates.py PATH --json in
    a child process; ru_maxrss of the children is the largest child's, which this one is."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "data" / "near_duplicates.py"), str(path),
                             "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"the finder failed:\n{result.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB on Linux
    return seconds, peak_mb, collections.Counter(json.loads(line)["field"]
                                                 for line in result.stdout.splitlines())


def check_subsample(entries: list[dict], n: int, seed: int, thresholds=(0.9, 0.7)) -> str:
    """The finder's pairs among n random entries against the book's brute force n x n matrix, at
    the default threshold and a lower one (more pairs to get wrong)."""
    sample = random.Random(seed).sample(entries, min(n, len(entries)))
    counts = []
    for threshold in thresholds:
        fast = nd.find_near_duplicates(sample, threshold)
        brute = nd.find_near_duplicates(sample, threshold, search=tfidf_pairs.brute_force_pairs)
        if [(p.field, p.i, p.j) for p in fast] != [(p.field, p.i, p.j) for p in brute] or any(
                abs(a.similarity - b.similarity) > 1e-9 for a, b in zip(fast, brute)):
            raise RuntimeError(f"threshold {threshold}: {len(fast)} pairs, brute force "
                               f"{len(brute)}")
        counts.append(f"{len(fast):,} pairs above {threshold}")
    return f"{len(sample):,}-entry subsample: " + ", ".join(counts) + ", the same as brute force"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="near_duplicates_52k.py")
    p.add_argument("--entries", type=positive_int, default=52_000, help="entries generated")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the generated entries")
    p.add_argument("--check", type=positive_int, metavar="N", help="compare N random entries' "
                   "pairs with brute force")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    entries = make_entries(args.entries, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.json"
        write_json(path, entries)
        print(f"generated {len(entries):,} entries (seed {args.seed}, "
              f"{path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s",
              flush=True)
        seconds, peak_mb, pairs = run_finder(path)
    print(f"finder: {seconds:.1f} s wall, peak memory {peak_mb:,.0f} MB; "
          f"{sum(pairs.values()):,} pairs ("
          + ", ".join(f"{field} {pairs[field]:,}" for field in nd.FIELDS) + ")")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.check:
        print("check: " + check_subsample(entries, args.check, args.seed))


if __name__ == "__main__":
    cli_main(main)
