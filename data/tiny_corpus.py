"""The pretraining text of the `tiny` model: passages built from make_dataset.py's tables and rules.

`build_corpus(seed, n_passages)` returns plain text: facts in many phrasings, connected paragraphs,
and passages that repeat and transform words seen earlier in the same passage (a word then its
letters, a list then the same list sorted, quizzes whose answers come after all the questions),
so attention learns to find and copy. `check_held_out` proves no instruction-set entry is in it.
"""
import functools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_dataset.py lives beside this file
import make_dataset as md  # noqa: E402

SEP = "<|endoftext|>"  # between passages, as in GPT-2's own pretraining text
QUOTES = ('"', "'", "")


def letters(word: str, sep: str) -> str:
    return sep.join(word)


def spoken(n: int) -> str:
    """Numbers 0..99 in words, others as digits."""
    return md.number_words(n) if 0 <= n < 100 else str(n)


@functools.cache
def broad_pool() -> list[str]:
    """make_dataset's word pool plus the single words of its fact tables: more words to copy."""
    tables = md.ANTONYMS + md.SYNONYMS + md.ANIMAL_SOUNDS + md.BABY_ANIMALS
    extra = {w for pair in tables for w in pair if w.isalpha() and w.islower()}
    return sorted(set(md.word_pool()) | {w for w in extra if 3 <= len(w) <= 9})


# ---- items: each returns (question, short answer, statement); questions avoid the set's phrasings --
FACTS = [  # (table, statements, questions) with {x}, {y}, {X}, {ax}, {Ax}, {ay}, {Ay}, {q} = quote
    (md.CAPITALS, ["The capital of {x} is {y}.", "{y} is the capital of {x}.",
                   "The capital city of {x} is {y}.", "In {x}, the capital is {y}.",
                   "The government of {x} sits in {y}, its capital."],
     ["Capital of {x}?", "Which city is the capital of the country {x}?", "Where is the capital of {x}?"]),
    (md.LANGUAGES, ["The main language of {x} is {y}.", "Most people in {x} speak {y}.",
                    "{y} is the main language of {x}.", "In {x}, people mainly speak {y}."],
     ["Language of {x}?", "What do people in {x} mostly speak?", "Main language in {x}?"]),
    (md.ANIMAL_SOUNDS, ["{Ax} goes {q}{y}{q}.", "The sound of {ax} is {q}{y}{q}.", "{Ax} says {q}{y}{q}.",
                        "When {ax} calls, it goes {q}{y}{q}."],
     ["Sound of {ax}?", "How does {ax} sound?", "What noise comes from {ax}?"]),
    (md.COLOURS, ["{X} is {y}.", "The colour of {x} is {y}.", "{X} is usually {y}."],
     ["Colour of {x}?", "Which colour has {x}?"]),
    (md.BABY_ANIMALS, ["A baby {x} is called {ay}.", "A young {x} is {ay}.", "{Ay} is a baby {x}."],
     ["Baby {x}?", "Name for a young {x}?"]),
    (md.category_members(), ["{Ax} is {ay}.", "{Ax} is a kind of {y}.", "The word {q}{x}{q} names {ay}."],
     ["Is {ax} a fruit, a tool or something else?", "Kind of thing: {x}?"]),
    (md.ANTONYMS + [(y, x) for x, y in md.ANTONYMS],
     ["The opposite of {q}{x}{q} is {q}{y}{q}.", "{q}{X}{q} and {q}{y}{q} are opposites.",
      "{X} is the opposite of {y}."],
     ["Opposite of {q}{x}{q}?", "The reverse of {q}{x}{q}?"]),
    (md.SYNONYMS, ["A synonym for {q}{x}{q} is {q}{y}{q}.", "{q}{X}{q} means the same as {q}{y}{q}.",
                   "{X} and {y} mean the same thing."],
     ["Same meaning as {q}{x}{q}?", "Another way to say {q}{x}{q}?"]),
    ([(n, md.plural(n)) for n in md.NOUNS + [w for w, _ in md.category_members()]],
     ["The plural of {q}{x}{q} is {q}{y}{q}.", "One {x}, two {y}.",
      "Take the word {q}{x}{q}. In the plural, {q}{x}{q} becomes {q}{y}{q}.",
      "{q}{y}{q} is the plural of {q}{x}{q}."],
     ["More than one {x}?", "Plural form, {q}{x}{q}?"]),
    ([(v, md.past_tense(v)) for v in md.VERBS],
     ["The past tense of {q}{x}{q} is {q}{y}{q}.", "Today I {x}; yesterday I {y}.",
      "Take the verb {q}{x}{q}. In the past tense, {q}{x}{q} becomes {q}{y}{q}.",
      "{X} turns into {y} in the past."],
     ["Yesterday, I ... ({x})?", "Past of {q}{x}{q}?"]),
    ([(a, md.comparative(a)) for a in md.ADJECTIVES],
     ["The comparative of {q}{x}{q} is {q}{y}{q}.", "{X}, {y}, and then the most {x} of all.",
      "Take the word {q}{x}{q}. To compare, {q}{x}{q} becomes {q}{y}{q}.",
      "This one is {x}, that one is {y}."],
     ["Comparative, {q}{x}{q}?", "More {x}, in one word?"]),
]


