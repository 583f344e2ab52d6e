"""Write data/instruction-data.json, the default offline instruction data set of train.py.

About 1,140 short entries in 28 task families: rules a small model can learn (plurals, sorting, sums,
...) and facts from small hand-written tables (capitals, antonyms, ...; in words.py, with the rules
that inflect words). Seeded: running it rewrites the file byte for byte; `--check` exits 1 if the
committed file differs. data.py loads it (and gives it its command line).
"""
import argparse
import functools
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the core (data.py) and words.py, beside this file
from data import ArgumentParser, cli_main  # noqa: E402
from words import (ADJECTIVES, ANIMAL_SOUNDS, ANTONYMS, BABY_ANIMALS, CAPITALS, CATEGORIES,  # noqa: E402
                   COLOURS, DAYS, ENDINGS, LANGUAGES, MONTHS, NOUNS, OBJECTS, PAST_VERBS, SUBJECTS,
                   SYNONYMS, UNITS, VERBS, article, capitalize, comparative, number_words, past_tense,
                   plural)

SEED = 123
OUT = Path(__file__).with_name("instruction-data.json")
TRAIN_FRAC, TEST_FRAC = 0.85, 0.10  # the book's split, exactly as data.split_data computes it
INPUT_SHARE = 1 / 3                 # share of entries that put their subject in `input`


# ---- drawing ---------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, one space: the key that finds (near) duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shuffled(rng: random.Random, items) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def category_members() -> list[tuple[str, str]]:
    return [(word, singular) for singular, _, words in CATEGORIES for word in words.split()]


@functools.cache
def word_pool() -> list[str]:
    """Words of 3 to 8 letters from the tables, sorted so no set order leaks into the output."""
    words = {w for w, _ in category_members()} | set(NOUNS) | set(VERBS) | set(ADJECTIVES)
    return sorted(w for w in words if 3 <= len(w) <= 8)


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(PAST_VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]
    return capitalize(" ".join(w for w in words if w)) + "."


# ---- families: each yields (fields, output, answer); fields["x"] is what goes into `input` ---------
def from_table(table: list[tuple[str, str]], output: str) -> Callable:
    """Ask about every row (x, y) of a table once, in random order; y is the answer."""
    def make(rng: random.Random) -> Iterator:
        for x, y in shuffled(rng, table):
            ax = f"{article(x)} {x}"
            fields = {"x": x, "y": y, "X": capitalize(x), "ax": ax, "Ax": capitalize(ax),
                      "ay": f"{article(y)} {y}"}
            yield fields, output.format(**fields), y
    return make


def forever(draw: Callable) -> Callable:
    """Endless random draws; build_family stops after its count."""
    def make(rng: random.Random) -> Iterator:
        while True:
            yield draw(rng)
    return make


def days_months(rng):
    rows = [(kind, rel, name, names[(i + 1) % len(names)] if rel == "after" else names[i - 1])
            for kind, names in (("day", DAYS), ("month", MONTHS))
            for i, name in enumerate(names) for rel in ("after", "before")]
    for kind, rel, x, y in shuffled(rng, rows):
        yield {"x": x, "kind": kind, "rel": rel}, f"The {kind} {rel} {x} is {y}.", y


def odd_one_out(rng):
    (_, group, words), (_, _, others) = rng.sample(CATEGORIES, 2)
    odd = rng.choice(others.split())
    items = shuffled(rng, rng.sample(words.split(), 3) + [odd])
    return {"x": ", ".join(items)}, f'"{odd}" is the odd one out, because the others are {group}.', odd


def first_last(rng):
    items, which = rng.sample(word_pool(), rng.randint(3, 5)), rng.choice(("first", "last"))
    item = items[0] if which == "first" else items[-1]
    return {"x": ", ".join(items), "which": which}, f'The {which} item is "{item}".', item


def sort_words(rng):
    words = rng.sample(word_pool(), 4)
    while len({w[0] for w in words}) < 4:  # distinct first letters keep the order easy to see
        words = rng.sample(word_pool(), 4)
    answer = ", ".join(sorted(words))
    return {"x": ", ".join(words)}, f"In alphabetical order: {answer}.", answer


def sort_numbers(rng):
    numbers = rng.sample(range(1, 100), 4)
    answer = ", ".join(map(str, sorted(numbers)))
    return {"x": ", ".join(map(str, numbers))}, f"From smallest to largest: {answer}.", answer


