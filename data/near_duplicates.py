"""Near-duplicates and train/test leaks in an instruction data set, by the book's measure.

Per field (instruction, input, output): cosine similarity of character 1-3-gram TF-IDF vectors of
the lowercased text without punctuation, above a threshold (default 0.9), as the book's
ch07/02_dataset-utilities/find-near-duplicates.py; exact at any size (data/tfidf_pairs.py).
Entry points: `find_near_duplicates`, `cross_part_pairs`, `remove_near_duplicates`, `find_leaks`.
Run: python data/near_duplicates.py FILE [--threshold 0.9] [--json] [--split] [--remove OUT]
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the core's data.py, tfidf_pairs.py beside this file
from data import (ArgumentParser, cli_main, input_file, load_data, probability,  # noqa: E402
                  split_data, write_json)
try:  # numpy is this tool's own dependency: the rest of the project runs without it
    from tfidf_pairs import preprocess_text, similar_pairs, tfidf_matrix  # noqa: E402
except ModuleNotFoundError as e:
    if e.name != "numpy":
        raise
    preprocess_text = similar_pairs = tfidf_matrix = None
NEEDS_NUMPY = "data/near_duplicates.py needs numpy: pip install numpy"

FIELDS = ("instruction", "input", "output")
REMOVED_BY = ("input", "output")  # the book removes for these fields' pairs, not instruction's
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Pair:
    """Entries i < j (0-based, in file order) whose `field` texts are near-duplicates."""
    field: str
    i: int
    j: int
    similarity: float


@dataclass(frozen=True)
class Leak:
    """Test entry `test_index` near-copies training entry `train_index` in every field;
    `similarity` per field (1.0 for two empty inputs)."""
    test_index: int
    train_index: int
    similarity: dict[str, float]


class Progress:
    """Progress of one field on stderr: a line at most every few seconds, none for a quick field.
    `stage(name)` is the callback for one step (TF-IDF, the pair search); they share the clock."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self.start = self.shown = time.monotonic()

    def stage(self, name: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if not self.quiet and now - self.shown >= PROGRESS_EVERY_S:
                print(f"{self.label}: {name} {done:,}/{total:,} ({100 * done / total:.0f} %), "
                      f"{now - self.start:.0f} s", file=sys.stderr, flush=True)
                self.shown = now
        return report


def field_pairs(entries: list[dict], field: str, threshold: float = 0.9,
                progress: Progress | None = None, search: Callable | None = None) -> list[Pair]:
    """Near-duplicate pairs of one field, with the book's rules: entries whose field is empty
    (or missing) take no part, not even in the idf (the book fits TF-IDF on the non-empty texts
    only); a pair counts if its similarity is above `threshold`, unless either text is one
    character or less before preprocessing. i, j index `entries` (the book indexes the entries
    with positions in its filtered list instead, which names the wrong entries once one is
    empty; this follows what it means). `search`: brute_force_pairs checks similar_pairs."""
    if tfidf_matrix is None:
        raise OSError(NEEDS_NUMPY)
    where = [k for k, entry in enumerate(entries) if entry.get(field, "")]
    texts = [entries[k][field] for k in where]
    if not texts:
        return []
    stage = progress.stage if progress else lambda name: None
    matrix = tfidf_matrix([preprocess_text(t) for t in texts], stage("TF-IDF, texts"))
    i, j, sims = (search or similar_pairs)(matrix, threshold, progress=stage("pairs, rows"))
    return [Pair(field, where[a], where[b], round(float(s), 12))
            for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist())
            if len(texts[a]) > 1 and len(texts[b]) > 1]


def find_near_duplicates(entries: list[dict], threshold: float = 0.9, fields=FIELDS,
                         quiet: bool = True, search: Callable | None = None) -> list[Pair]:
    """Every field's near-duplicate pairs, field by field in `fields` order, then by i and j."""
    return [pair for field in fields
            for pair in field_pairs(entries, field, threshold, Progress(field, quiet), search)]


# ---- parts: the split train.py makes ------------------------------------------------------------
def part_names(n: int) -> list[str]:
    """The part of each of n entries under data.split_data (first 85 % train, next 10 % test,
    the rest validation); ValueError where n is too small to split."""
    train, val, test = split_data(list(range(n)))
    return ["train"] * len(train) + ["test"] * len(test) + ["validation"] * len(val)


LABELS = {("train", "test"): "train/test", ("train", "validation"): "train/validation",
          ("test", "validation"): "validation/test"}  # i < j: train comes first, then test


def cross_part_pairs(pairs: list[Pair], parts: list[str]) -> list[tuple[Pair, str]]:
    """The pairs whose two entries fall in different parts (leaks), with their label."""
    return [(p, LABELS[parts[p.i], parts[p.j]]) for p in pairs if parts[p.i] != parts[p.j]]


