import json

import pytest
from evals_helpers import run_evaluate, run_here, save_forced_model, write_json

from evals import squad
from evals.common import normalize_squad


def squad_file(version, articles):
    """A SQuAD file in the published layout: articles are (title, context, [qa])."""
    return {"version": version, "data": [
        {"title": title, "paragraphs": [{"context": context, "qas": qas}]}
        for title, context, qas in articles]}


def qa(qid, answers, impossible=None):
    item = {"id": qid, "question": f"question {qid}?",
            "answers": [{"text": a, "answer_start": 0} for a in answers]}
    if impossible is not None:
        item["is_impossible"] = impossible
        if impossible:
            item["plausible_answers"] = [{"text": "plausible", "answer_start": 0}]
    return item


@pytest.mark.parametrize("text,expected", [
    ("The  U.S.  Army!", "us army"),        # ASCII punctuation deleted, not spaced
    ("an apple a day", "apple day"),        # articles are whole words
    ("Theater", "theater"),                 # ... so "the" inside a word stays
    ("A-team", "ateam"),                    # "-" deleted: no article left to drop
    ("Café’s", "café’s"),                   # unicode ’ is not in string.punctuation
    ("the€", "€"),                          # \b sees a boundary before the € sign
    ("  the ", ""),                         # an article alone normalises to nothing
])
def test_normalize_squad_follows_the_official_script(text, expected):
    assert normalize_squad(text) == expected


V11 = squad_file("1.1", [
    ("Mars", "Mars is the Red Planet. Olympus Mons is its volcano.",
     [qa("m1", ["the Red Planet", "Red Planet"]), qa("m2", ["Olympus Mons"]), qa("m3", ["two"])]),
    ("Venus", "Venus is hot.", [qa("v1", ["Venus", "Venus planet"])]),
])
V11_PREDICTIONS = {"m1": "red planet.", "m2": "the volcano Olympus Mons", "v1": ""}


def test_v11_scores_by_hand():
    v2, questions = squad.read_squad_data(V11, "dev.json")
    assert not v2
    scores = squad.score_squad(questions, V11_PREDICTIONS, v2)
    # m1: "red planet" = normalised gold 2 -> EM 1, F1 1
    # m2: pred "volcano olympus mons" (3 tokens) vs "olympus mons" (2): 2 shared,
    #     P 2/3, R 1 -> F1 = 2 * 2/3 / (5/3) = 0.8; EM 0
    # m3: missing -> 0, 0 (v1.1 counts it in the total)
    # v1: "" -> EM 0, and F1 0 (v1.1: nothing shared, even for an empty gold)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * 1.8 / 4)
    assert scores["total"] == 4 and scores["missing"] == 1
    assert scores["by_title"]["Mars"]["f1"] == pytest.approx(100 * 1.8 / 3)
    assert scores["by_title"]["Venus"] == {"n": 1, "exact": 0.0, "f1": 0.0}


V20 = squad_file("v2.0", [
    ("Paris", "Paris is the capital of France. The tower was built in 1889 by Gustave Eiffel.", [
        qa("p1", ["Paris", "Paris, France"], False),
        qa("p2", ["1889"], False),
        qa("p3", [], True),
        qa("p4", [], True),
        qa("p5", [], True),
        qa("p6", [" a ", "Gustave Eiffel"], False)]),
])
V20_PREDICTIONS = {"p1": "paris france", "p2": "", "p3": "", "p4": "the", "p5": "Eiffel",
                   "p6": "Eiffel"}


def test_v20_scores_with_no_answer_handling_by_hand():
    v2, questions = squad.read_squad_data(V20, "dev-v2.0.json")
    assert v2
    scores = squad.score_squad(questions, V20_PREDICTIONS, v2)
    # p1: "paris france" equals "Paris, France" normalised -> 1, 1
    # p2: "" for an answerable question -> EM 0, F1 0 (one side empty)
    # p3: "" for an unanswerable one -> gold [""] -> 1, 1
    # p4: "the" normalises to "" -> no answer -> 1, 1
    # p5: an answer where there is none -> 0, 0
    # p6: gold " a " normalises to "" and is dropped -> ["Gustave Eiffel"];
    #     "eiffel": P 1, R 1/2 -> F1 2/3; EM 0
    assert scores["exact"] == pytest.approx(100 * 3 / 6)
    assert scores["f1"] == pytest.approx(100 * (3 + 2 / 3) / 6)
    assert scores["HasAns_total"] == 3 and scores["NoAns_total"] == 3
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)
    assert scores["HasAns_f1"] == pytest.approx(100 * (5 / 3) / 3)
    assert scores["NoAns_exact"] == pytest.approx(200 / 3)
    assert scores["NoAns_f1"] == pytest.approx(200 / 3)
    # a missing prediction counts 0 (the official v2.0 script would stop on it)
    missing = dict(V20_PREDICTIONS)
    del missing["p3"]
    assert squad.score_squad(questions, missing, v2)["NoAns_exact"] == pytest.approx(100 / 3)