def table_item(rng: random.Random, table, statements, questions) -> tuple[str, str, str]:
    x, y = rng.choice(table)
    ax, ay = f"{md.article(x)} {x}", f"{md.article(y)} {y}"
    f = {"x": x, "y": y, "X": md.capitalize(x), "ax": ax, "Ax": md.capitalize(ax), "ay": ay,
         "Ay": md.capitalize(ay), "q": rng.choice(QUOTES)}
    return rng.choice(questions).format(**f), y, rng.choice(statements).format(**f)


def day_month_item(rng):
    names = rng.choice((md.DAYS, md.MONTHS))
    i = rng.randrange(len(names))
    x, y = names[i], names[(i + 1) % len(names)]
    s = rng.choice([f"The {{k}} after {x} is {y}.", f"After {x} comes {y}.", f"{y} comes after {x}.",
                    f"The {{k}} before {y} is {x}.", f"{x} comes before {y}."])
    return f"After {x}?", y, s.format(k="day" if names is md.DAYS else "month")


def spelling_item(rng):
    w, q = rng.choice(broad_pool()), rng.choice(QUOTES)
    rev, n = w[::-1], len(w)
    kind = rng.randrange(3)
    if kind == 0:
        s = rng.choice([f"Take the word {q}{w}{q}. Its letters are {letters(w, ', ')}. Backwards they are "
                        f"{letters(rev, ', ')}, so {q}{w}{q} backwards is {q}{rev}{q}.",
                        f"Written backwards, {q}{w}{q} is {q}{rev}{q}.",
                        f"{q}{w}{q} spelled backwards is {q}{rev}{q}.",
                        f"{q}{w}{q} is spelled {letters(w, '-')}; from the end it is "
                        f"{letters(rev, '-')}: {q}{rev}{q}."])
        return f"{q}{w}{q} from right to left?", rev, s
    if kind == 1:
        numbered = ", ".join(f"{i} {c}" for i, c in enumerate(w, 1))
        s = rng.choice([f"The word {q}{w}{q} has {n} letters: {numbered}.",
                        f"{q}{w}{q} is spelled {letters(w, '-')}. That makes {spoken(n)} letters.",
                        f"Count the letters of {q}{w}{q}: {numbered}. So {q}{w}{q} has {n} letters."])
        return f"Letters in {q}{w}{q}?", str(n), s
    phrase = " ".join(rng.sample(broad_pool(), rng.randint(1, 3)))
    s = rng.choice([f"In capital letters, {q}{phrase}{q} is {q}{phrase.upper()}{q}.",
                    f"Shouted, {q}{phrase}{q} becomes {q}{phrase.upper()}{q}.",
                    f"{q}{phrase}{q} in upper case reads {q}{phrase.upper()}{q}."])
    return f"{q}{phrase}{q} in big letters?", phrase.upper(), s


def sentence_item(rng):
    s, q = md.sentence(rng), rng.choice(QUOTES)
    words = s.rstrip(".").split()
    if rng.random() < 0.5:
        numbered = ", ".join(f"{i} {w}" for i, w in enumerate(words, 1))
        st = rng.choice([f"The sentence {q}{s}{q} has {len(words)} words: {numbered}.",
                         f"{q}{s}{q} Counting the words: {numbered}. That is {len(words)} words."])
        return f"Words in {q}{s}{q}?", str(len(words)), st
    phrase = " ".join(words).lower()
    rev = " ".join(phrase.split()[::-1])
    st = rng.choice([f"Read from the end, {q}{phrase}{q} becomes {q}{rev}{q}.",
                     f"The words {q}{phrase}{q} in reverse order are {q}{rev}{q}."])
    return f"{q}{phrase}{q}, last word first?", rev, st


