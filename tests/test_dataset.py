"""Tests for data/make_dataset.py and the committed data/instruction-data.json it writes."""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO / "data" / "instruction-data.json"
FIELDS = ["instruction", "input", "output", "answer", "task"]

from data import load_data, split_data
from evaluate import answer_contained
from script_loader import load_script

make_dataset = load_script("data/make_dataset.py")


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return json.loads(DATA_FILE.read_text(encoding="utf-8"))


def key(entry: dict) -> str:
    """Near-duplicate key: lowercase, no punctuation, one space, instruction and input together."""
    return make_dataset.normalize(entry["instruction"] + " " + entry["input"])


def words(text: str) -> list[str]:
    """evaluate.normalize_answer's words: lowercase, no punctuation, no a/an/the."""
    text = re.sub(r"[^\w\s]", "", text.lower())
    return [w for w in text.split() if w not in ("a", "an", "the")]


# ---- the rules, on hand-checked words ---------------------------------------------------------------
@pytest.mark.parametrize("noun,expected", [("fox", "foxes"), ("church", "churches"), ("city", "cities"),
                                           ("key", "keys"), ("book", "books"), ("glass", "glasses")])
def test_plural(noun, expected):
    assert make_dataset.plural(noun) == expected


@pytest.mark.parametrize("verb,expected", [("walk", "walked"), ("bake", "baked"), ("carry", "carried"),
                                           ("play", "played"), ("fix", "fixed")])
def test_past_tense(verb, expected):
    assert make_dataset.past_tense(verb) == expected


@pytest.mark.parametrize("adj,expected", [("tall", "taller"), ("nice", "nicer"), ("happy", "happier"),
                                          ("big", "bigger"), ("thin", "thinner"), ("loud", "louder"),
                                          ("quiet", "quieter"), ("new", "newer"), ("gentle", "gentler")])
def test_comparative(adj, expected):
    assert make_dataset.comparative(adj) == expected


@pytest.mark.parametrize("n,expected", [(0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"),
                                        (42, "forty-two"), (90, "ninety"), (99, "ninety-nine")])
def test_number_words(n, expected):
    assert make_dataset.number_words(n) == expected


def test_normalize_and_article():
    assert make_dataset.normalize("  Is 34,  greater than 27?") == "is 34 greater than 27"
    assert make_dataset.normalize('Spell "Fox" backwards.') == make_dataset.normalize("spell fox backwards")
    assert [make_dataset.article(w) for w in ("apple", "Egg", "tool", "owl")] == ["an", "an", "a", "an"]


def test_spread_picks_k_evenly():
    marks = make_dataset.spread(10, 3)
    assert sum(marks) == 3 and marks == [False, False, False, True, False, False, True, False, False, True]
    assert make_dataset.spread(5, 0) == [False] * 5


# ---- the committed file ------------------------------------------------------------------------------
def test_file_is_what_the_generator_writes():
    assert make_dataset.render(make_dataset.build_entries()).encode("utf-8") == DATA_FILE.read_bytes()


def test_check_flag(tmp_path):
    assert make_dataset.main(["--check", "--out", str(DATA_FILE)]) == 0
    changed = tmp_path / "changed.json"
    changed.write_bytes(DATA_FILE.read_bytes().replace(b'"Paris"', b'"Lyon"', 1))
    assert make_dataset.main(["--check", "--out", str(changed)]) == 1
    assert make_dataset.main(["--check", "--out", str(tmp_path / "missing.json")]) == 1


def test_reproducible_under_other_hash_seeds():
    for seed in ("0", "12345"):
        result = subprocess.run([sys.executable, str(REPO / "data" / "make_dataset.py"), "--check"],
                                env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_schema(entries):
    for i, e in enumerate(entries):
        assert list(e) == FIELDS, i
        assert all(isinstance(e[f], str) for f in FIELDS), i
        assert e["instruction"].strip() and e["output"].strip() and e["answer"].strip() and e["task"], i
        assert e["output"][-1] in ".?!", i  # a complete sentence, not a bare token


def test_loads_with_load_data():
    assert len(load_data(str(DATA_FILE))) >= 1100


def test_size_families_and_input_share(entries):
    assert len(entries) >= 1100
    families = collections.Counter(e["task"] for e in entries)
    assert len(families) >= 20
    assert min(families.values()) >= 20
    assert 0.25 <= sum(bool(e["input"]) for e in entries) / len(entries) <= 0.42


def test_entries_are_short(entries):
    lengths = [len(f"{e['instruction']} {e['input']} {e['output']}".split()) for e in entries]
    assert sum(lengths) / len(lengths) <= 25 and max(lengths) <= 45


def test_answer_is_in_output(entries):
    for i, e in enumerate(entries):
        assert e["answer"].lower() in e["output"].lower(), i
        a, out = " ".join(words(e["answer"])), " ".join(words(e["output"]))
        assert a and re.search(rf"\b{re.escape(a)}\b", out), i  # what evaluate.answer_contained checks


def test_answers_agree_with_evaluate(entries):
    assert all(answer_contained(e["output"], e["answer"]) == 1.0 for e in entries)


def test_no_duplicates_or_near_duplicates(entries):
    pairs = [(make_dataset.normalize(e["instruction"]), make_dataset.normalize(e["input"])) for e in entries]
    assert len(set(pairs)) == len(entries)
    assert len({key(e) for e in entries}) == len(entries)


def test_splits_are_disjoint_and_cover_every_family(entries):
    train, val, test = split_data(entries)
    assert len(train) + len(val) + len(test) == len(entries) and val and test
    keys = [{key(e) for e in part} for part in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    families = {e["task"] for e in entries}
    for part in (train, val, test):
        assert {e["task"] for e in part} == families
