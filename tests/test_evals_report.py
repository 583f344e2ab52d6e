import csv
import json
import math
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from data import get_tokenizer
from evals import report
from evals.calibration import expected_calibration_error
from evals.perturb import (NEIGHBOURS, extra_whitespace, lowercase, name_mapping, swap_gender,
                           swap_names, typos)
from evals.report import (check_choice_item, choice_probabilities, choice_prompt,
                          instruction_choices, load_task,
                          perturb_item, reference_metric, run_choice, worst_case)
from gpt import GPTModel, save_model

REPO = Path(__file__).resolve().parents[1]
CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}
TEXT = "He told his sister that John and Mary will meet her at the King's hall."


# ---- perturbations, fixed inputs and seeds -------------------------------------------------------
def test_typos_are_seeded_keyboard_slips():
    text = "The quick brown fox jumps over the lazy dog."
    out = typos(text, 3, rate=0.2)
    assert out == "The quuck bfown fod jukos over the laau dog."  # i>u r>f x>d m>k p>o z>a y>u
    assert typos(text, 3, rate=0.2) == out and typos(text, 4, rate=0.2) != out
    for before, after in zip(text, out):
        assert before == after or after in NEIGHBOURS[before.lower()]
    assert typos(text, 3, rate=0.0) == text
    assert all(a != b for a, b in zip(text, typos(text, 3, rate=1.0)) if a.isalpha())
    assert typos("ABC", 1, rate=1.0).isupper()  # a capital slips to a capital


def test_keyboard_neighbours_by_hand():
    assert sorted(NEIGHBOURS["q"]) == ["a", "w"]
    assert sorted(NEIGHBOURS["g"]) == sorted("fhtyvb")
    assert sorted(NEIGHBOURS["m"]) == ["j", "k", "n"]


def test_lowercase_and_extra_whitespace():
    assert lowercase(TEXT, 0) == TEXT.lower()
    out = extra_whitespace("a b c d", 5)
    assert out == "a   b  c   d" and extra_whitespace("a b c d", 5) == out
    assert re.sub(" +", " ", extra_whitespace(TEXT, 9)) == TEXT  # only spaces were added
    assert all(1 <= len(run) <= 3 for run in re.findall(" +", extra_whitespace(TEXT, 9)))


def test_swap_gender_by_hand():
    assert swap_gender(TEXT) == ("She told her brother that John and Mary will meet him at the "
                                 "Queen's hall.")
    assert swap_gender("I saw her. Her cat is HIS; give her the ball, then her book") == \
        "I saw him. His cat is HER; give him the ball, then his book"
    assert swap_gender("The Mother and the sons of Mrs Smith") == \
        "The Father and the daughters of Mr Smith"
    assert swap_gender("theme shell history") == "theme shell history"  # whole words only


def test_swap_names_is_a_seeded_consistent_swap():
    assert swap_names(TEXT, 7) == ("He told his sister that Kwame and Priya will meet her at the "
                                   "King's hall.")
    mapping = name_mapping(1)
    assert all(mapping[mapping[n]] == n for n in mapping)  # swapping twice gives the name back
    assert swap_names(swap_names(TEXT, 1), 1) == TEXT
    assert mapping["John"] in ("Jamal", "Wei", "Rahul", "Carlos", "Kwame", "Hiroshi")  # a man
    assert swap_names("Johnny and Maryland", 1) == "Johnny and Maryland"


# ---- calibration ---------------------------------------------------------------------------------
def test_ece_is_zero_for_perfect_calibration():
    # 20 items at 50% confidence, right every other time: each 2-item bin is 50% right
    assert expected_calibration_error([0.5] * 20, [1, 0] * 10) == 0.0
    assert expected_calibration_error([1.0] * 7, [True] * 7) == 0.0
    # bins of 4: confidence .25 with 1 of 4 right, then .75 with 3 of 4 right
    assert expected_calibration_error([0.25] * 20 + [0.75] * 20,
                                      [1, 0, 0, 0] * 5 + [1, 1, 1, 0] * 5) == pytest.approx(0)