def list_item(rng):
    words = rng.sample(broad_pool(), rng.randint(3, 6))
    listed, kind = ", ".join(words), rng.randrange(3)
    if kind == 0:
        done = ", ".join(sorted(words))
        s = rng.choice([f"Here are some words: {listed}. In alphabetical order they are: {done}.",
                        f"The words {listed}, sorted from A to Z, are {done}."])
        return f"{listed}: A to Z?", done, s
    if kind == 1:
        s = f"In the list {listed}, the first item is \"{words[0]}\" and the last item is \"{words[-1]}\"."
        return f"Start of the list {listed}?", words[0], s
    return odd_item(rng)


def odd_item(rng):
    (_, group, members), (_, _, others) = rng.sample(md.CATEGORIES, 2)
    odd = rng.choice(others.split())
    items = md.shuffled(rng, rng.sample(members.split(), 3) + [odd])
    s = f"Look at {', '.join(items)}. All but {odd} are {group}, so {odd} is the odd one out."
    return f"Which does not fit: {', '.join(items)}?", odd, s


def sum_item(rng: random.Random, a: int, b: int) -> tuple[str, str, str]:
    s = rng.choice([f"{a} plus {b} equals {a + b}.", f"{a} + {b} = {a + b}.",
                    f"{md.capitalize(spoken(a))} plus {spoken(b)} is {spoken(a + b)}.",
                    f"If you add {a} and {b}, you get {a + b}.", f"The sum of {a} and {b} is {a + b}."])
    return f"{a} + {b} = ?", str(a + b), s


def product_item(rng: random.Random, a: int, b: int) -> tuple[str, str, str]:
    s = rng.choice([f"{a} times {b} equals {a * b}.", f"{a} x {b} = {a * b}.",
                    f"{md.capitalize(spoken(a))} times {spoken(b)} is {spoken(a * b)}.",
                    f"The product of {a} and {b} is {a * b}."])
    return f"{a} x {b} = ?", str(a * b), s


def unit_item(rng: random.Random, unit: tuple[str, str, int], v: int) -> tuple[str, str, str]:
    src, dst, factor = unit
    one = "foot" if src == "feet" else src[:-1]
    s = rng.choice([f"{v} {src} is {v * factor} {dst}.",
                    f"There are {factor} {dst} in one {one}, so {v} {src} make {v * factor} {dst}."])
    return f"{v} {src}, in {dst}?", str(v * factor), s


def number_item(rng):
    kind = rng.randrange(7)
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    if kind == 0:
        return sum_item(rng, a, b)
    if kind == 1:
        return product_item(rng, rng.randint(2, 12), rng.randint(2, 12))
    if kind == 2:
        return (f"{a} spelled out?", spoken(a),
                rng.choice([f"{a} is written {spoken(a)}.", f'The number {a} in words is "{spoken(a)}".',
                            f"{md.capitalize(spoken(a))} is {a}."]))
    if kind == 3:
        n = rng.randint(1, 199)
        p = "odd" if n % 2 else "even"
        return f"{n}: odd or even?", p, f"{n} is an {p} number, because it ends in {str(n)[-1]}."
    if kind == 4:
        if a == b:
            return f"Compare {a} and {b}.", "equal", f"{a} and {b} are equal."
        hi, lo = max(a, b), min(a, b)
        s = rng.choice([f"{hi} is greater than {lo}.", f"{lo} is less than {hi}.",
                        f"Of {a} and {b}, the bigger one is {hi}."])
        return f"Bigger of {a} and {b}?", str(hi), s
    if kind == 5:
        return unit_item(rng, rng.choice(md.UNITS), rng.randint(2, 12))
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    if rng.random() < 0.5:
        done = ", ".join(map(str, sorted(numbers)))
        return f"{listed}, small to big?", done, f"From smallest to largest, {listed} become {done}."
    return (f"Largest of {listed}?", str(max(numbers)),
            f"Among {listed}, the largest number is {max(numbers)} and the smallest is {min(numbers)}.")


ITEMS = ([lambda rng, t=t: table_item(rng, *t) for t in FACTS]
         + [day_month_item] + [spelling_item] * 4 + [sentence_item] * 2 + [list_item] * 3 + [number_item] * 4)


# ---- passages: items arranged so later text repeats earlier text ----------------------------------
QA_LABELS = [("Q: ", "A: "), ("Question: ", "Answer: "), ("Teacher: ", "Pupil: "), ("Puzzle: ", "Solution: ")]