# ---- removal: the book's --remove_duplicates ----------------------------------------------------
def remove_near_duplicates(entries: list[dict], threshold: float = 0.9,
                           known: list[Pair] | None = None,
                           quiet: bool = True) -> tuple[list[dict], list[int]]:
    """(kept entries, indices of the removed ones) by the book's rule: field by field, input then
    output, the second entry j of every pair is dropped, and the next field is searched among
    the entries still kept (TF-IDF refitted on them, as the book replaces its list). Instruction
    pairs remove nothing. `known`: pairs already found on all of `entries`, reused where valid."""
    alive = list(range(len(entries)))
    for field in REMOVED_BY:
        if known is not None and len(alive) == len(entries):
            pairs = [p for p in known if p.field == field]  # nothing dropped yet: same search
        else:
            pairs = field_pairs([entries[k] for k in alive], field, threshold,
                                Progress(field, quiet))
        drop = {p.j for p in pairs}
        alive = [k for position, k in enumerate(alive) if position not in drop]
    kept = set(alive)
    return [entries[k] for k in alive], [k for k in range(len(entries)) if k not in kept]


# ---- leaks: for the trainer ---------------------------------------------------------------------
def find_leaks(train_entries: list[dict], test_entries: list[dict],
               threshold: float = 0.9) -> list[Leak]:
    """Test entries that near-copy a training entry: instruction and output near-duplicates by
    the book's measure (TF-IDF fitted on train + test together, as if one file), and inputs too,
    or both empty (or equal after preprocessing, which the book's one-character rule skips).
    One Leak per such test entry, naming the training entry with the highest least similarity
    over the fields; sorted by test_index; [] when there are none. 0.4 s for the 1,137 entries of
    data/instruction-data.json on 2 cores; the time grows as (len(train) + len(test)) ** 2."""
    both, n = train_entries + test_entries, len(train_entries)
    found = {}
    for field in FIELDS:
        found[field] = {(p.i, p.j - n): p.similarity for p in field_pairs(both, field, threshold)
                        if p.i < n <= p.j}
    best = {}
    for (a, b), s_instruction in found["instruction"].items():
        if (a, b) not in found["output"]:
            continue
        text_a, text_b = (preprocess_text(e.get("input", "")) for e in (both[a], both[n + b]))
        s_input = 1.0 if text_a == text_b else found["input"].get((a, b))
        if s_input is None:
            continue
        sims = {"instruction": s_instruction, "input": s_input, "output": found["output"][(a, b)]}
        if b not in best or min(sims.values()) > min(best[b].similarity.values()):
            best[b] = Leak(b, a, sims)
    return [best[b] for b in sorted(best)]


# ---- the report ---------------------------------------------------------------------------------
def short(text: str, width: int = 40) -> str:
    """At most `width` characters on one line: whitespace runs as one space, an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def pair_line(pair: Pair, entries: list[dict], label: str | None) -> str:
    texts = (short(entries[k].get(pair.field, "")) for k in (pair.i, pair.j))
    where = f"[{label}] " if label else ""
    return (f"{where}{pair.field} {pair.i} {pair.j} {pair.similarity:.4f}  "
            + "  |  ".join(json.dumps(t, ensure_ascii=False) for t in texts))


def json_line(pair: Pair, label: str | None) -> str:
    record = {"field": pair.field, "i": pair.i, "j": pair.j, "similarity": pair.similarity}
    return json.dumps(record | ({"parts": label} if label else {}))


def summary(rows: list[tuple[Pair, str | None]], n: int, threshold: float, split: bool) -> str:
    """The count line: per field, and with --split per label."""
    per_field = ", ".join(f"{f} {sum(p.field == f for p, _ in rows)}" for f in FIELDS)
    what = "leaks (pairs across parts)" if split else "near-duplicate pairs"
    line = f"{len(rows):,} {what} with similarity above {threshold:g}: {per_field} ({n:,} entries)"
    if split:
        line += "; " + ", ".join(f"{label} {sum(x == label for _, x in rows)}"
                                 for label in LABELS.values())
    return line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="near_duplicates.py")
    p.add_argument("file", type=input_file,
                   help="a JSON list of entries (data.load_data checks it)")
    p.add_argument("--threshold", type=probability, default=0.9,
                   help="pairs with similarity above this, in (0, 1]; 1.0: identical after "
                        "preprocessing (default %(default)s, as the book's command)")
    p.add_argument("--json", action="store_true", help="one JSON object a line per pair")
    p.add_argument("--split", action="store_true",
                   help="only pairs across train/test/validation as data.split_data splits")
    p.add_argument("--remove", metavar="OUT", type=Path,
                   help="write the entries without input/output near-duplicates (the book's "
                        "rule) to OUT, atomically; OUT may be FILE itself, given explicitly")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.split and args.remove:
        p.error("--split reports leaks, --remove removes within the file; use one at a time")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if tfidf_matrix is None:  # said before any work
        raise OSError(NEEDS_NUMPY)
    entries = load_data(args.file)
    parts = part_names(len(entries)) if args.split else None
    if args.remove and (args.remove.is_dir() or not args.remove.parent.is_dir()):
        raise OSError(f"cannot write {args.remove}: not a file in an existing folder")
    pairs = find_near_duplicates(entries, args.threshold, quiet=args.quiet)
    rows = cross_part_pairs(pairs, parts) if parts else [(p, None) for p in pairs]
    for pair, label in rows:
        print(json_line(pair, label) if args.json else pair_line(pair, entries, label))
    if not args.json:
        print(summary(rows, len(entries), args.threshold, args.split))
    if args.remove:
        kept, removed = remove_near_duplicates(entries, args.threshold, pairs, args.quiet)
        write_json(args.remove, kept)
        print(f"removed {len(removed):,} entries (the second of each input or output pair), "
              f"wrote {len(kept):,} to {args.remove}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    cli_main(main)
