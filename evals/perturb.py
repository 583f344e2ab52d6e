"""Seeded perturbations of text for HELM-style robustness and fairness checks: typos, lower-casing
and extra whitespace (robustness: the meaning stays, the surface changes), and swapped gendered
words and personal names (fairness: who the text is about changes, nothing else should).

Each perturbation is `f(text, seed) -> text`, the same output for the same text and seed (a seed
may be an int or a string). ROBUSTNESS and FAIRNESS name them for evals/report.py.
"""
import random
import re

# ---- robustness ------------------------------------------------------------------------------
KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def keyboard_neighbours() -> dict[str, str]:
    """Each letter's neighbours on a QWERTY keyboard: left, right, and the keys above and below
    (rows are staggered, so the keys at the same and the next index of the adjacent rows)."""
    where = {c: (r, i) for r, row in enumerate(KEYBOARD) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in where.items():
        near = [(r, i - 1), (r, i + 1), (r - 1, i), (r - 1, i + 1), (r + 1, i - 1), (r + 1, i)]
        out[c] = "".join(KEYBOARD[rr][ii] for rr, ii in near
                         if 0 <= rr < len(KEYBOARD) and 0 <= ii < len(KEYBOARD[rr]))
    return out


NEIGHBOURS = keyboard_neighbours()


def typos(text: str, seed, rate: float = 0.05) -> str:
    """Each letter, with probability `rate`, becomes a neighbouring key (its case kept): the
    slips of a fast typist."""
    rng = random.Random(seed)
    out = []
    for c in text:
        if c.lower() in NEIGHBOURS and rng.random() < rate:
            slip = rng.choice(NEIGHBOURS[c.lower()])
            c = slip.upper() if c.isupper() else slip
        out.append(c)
    return "".join(out)


def lowercase(text: str, seed=None) -> str:
    return text.lower()


def extra_whitespace(text: str, seed, max_spaces: int = 3) -> str:
    """Every space becomes 1 to `max_spaces` spaces."""
    rng = random.Random(seed)
    return re.sub(" ", lambda m: " " * rng.randint(1, max_spaces), text)


# ---- fairness ----------------------------------------------------------------------------------
GENDER_PAIRS = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
    ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("father", "mother"),
    ("fathers", "mothers"), ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"),
    ("brothers", "sisters"), ("husband", "wife"), ("husbands", "wives"), ("king", "queen"),
    ("kings", "queens"), ("mr", "mrs"), ("sir", "madam"), ("male", "female"), ("uncle", "aunt"),
    ("nephew", "niece"), ("gentleman", "lady"), ("gentlemen", "ladies"),
    ("grandfather", "grandmother"), ("dad", "mom"), ("prince", "princess"), ("actor", "actress"),
    ("waiter", "waitress"), ("boyfriend", "girlfriend"), ("masculine", "feminine")]
GENDER_SWAP = {**{f: m for m, f in GENDER_PAIRS}, **{m: f for m, f in GENDER_PAIRS}}


def same_case(word: str, like: str) -> str:
    """`word` written in the case of `like` (UPPER, Capitalised or lower)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


# after these (or punctuation, or the end) "her" is an object, "him"; before a noun it is "his"
OBJECT_FOLLOWERS = {"at", "to", "in", "on", "with", "for", "from", "about", "by", "as", "and",
                    "or", "but", "that", "the", "a", "an", "if", "when", "because", "so", "again",
                    "too", "up", "down", "out", "off", "back", "away", "into", "is", "was"}


def swap_gender(text: str, seed=None) -> str:
    """Gendered words swapped both ways (he <-> she, king <-> queen, ...). "her" is ambiguous:
    "him" before punctuation, the end or a word of OBJECT_FOLLOWERS, else "his"."""
    def swap(m: re.Match) -> str:
        word = m[0].lower()
        if word == "her":
            after = re.match(r"\s*(\w*)", text[m.end():])[1].lower()
            new = "him" if not after or after in OBJECT_FOLLOWERS else "his"
        else:
            new = GENDER_SWAP[word]
        return same_case(new, m[0])
    pattern = r"\b(?:" + "|".join(sorted(GENDER_SWAP, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, swap, text, flags=re.IGNORECASE)


# first names from two groups of origins, men and women alternating, swapped across the groups
# and within a gender so that the names check does not also change gender
NAMES_1 = ["John", "Mary", "James", "Sarah", "Michael", "Emily", "David", "Anna", "Robert",
           "Laura", "Thomas", "Jane"]
NAMES_2 = ["Jamal", "Aisha", "Wei", "Mei", "Rahul", "Priya", "Carlos", "Sofia", "Kwame",
           "Amara", "Hiroshi", "Yuki"]


def name_mapping(seed) -> dict[str, str]:
    """The seeded name -> name map (both directions): the same seed gives the same map, so a
    prompt and its reference answer change names together."""
    rng = random.Random(seed)
    mapping = {}
    for parity in (0, 1):  # 0: men, 1: women
        ones, twos = NAMES_1[parity::2], NAMES_2[parity::2]
        rng.shuffle(twos)
        for one, two in zip(ones, twos):
            mapping[one], mapping[two] = two, one
    return mapping


def swap_names(text: str, seed) -> str:
    """Every listed first name replaced by its partner from the other group."""
    mapping = name_mapping(seed)
    return re.sub(r"\b(?:" + "|".join(mapping) + r")\b", lambda m: mapping[m[0]], text)


ROBUSTNESS = {"typos": typos, "lowercase": lowercase, "whitespace": extra_whitespace}
FAIRNESS = {"gender": swap_gender, "names": swap_names}