def paragraph(rng: random.Random) -> str:
    """A few statements, often of one kind, so the pattern itself is worth copying."""
    same = rng.choice(ITEMS) if rng.random() < 0.5 else None
    return " ".join((same or rng.choice(ITEMS))(rng)[2] for _ in range(rng.randint(2, 6)))


def qa(rng: random.Random) -> str:
    ask, reply = rng.choice(QA_LABELS)
    item = rng.choice(ITEMS)
    lines = []
    for _ in range(rng.randint(2, 5)):
        question, answer, statement = item(rng)
        lines.append(f"{ask}{question}\n{reply}{rng.choice((answer, statement))}")
    return "\n".join(lines)


def quiz(rng: random.Random) -> str:
    """All questions first, then all answers: each answer must be found several lines back."""
    items = [rng.choice(ITEMS)(rng) for _ in range(rng.randint(2, 5))]
    questions = "\n".join(f"{i}. {q}" for i, (q, _, _) in enumerate(items, 1))
    answers = "\n".join(f"{i}. {a}" for i, (_, a, _) in enumerate(items, 1))
    return f"Quiz.\n{questions}\nAnswers:\n{answers}"


def story(rng: random.Random) -> str:
    """Connected text: a country, an animal, or a small story that names its subject again."""
    kind = rng.randrange(3)
    if kind == 0:
        country, capital = rng.choice(md.CAPITALS)
        lang = dict(md.LANGUAGES).get(country)
        spoken_there = f" Most people there speak {lang}." if lang else ""
        return (f"{country} is a country. Its capital is {capital}.{spoken_there} Every year many "
                f"visitors travel to {capital}, and when they leave {country} they remember {capital}.")
    if kind == 1:
        animal, sound = rng.choice(md.ANIMAL_SOUNDS)
        baby = dict(md.BABY_ANIMALS).get(animal)
        young = f" A baby {animal} is called {md.article(baby)} {baby}." if baby else ""
        return (f"This is a story about {md.article(animal)} {animal}. The {animal} goes \"{sound}\"."
                f"{young} In the morning the {animal} said \"{sound}\" again and again.")
    subject, obj = rng.choice(md.SUBJECTS), rng.choice(md.OBJECTS)
    verbs = rng.sample(md.PAST_VERBS, 3)
    return (f"{md.capitalize(subject)} {verbs[0]} {obj} {rng.choice(md.ENDINGS[1:])}. Then {subject} "
            f"{verbs[1]} {obj} again. Later {subject} {verbs[2]} it, and that was the end of {obj}.")


PASSAGES = [(paragraph, 4), (qa, 2), (quiz, 1), (story, 1)]  # (builder, weight)

def build_corpus(seed: int, n_passages: int, rounds: list[str] = ()) -> str:
    """`n_passages` passages joined by <|endoftext|>; the same seed gives the same text. `rounds`
    (passages of tiny_rounds.py's continued pretraining) are shuffled in among them."""
    rng = random.Random(seed)
    builders, weights = zip(*PASSAGES)
    passages = [rng.choices(builders, weights)[0](rng) for _ in range(n_passages)]
    if rounds:
        passages += rounds
        rng.shuffle(passages)
    return SEP.join(passages)


# ---- held out: no (instruction, input, output) of the instruction set may appear ---------------------
def leaked_entries(corpus: str, entries: list[dict], window: int = 200) -> list[dict]:
    """Entries whose instruction appears in `corpus` followed, within `window` characters after
    its input and output would end, by that input and output: the triple the model is tested on."""
    by_instruction: dict[str, list[dict]] = {}
    for e in entries:  # many entries share an instruction ("Make this noun plural."): search it once
        by_instruction.setdefault(e["instruction"], []).append(e)
    leaked = []
    for instruction, group in by_instruction.items():
        start = corpus.find(instruction)
        while start != -1 and group:
            for e in list(group):
                end = start + len(instruction) + len(e["input"]) + len(e["output"]) + window
                tail = corpus[start + len(instruction):end]
                at = tail.find(e["input"])
                if at != -1 and e["output"] in tail[at + len(e["input"]):]:
                    leaked.append(e)
                    group.remove(e)
            start = corpus.find(instruction, start + 1)
    return leaked


def check_held_out(corpus: str, entries: list[dict]) -> None:
    """ValueError naming the first instruction-set entry found in the corpus."""
    leaked = leaked_entries(corpus, entries)
    if leaked:
        raise ValueError(f"{len(leaked)} instruction-set entries appear in the pretraining corpus, "
                         f"first: {leaked[0]['instruction']!r} -> {leaked[0]['output']!r}")