def test_ece_hand_computed():
    # 10 items, 10 bins: one item a bin, ECE = mean |correct - confidence|
    # |1-.9| + |1-.8| + |0-.7| + |1-.6| + |0-.6| + |0-.9| + |1-.55| + |1-.95| + |1-.7| + |0-.8|
    # = .1 + .2 + .7 + .4 + .6 + .9 + .45 + .05 + .3 + .8 = 4.5 -> 0.45
    conf = [0.9, 0.8, 0.7, 0.6, 0.6, 0.9, 0.55, 0.95, 0.7, 0.8]
    right = [1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(conf, right) == pytest.approx(0.45)
    # 20 items, bins of 2 (equal mass): .6 with one of two right: |.5 - .6| = .1 in five bins;
    # .9 with both right: |1 - .9| = .1 in five bins; ECE = 10 x (2/20) x .1 = 0.1
    assert expected_calibration_error([0.6] * 10 + [0.9] * 10,
                                      [1, 0] * 5 + [1] * 10) == pytest.approx(0.1)
    # fewer items than bins: empty bins are skipped; |0 - .8| and |1 - .4| over 2 -> 0.7
    assert expected_calibration_error([0.8, 0.4], [0, 1]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


# ---- the report's parts ------------------------------------------------------------------------
def test_worst_case_and_choice_probabilities():
    assert worst_case([1, 1, 0, 0.5], [[1, 0, 0, 1], [1, 1, 1, 0.25]]) == [1, 0, 0, 0.25]
    probs = choice_probabilities([math.log(0.2) - 3, math.log(0.3) - 3, math.log(0.5) - 3])
    assert probs == pytest.approx([0.2, 0.3, 0.5])


def test_run_choice_matches_the_models_own_next_token_logits():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    tok = get_tokenizer()
    items = [{"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
             {"question": "Sky?", "choices": ["blue", "green"], "answer": 0}]
    scores, confidences, tokens = run_choice(model, tok, items, Namespace(batch_size=2))
    for item, score, conf in zip(items, scores, confidences):
        ids = tok.encode(choice_prompt(item))
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letters = [tok.encode(f" {letter}")[0] for letter in "ABC"[:len(item["choices"])]]
        probs = logits[letters].softmax(-1)
        assert conf == pytest.approx(float(probs.max()), abs=1e-5)
        assert score == float(int(probs.argmax()) == item["answer"])
    assert tokens == 3 * (len(tok.encode(choice_prompt(items[0]))) + 1) + \
        2 * (len(tok.encode(choice_prompt(items[1]))) + 1)
    assert choice_prompt(items[1]) == "Sky?\nA. blue\nB. green\nAnswer:"


def test_perturb_item_changes_the_input_and_for_fairness_the_reference():
    entry = {"instruction": "Ask John about his day.", "input": "He is tired.",
             "output": "John says he is tired.", "answer": "John"}
    robust = perturb_item(entry, "reference", lowercase, "s", with_reference=False)
    assert robust["instruction"] == "ask john about his day." and robust["output"] == \
        entry["output"]
    fair = perturb_item(entry, "reference", swap_names, "s", with_reference=True)
    other = name_mapping("s")["John"]
    assert fair["instruction"] == f"Ask {other} about his day." and fair["answer"] == other
    item = {"question": "Is he tall?", "choices": ["he is", "no"], "answer": 0}
    assert perturb_item(item, "choice", swap_gender, "s", True)["choices"] == ["she is", "no"]


def test_choice_items_are_checked(tmp_path):
    assert check_choice_item({"question": "q", "choices": ["a", "b"], "answer": "b"}, "x")[
        "answer"] == 1
    for bad, message in [({"question": "q", "choices": ["a"], "answer": 0}, "2 to 26"),
                         ({"question": "q", "choices": ["a", "b"], "answer": 2}, "got 2"),
                         ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "got 'C'"),
                         ({"choices": ["a", "b"], "answer": 0}, "string 'question'")]:
        with pytest.raises(ValueError, match=message):
            check_choice_item(bad, "quiz.json: question 3")
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        load_task("squad")
    name, kind, items = load_task("instructions")
    assert (name, kind, len(items)) == ("instructions", "reference", 113)  # the test split


# ---- the command, end to end on a small model ---------------------------------------------------
def test_cli_report_over_instructions_multiple_choice_and_mmlu(tmp_path):
    torch.manual_seed(0)
    save_model(GPTModel(CFG), CFG, tmp_path / "m.pt")
    quiz = [{"question": "Which word means a male parent?", "choices": ["father", "table"],
             "answer": "A"},
            {"question": "John has 2 apples and Mary has 3. Who has more?",
             "choices": ["John", "Mary", "neither"], "answer": 1}]
    (tmp_path / "quiz.json").write_text(json.dumps(quiz))
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with open(tmp_path / "mmlu" / "test" / "astronomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["What orbits the Earth?", "Moon", "Sun", "Mars", "Venus", "A"],
                                 ["Is the Sun a star?", "No", "Yes", "Maybe", "Never", "B"]])
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "report", str(tmp_path / "m.pt"),
                        "--tasks", "instructions", f"mc:{tmp_path / 'quiz.json'}",
                        f"mmlu:{tmp_path / 'mmlu'}", "--limit", "3", "--max-new-tokens", "3",
                        "--json", str(out), "--report", str(tmp_path / "r.md"),
                        "--output", str(tmp_path / "items.json")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["tasks"]
    assert [(row["task"], row["n"], row["metric"]) for row in rows] == [
        ("instructions", 3, "answer_contained"), ("mc:quiz", 2, "accuracy"),
        ("mmlu", 2, "accuracy")]
    for row in rows:
        assert 0 <= row["robustness"] <= row["accuracy"] <= 100
        assert 0 <= row["fairness"] <= row["accuracy"]
        assert row["tokens_per_second"] > 0 and row["peak_memory_mb"] > 0
    assert rows[0]["ece"] is None and 0 <= rows[1]["ece"] <= 100
    assert rows[1]["changed"] == {"typos": rows[1]["changed"]["typos"], "lowercase": 2,
                                  "whitespace": 2, "gender": 1, "names": 1}
    assert "| instructions | answer_contained | 3 |" in r.stdout
    assert (tmp_path / "r.md").read_text().startswith("## HELM-style report")
    items = json.loads((tmp_path / "items.json").read_text())
    assert len(items) == 7 and {"typos", "gender", "names"} <= set(items[0])


def test_bad_task_file_fails_before_the_model_loads(tmp_path):
    (tmp_path / "quiz.json").write_text(json.dumps([{"question": "q", "choices": ["a", "b"],
                                                     "answer": 5}]))
    (tmp_path / "unread.pt").write_bytes(b"x")  # a file, never read: the task fails first
    with pytest.raises(ValueError, match=r"quiz.json: question 0: 'answer' must be a choice's "
                                         r"index or letter, got 5"):
        report.main([str(tmp_path / "unread.pt"), "--tasks", f"mc:{tmp_path / 'quiz.json'}"])


def test_reference_metric_choice():
    with_answer, without = [{"answer": "x"}], [{"output": "y"}]
    assert reference_metric(with_answer) == "answer_contained"
    assert reference_metric(with_answer + without) == "rouge_l"
    assert reference_metric(with_answer, "token_f1") == "token_f1"
    with pytest.raises(ValueError, match="needs an 'answer' in every entry"):
        reference_metric(without, "answer_contained")


def test_instruction_choices_draw_distractors_from_the_same_task():
    entries = [{"task": "t", "answer": a} for a in "vwxyz"] + \
        [{"task": "u", "answer": a} for a in ("yes", "no")] + [{"task": "solo", "answer": "s"}]
    test = [dict(e, instruction=f"q{i}", input="in" if i == 0 else "")
            for i, e in enumerate(entries[:1] + entries[5:6] + entries[7:])]
    items = instruction_choices(entries, test, seed=5)
    assert len(items) == 2  # "solo" has no other answer to choose from: left out
    first, second = items
    assert first["question"] == "q0\nin" and first["choices"][first["answer"]] == "v"
    assert len(first["choices"]) == 4 and set(first["choices"]) <= set("vwxyz")
    assert sorted(second["choices"]) == ["no", "yes"] and second["choices"][second["answer"]] \
        == "yes"
    assert instruction_choices(entries, test, seed=5) == items
