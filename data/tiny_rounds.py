"""Continued pretraining of the `tiny` model: passages that drill what the first corpus taught too thinly.

Each round is a list of passages, shuffled in among replayed passages of data/tiny_corpus.py's first
corpus by `round_corpus` (pretrain_tiny.py's --drill, --compare and --forms). Every round asks its
questions in other words than the instruction set's, which `tiny_corpus.check_held_out` proves.
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_corpus.py lives beside this file
from tiny_corpus import (ITEMS, QA_LABELS, build_corpus, md, odd_item, product_item,  # noqa: E402
                         sum_item, unit_item)


def round_corpus(seed: int, n_passages: int, drill_rounds: int = 0, comparisons: int = 0,
                 forms: int = 0) -> str:
    """The first corpus of `seed` (`n_passages` of it, replayed so the rest is not forgotten) with
    the number drill's, the comparison round's and the answer-form round's passages shuffled in."""
    rounds = (drill_passages(seed + 1, drill_rounds) + compare_passages(seed + 2, comparisons)
              + form_passages(seed + 3, forms))
    return build_corpus(seed, n_passages, rounds)


# ---- the number drill (continued pretraining): every small sum, product and conversion -----------
# questions in other words than the instruction set's ("What is 4 plus 1?", "Add 42 and 50."),
# each answered by a statement that copies its numbers
SUM_ASKS = ["{a} + {b} = ?", "How much is {a} plus {b}?", "What do {a} and {b} add up to?",
            "{a} and {b} added together make what?", "Tell me the sum of {a} and {b}."]
PRODUCT_ASKS = ["{a} x {b} = ?", "How much is {a} times {b}?", "{a} multiplied by {b} gives what?"]
UNIT_ASKS = ["{v} {src}, in {dst}?", "{v} {src} make how many {dst}?", "Turn {v} {src} into {dst}."]


def number_facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """Every sum of two numbers 1..60, product of two of 2..12 and conversion of 2..12 units (the
    instruction set's ranges), each once as (question, answer, statement) in a random phrasing,
    shuffled. Random statements leave each two-digit sum to chance (the first corpus states a
    given one about 4 times); a table seen whole, round after round, can be learned."""
    items = []
    for a in range(1, 61):
        for b in range(1, 61):
            items.append((rng.choice(SUM_ASKS).format(a=a, b=b), *sum_item(rng, a, b)[1:]))
    for a in range(2, 13):
        for b in range(2, 13):
            items.append((rng.choice(PRODUCT_ASKS).format(a=a, b=b), *product_item(rng, a, b)[1:]))
    for src, dst, factor in md.UNITS:
        for v in range(2, 13):
            ask = rng.choice(UNIT_ASKS).format(v=v, src=src, dst=dst)
            items.append((ask, *unit_item(rng, (src, dst, factor), v)[1:]))
    rng.shuffle(items)
    return items


def drill_passages(seed: int, rounds: int) -> list[str]:
    """`rounds` passes over number_facts, 3-8 facts a passage: statements, or questions each
    answered by its statement (the question's numbers copied into the answer)."""
    rng, passages = random.Random(seed), []
    for _ in range(rounds):
        for chunk in chunks(rng, number_facts(rng)):
            if rng.random() < 0.5:
                passages.append(" ".join(statement for _, _, statement in chunk))
            else:
                passages.append(qa_passage(rng, chunk))
    return passages


def chunks(rng: random.Random, items: list):
    """`items` in runs of 3-8, one passage each (the last may be shorter); lazily, so the caller's
    own draws from `rng` stay between these, in the order the shipped corpus was built with."""
    while items:
        n = rng.randint(3, 8)
        yield items[:n]
        items = items[n:]


def qa_passage(rng: random.Random, chunk: list[tuple[str, str, str]]) -> str:
    """(question, answer, statement) items as one dialogue, each question answered by its statement."""
    ask, reply = rng.choice(QA_LABELS)
    return "\n".join(f"{ask}{q}\n{reply}{statement}" for q, _, statement in chunk)


# ---- the comparison round (continued pretraining): "is the first number the larger?" -------------
# asked the instruction set's way round but in other words; the reply gives the verdict first and
# then the true order ("No, 57 is less than 62."), so the model must weigh the two numbers before it
# writes a word. Each number 1..99 is one token: their order lives in the embeddings, which learn it
# from many pairs; far-apart pairs are learned first, so half the pairs are 1-9 apart.
COMPARE_ASKS = ["Is {a} higher than {b}?", "Is {a} more than {b}?", "Does {a} exceed {b}?",
                "Is {a} above {b}?", "Is {a} over {b}?"]


def compare_pair(rng: random.Random) -> tuple[int, int]:
    """Two different numbers 1..99: half drawn at random, half 1-9 apart."""
    if rng.random() < 0.5:
        return tuple(rng.sample(range(1, 100), 2))
    while True:
        a = rng.randint(1, 99)
        b = a + rng.choice((-1, 1)) * rng.randint(1, 9)
        if 1 <= b <= 99:
            return a, b


def compare_item(rng: random.Random, a: int, b: int) -> tuple[str, str, str]:
    """(question, "Yes" or "No", the reply: the verdict, then the order of a and b)."""
    reply = f"Yes, {a} is greater than {b}." if a > b else f"No, {a} is less than {b}."
    return rng.choice(COMPARE_ASKS).format(a=a, b=b), reply.split(",")[0], reply


def compare_passages(seed: int, n: int) -> list[str]:
    """`n` comparisons, 3-8 a passage, each question answered by its reply."""
    rng = random.Random(seed)
    items = [compare_item(rng, *compare_pair(rng)) for _ in range(n)]
    return [qa_passage(rng, chunk) for chunk in chunks(rng, items)]


# ---- the answer-form round (continued pretraining): answers where a response puts its first word ---
# Every answer above follows a space ("A: Yes", "All but scooter"), and " Yes" is another token than
# the "Yes" that starts a response, as " scooter" is than the scooter of '"scooter" is the odd one
# out'. Stage 1 picks the odd one out every time after "A:" and at chance after a quote or a line
# break; here the first corpus's questions and the comparisons are answered at a line's start.
FORM_MAKERS = ITEMS + [odd_item] * 7 + [lambda rng: compare_item(rng, *compare_pair(rng))] * 7


def form_reply(rng: random.Random, answer: str, statement: str) -> str:
    """A verdict-first statement whole ("Yes, 61 is ..."), else the answer bare or quoted."""
    if statement.startswith(answer):
        return statement
    return rng.choice([answer, f'"{answer}"', f'"{answer}" is the answer.'])


def form_passages(seed: int, n: int) -> list[str]:
    """`n` questions, 3-8 a passage, each answered on the next line with nothing before the answer."""
    rng = random.Random(seed)
    items = [rng.choice(FORM_MAKERS)(rng) for _ in range(n)]
    return ["\n".join(f"{rng.choice(QA_LABELS)[0]}{q}\n{form_reply(rng, a, s)}" for q, a, s in chunk)
            for chunk in chunks(rng, items)]