def largest(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return {"x": ", ".join(map(str, numbers))}, f"The largest number is {max(numbers)}.", str(max(numbers))


def greater(rng):
    a, b = rng.sample(range(1, 100), 2)
    output = f"Yes, {a} is greater than {b}." if a > b else f"No, {a} is less than {b}."
    return {"x": f"{a}, {b}", "a": a, "b": b}, output, "Yes" if a > b else "No"


def add(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return {"x": f"{a} and {b}", "a": a, "b": b}, f"{a} plus {b} equals {a + b}.", str(a + b)


def multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"x": f"{a} and {b}", "a": a, "b": b}, f"{a} times {b} equals {a * b}.", str(a * b)


def convert(rng):
    (src, dst, factor), v = rng.choice(UNITS), rng.randint(2, 12)
    return ({"x": f"{v} {src}", "v": v, "src": src, "dst": dst},
            f"{v} {src} is {v * factor} {dst}.", str(v * factor))


def even_odd(rng):
    n = rng.randint(1, 199)
    parity = "odd" if n % 2 else "even"
    return {"x": str(n)}, f"{n} is an {parity} number.", parity


def in_words(rng):
    n = rng.randint(1, 99)
    return {"x": str(n)}, f'The number {n} in words is "{number_words(n)}".', number_words(n)


def count_letters(rng):
    w = rng.choice(word_pool())
    return {"x": w}, f'The word "{w}" has {len(w)} letters.', str(len(w))


def backwards(rng):
    w = rng.choice(word_pool())
    return {"x": w}, f'"{w}" spelled backwards is "{w[::-1]}".', w[::-1]


def count_words(rng):
    s = sentence(rng)
    return {"x": s}, f"The sentence has {len(s.split())} words.", str(len(s.split()))


def reverse_words(rng):
    phrase = sentence(rng).rstrip(".").lower()
    answer = " ".join(phrase.split()[::-1])
    return {"x": phrase}, f'In reverse order: "{answer}".', answer


def uppercase(rng):
    words = [rng.choice(("big", "small", "happy", "bright", "quiet", "old")), rng.choice(OBJECTS).split()[-1]]
    phrase = " ".join(words + [rng.choice(ENDINGS)]).strip()
    return {"x": phrase}, f'In capital letters, it is "{phrase.upper()}".', phrase.upper()


FAMILIES = [  # (task, make, count: None = whole table, phrasings, phrasings that put x in `input`)
    ("antonym", from_table(ANTONYMS, 'The opposite of "{x}" is "{y}".'), None,
     ['What is the opposite of "{x}"?', 'Give an antonym of "{x}".', 'Which word means the opposite of "{x}"?'],
     ["Give the opposite of the following word.", "Write an antonym for this word."]),
    ("synonym", from_table(SYNONYMS, 'A synonym for "{x}" is "{y}".'), None,
     ['Give a synonym for "{x}".', 'What is another word for "{x}"?',
      'Name a word that means the same as "{x}".'],
     ["Give a synonym for the following word.", "Write a word with the same meaning as this one."]),
    ("capital", from_table(CAPITALS, "The capital of {x} is {y}."), None,
     ["What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?"],
     ["Name the capital city of this country.", "What is the capital of the country below?"]),
    ("language", from_table(LANGUAGES, "The main language of {x} is {y}."), None,
     ["What language is mainly spoken in {x}?", "Which language do most people in {x} speak?",
      "Name the main language of {x}."],
     ["Name the main language spoken in this country.", "Which language do most people speak here?"]),
    ("animal_sound", from_table(ANIMAL_SOUNDS, '{Ax} goes "{y}".'), None,
     ["What sound does {ax} make?", "What noise does {ax} make?", "What does {ax} say?"],
     ["What sound does this animal make?", "Name the sound made by the following animal."]),
    ("colour", from_table(COLOURS, "{X} is {y}."), None,
     ["What colour is {x}?", "Name the colour of {x}.", "Tell me the colour of {x}."],
     ["Name the usual colour of the following.", "What colour is this?"]),
    ("baby_animal", from_table(BABY_ANIMALS, "A baby {x} is called {ay}."), None,
     ["What is a baby {x} called?", "What do we call a young {x}?", "What is the word for a baby {x}?"],
     ["What is the baby of this animal called?", "Name the young of the following animal."]),
    ("category", from_table(category_members(), "{Ax} is {ay}."), 45,
     ["What kind of thing is {ax}?", "Name the category that {ax} belongs to.",
      'What group does the word "{x}" belong to?'],
     ["Say what kind of thing this is.", "Name the category of the following word."]),
    ("next_day_month", days_months, None,
     ["Which {kind} comes {rel} {x}?", "What {kind} is {rel} {x}?", "Name the {kind} that comes {rel} {x}."],
     ["Which {kind} comes {rel} this one?", "Name the {kind} {rel} the following one."]),
    ("plural", from_table([(n, plural(n)) for n in NOUNS], 'The plural of "{x}" is "{y}".'), None,
     ['What is the plural of "{x}"?', 'Give the plural form of "{x}".', 'Write the plural of the word "{x}".'],
     ["Make this noun plural.", "Write the plural form of the following word."]),
    ("past_tense", from_table([(v, past_tense(v)) for v in VERBS], 'The past tense of "{x}" is "{y}".'), None,
     ['What is the past tense of "{x}"?', 'Give the past tense of the verb "{x}".',
      'Write "{x}" in the past tense.'],
     ["Write the past tense of this verb.", "Change the following verb to the past tense."]),
    ("comparative", from_table([(a, comparative(a)) for a in ADJECTIVES],
                               'The comparative of "{x}" is "{y}".'), None,
     ['What is the comparative form of "{x}"?', 'Give the comparative of "{x}".',
      'How do you say "more {x}" in one word?'],
     ["Give the comparative form of this adjective.", "Write the comparative of the following word."]),
    ("odd_one_out", forever(odd_one_out), 40,
     ["Which word does not belong: {x}?", "Find the odd one out: {x}.",
      "Which of these is the odd one out: {x}?"],
     ["Pick the word that does not belong with the others.", "Find the odd one out in this list."]),
    ("first_last_item", forever(first_last), 40,
     ["What is the {which} item in this list: {x}?", "Name the {which} word in the list {x}.",
      "Which word comes {which} in: {x}?"],
     ["Give the {which} item of the following list.", "Which word comes {which} in this list?"]),
    ("sort_words", forever(sort_words), 40,
     ["Sort these words alphabetically: {x}.", "Put the words {x} in alphabetical order.",
      "Arrange {x} in alphabetical order."],
     ["Sort the following words in alphabetical order.", "Put these words in alphabetical order."]),
    ("sort_numbers", forever(sort_numbers), 40,
     ["Sort these numbers from smallest to largest: {x}.", "Put {x} in ascending order.",
      "Arrange the numbers {x} from lowest to highest."],
     ["Sort the following numbers in ascending order.", "Arrange these numbers from smallest to largest."]),
    ("largest_number", forever(largest), 40,
     ["Which is the largest number: {x}?", "What is the biggest number in the list {x}?",
      "Find the largest of these numbers: {x}."],
     ["Find the largest number in this list.", "Which of these numbers is the biggest?"]),
    ("greater_than", forever(greater), 40,
     ["Is {a} greater than {b}?", "Is {a} bigger than {b}? Answer yes or no.",
      "Answer yes or no: is {a} larger than {b}?"],
     ["Is the first number greater than the second? Answer yes or no.",
      "Say whether the first number is bigger than the second."]),
    ("addition", forever(add), 40,
     ["What is {a} plus {b}?", "Add {a} and {b}.", "Calculate {a} + {b}."],
     ["Add these two numbers.", "Find the sum of these numbers."]),
    ("multiplication", forever(multiply), 40,
     ["What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} x {b}."],
     ["Multiply these two numbers.", "Find the product of these numbers."]),
    ("unit_conversion", forever(convert), 40,
     ["How many {dst} are in {v} {src}?", "Convert {v} {src} to {dst}.", "What is {v} {src} in {dst}?"],
     ["Convert this amount to {dst}.", "How many {dst} is this?"]),
    ("even_odd", forever(even_odd), 40,
     ["Is {x} even or odd?", "Is the number {x} odd or even?", "Tell me whether {x} is even or odd."],
     ["Is this number even or odd?", "Say whether the following number is odd or even."]),
    ("number_to_words", forever(in_words), 40,
     ["Write the number {x} in words.", "Spell out the number {x}.", "How do you write {x} in words?"],
     ["Write this number in words.", "Spell out the following number."]),
    ("count_letters", forever(count_letters), 40,
     ['How many letters are in the word "{x}"?', 'Count the letters in "{x}".',
      'How many letters does "{x}" have?'],
     ["Count the letters in this word.", "How many letters does the following word have?"]),
    ("spell_backwards", forever(backwards), 40,
     ['Spell "{x}" backwards.', 'Write the word "{x}" backwards.', 'Reverse the letters of "{x}".'],
     ["Spell this word backwards.", "Reverse the letters in the following word."]),
    ("count_words", forever(count_words), 40,
     ['How many words are in the sentence "{x}"?', 'Count the words in "{x}"',
      'How many words does "{x}" contain?'],
     ["Count the words in the following sentence.", "How many words are in this sentence?"]),
    ("reverse_words", forever(reverse_words), 40,
     ['Reverse the order of the words in "{x}".', 'Write "{x}" with its words in reverse order.',
      'Put the words of "{x}" in reverse order.'],
     ["Reverse the order of the words in this phrase.", "Write the following words in reverse order."]),
    ("uppercase", forever(uppercase), 40,
     ['Write "{x}" in capital letters.', 'Convert "{x}" to uppercase.',
      'Rewrite "{x}" using only capital letters.'],
     ["Convert the following text to uppercase.", "Rewrite this phrase in capital letters."]),
]


# ---- building -------------------------------------------------------------------------------------
def build_family(rng: random.Random, task: str, make: Callable, count: int | None, phrasings: list[str],
                 input_phrasings: list[str], seen: set[str]) -> list[dict]:
    """Up to `count` entries of one family; no subject twice, no (instruction, input) already in `seen`."""
    entries, subjects = [], set()
    for fields, output, answer in make(rng):
        if len(entries) == count:
            break
        subject = normalize(" ".join(f"{k}={fields[k]}" for k in sorted(fields)))
        if rng.random() < INPUT_SHARE:
            instruction, inp = rng.choice(input_phrasings).format(**fields), fields["x"]
        else:
            instruction, inp = rng.choice(phrasings).format(**fields), ""
        key = normalize(instruction + " " + inp)
        if subject in subjects or key in seen:
            continue
        subjects.add(subject)
        seen.add(key)
        entries.append({"instruction": instruction, "input": inp, "output": output,
                        "answer": answer, "task": task})
    return entries


def spread(n: int, k: int) -> list[bool]:
    """k of n positions marked True, evenly spaced."""
    return [(i + 1) * k // n > i * k // n for i in range(n)]


def stratified_order(entries: list[dict], rng: random.Random) -> list[dict]:
    """Shuffle so that the book's split (train, then test, then val) gets its share of every family.

    `entries` come grouped by family, so evenly spaced picks take a slice of every group."""
    n = len(entries)
    n_train, n_test = int(n * TRAIN_FRAC), int(n * TEST_FRAC)
    is_test = spread(n, n_test)
    test = [e for e, t in zip(entries, is_test) if t]
    rest = [e for e, t in zip(entries, is_test) if not t]
    is_val = spread(len(rest), n - n_train - n_test)
    val = [e for e, v in zip(rest, is_val) if v]
    train = [e for e, v in zip(rest, is_val) if not v]
    for part in (train, test, val):
        rng.shuffle(part)
    return train + test + val


def build_entries(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    entries = [e for family in FAMILIES for e in build_family(rng, *family, seen=seen)]
    return stratified_order(entries, rng)


def render(entries: list[dict]) -> str:
    return json.dumps(entries, indent=2, ensure_ascii=False) + "\n"


def generator_parser(doc: str, out: Path, prog: str) -> argparse.ArgumentParser:
    """The flags of a data generator (this file, make_preferences.py): --out and --check."""
    p = ArgumentParser(doc, prog=prog)
    p.add_argument("--out", type=Path, default=out, help="where the JSON goes")
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh build")
    return p


def build_parser() -> argparse.ArgumentParser:
    return generator_parser(__doc__, OUT, "make_dataset.py")


def generator_cli(parser: argparse.ArgumentParser, build: Callable[[], list[dict]],
                  what: Callable[[list[dict]], str], argv: list[str] | None = None) -> int:
    """The command line of a data generator: write `build()`'s entries to --out (through a
    temporary file and a rename, so an interrupted run never leaves half a file), or with
    --check exit 1 if the file there differs from a fresh build."""
    args = parser.parse_args(argv)
    entries = build()
    text = render(entries).encode("utf-8")
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == text
        print(f"{args.out}: {'up to date' if same else 'differs from what the generator writes'}")
        return 0 if same else 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(args.out)
    print(f"wrote {what(entries)} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return generator_cli(build_parser(), build_entries, lambda entries: f"{len(entries)} entries "
                         f"in {len({e['task'] for e in entries})} families", argv)


if __name__ == "__main__":
    cli_main(lambda: sys.exit(main()))