def test_model_no_answer_becomes_the_empty_prediction():
    assert squad.official_answer(" Unanswerable.\n", v2=True) == ""
    assert squad.official_answer(" Unanswerable.", v2=False) == "Unanswerable."
    assert squad.official_answer(" Paris ", v2=True) == "Paris"


def test_cli_predictions_mode_report_and_json(tmp_path):
    data = write_json(tmp_path / "dev-v2.0.json", V20)
    preds = write_json(tmp_path / "pred.json", V20_PREDICTIONS)
    r = run_evaluate("squad", data, "--predictions", preds, "--json", tmp_path / "s.json",
                     "--report", tmp_path / "r.md")
    assert r.returncode == 0, r.stderr
    assert "| **overall** | 6 | 50.0 | 61.1 |" in r.stdout
    assert "| NoAns | 3 | 66.7 | 66.7 |" in r.stdout
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["exact"] == pytest.approx(50.0) and scores["total"] == 6
    assert (tmp_path / "r.md").read_text().startswith("## SQuAD v2.0: ")


def test_cli_model_mode_writes_official_predictions(tmp_path, capsys):
    model = save_forced_model(tmp_path / "model.pt", " Paris")
    long_context = "Paris is the capital of France. " * 200  # ~1400 tokens: cut to fit 256
    data = squad_file("1.1", [("Paris", long_context, [qa("a", ["Paris"]), qa("b", ["France"])])])
    path = write_json(tmp_path / "dev.json", data)
    r = run_here(capsys, "squad", path, "--model-path", model, "--max-new-tokens", "2",
                     "--output", tmp_path / "pred.json", "--style", "raw")
    assert r.returncode == 0, r.stderr
    # the model says " Paris Paris": right for a (F1 2/3: P 1/2, R 1), wrong for b
    assert json.loads((tmp_path / "pred.json").read_text()) == {"a": "Paris Paris",
                                                                "b": "Paris Paris"}
    assert "| **overall** | 2 | 0.0 | 33.3 |" in r.stdout
    assert "generated 2/2" in r.stderr


@pytest.mark.parametrize("content,message", [
    ("{oops", r"dev.json: not JSON"),
    (json.dumps({"version": "1.1"}), r"dev.json: missing 'data'"),
    (json.dumps({"data": []}), r"dev.json: no questions"),
    (json.dumps(squad_file("1.1", [("T", "c", [qa("x", ["a"]), {"id": "y", "answers": []}])])),
     r"dev.json: data\[0\].paragraphs\[0\].qas\[1\]: missing 'question'"),
    (json.dumps(squad_file("1.1", [("T", "c", [qa("x", [])])])),
     r"qas\[0\]: no answers"),
    (json.dumps(squad_file("1.1", [("T", 5, [])])),
     r"data\[0\].paragraphs\[0\]: 'context' should be str, got int"),
])
def test_cli_bad_file_is_one_line_exit_2(tmp_path, content, message, capsys):
    import re
    path = tmp_path / "dev.json"
    path.write_text(content)
    preds = write_json(tmp_path / "pred.json", {})
    r = run_here(capsys, "squad", path, "--predictions", preds)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and re.search(message, r.stderr), r.stderr


def test_cli_bad_predictions_and_mode(tmp_path, capsys):
    data = write_json(tmp_path / "dev.json", V11)
    bad = write_json(tmp_path / "pred.json", {"m1": 3})
    r = run_here(capsys, "squad", data, "--predictions", bad)
    assert r.returncode == 2 and "pred.json: the answer for 'm1' should be a string" in r.stderr
    r = run_here(capsys, "squad", data)
    assert r.returncode == 2 and "give either --model-path" in r.stderr
