import json
import re

import pytest
from evals_helpers import run_evaluate, run_here, save_forced_model, write_json

from evals import triviaqa
from evals.common import normalize_squad


@pytest.mark.parametrize("text,expected", [
    ("U.S.A.", "u s"),                # punctuation -> space, so the final "a" is an article
    ("A-team", "team"),               # "-" -> space leaves the article "a" alone: dropped
    ("Rock_and_roll", "rock and roll"),
    ("It’s", "it s"),                 # the official script adds ‘ ’ ´ ` to the punctuation
    ("naïve—test", "naïve—test"),     # other unicode marks stay
    ("The Beatles!", "beatles"),
])
def test_normalize_trivia_follows_the_official_script(text, expected):
    assert triviaqa.normalize_trivia(text) == expected


def test_punctuation_becomes_a_space_not_nothing_unlike_squad():
    assert triviaqa.normalize_trivia("U.S.") == "u s" and normalize_squad("U.S.") == "us"


def test_empty_answers_score_as_the_official_script():
    assert triviaqa.score_key("", ["paris"]) == (0.0, 0.0)
    # an empty prediction equals an alias that normalises to nothing, but shares no token
    assert triviaqa.score_key("The", ["a"]) == (1.0, 0.0)


def datum(qid, aliases, human=None, **extra):
    answer = {"Value": aliases[0] if aliases else "", "Aliases": aliases,
              "NormalizedAliases": aliases, "Type": "WikipediaEntity"}
    if human is not None:
        answer["HumanAnswers"] = human
    return {"Question": f"question {qid}?", "QuestionId": qid, "QuestionSource": "x",
            "Answer": answer, "EntityPages": [], "SearchResults": [], **extra}


def dataset(data, domain="Wikipedia", verified=False):
    return {"Data": data, "Domain": domain, "VerifiedEval": verified, "Version": 1.0}


WIKI = dataset([datum("tc_1", ["paris", "city of light"]),
                datum("tc_2", ["united states"], human=["U.S."]),
                datum("tc_3", ["rock and roll"]),
                datum("tc_4", ["four"])])
WIKI_PREDICTIONS = {"tc_1": "The City of Light.", "tc_2": "U.S", "tc_3": "rock music",
                    "other": "ignored"}


def test_wikipedia_scores_by_hand(tmp_path):
    units = triviaqa.read_triviaqa(write_json(tmp_path / "wikipedia-dev.json", WIKI))
    scores = triviaqa.score_triviaqa(units, WIKI_PREDICTIONS)
    # tc_1: "city of light" is an alias -> 1, 1
    # tc_2: "u s" equals the normalised HumanAnswer "U.S." -> 1, 1
    # tc_3: [rock, music] vs [rock, and, roll]: 1 shared, P 1/2, R 1/3 -> F1 0.4; EM 0
    # tc_4: missing -> 0, 0
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * 2.4 / 4)
    assert (scores["common"], scores["denominator"], scores["pred_len"]) == (3, 4, 4)


def page(name, verified=None):
    p = {"Filename": name, "Title": name}
    return p if verified is None else {**p, "DocPartOfVerifiedEval": verified}


def test_web_counts_each_verified_document(tmp_path):
    web = dataset([
        datum("q1", ["yes"], QuestionPartOfVerifiedEval=True,
              EntityPages=[page("W.txt", True)],
              SearchResults=[page("a.txt", True), page("b.txt", False)]),
        datum("q2", ["no"], QuestionPartOfVerifiedEval=False, EntityPages=[page("X.txt", True)]),
    ], domain="Web", verified=True)
    units = triviaqa.read_triviaqa(write_json(tmp_path / "verified-web-dev.json", web))
    # q2 is not verified; b.txt is not a verified document: two keys left, entity pages first
    assert [u["key"] for u in units] == ["q1--W.txt", "q1--a.txt"]
    scores = triviaqa.score_triviaqa(units, {"q1--W.txt": "Yes!", "q1--a.txt": "maybe"})
    assert scores["exact_match"] == pytest.approx(50.0)


def test_cli_predictions_mode(tmp_path):
    data = write_json(tmp_path / "wikipedia-dev.json", WIKI)
    preds = write_json(tmp_path / "pred.json", WIKI_PREDICTIONS)
    r = run_evaluate("triviaqa", data, "--predictions", preds, "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert "| 4 | 50.0 | 60.0 |" in r.stdout and "1 questions have no prediction" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["f1"] == pytest.approx(60.0)


def test_cli_model_with_evidence(tmp_path, capsys):
    model = save_forced_model(tmp_path / "model.pt", " Mars")
    (tmp_path / "ev" / "wikipedia").mkdir(parents=True)
    (tmp_path / "ev" / "wikipedia" / "Mars.txt").write_text("Mars is red. " * 500)
    data = dataset([datum("m1", ["mars", "red planet"], EntityPages=[page("Mars.txt")]),
                    datum("m2", ["venus"], EntityPages=[page("Mars.txt")])])
    path = write_json(tmp_path / "wikipedia-dev.json", data)
    r = run_here(capsys, "triviaqa", path, "--model-path", model, "--evidence", tmp_path / "ev",
                     "--max-new-tokens", "1", "--output", tmp_path / "pred.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "pred.json").read_text()) == {"m1": "Mars", "m2": "Mars"}
    assert "| 2 | 50.0 | 50.0 |" in r.stdout
    (tmp_path / "ev" / "wikipedia" / "Mars.txt").unlink()
    r = run_here(capsys, "triviaqa", path, "--model-path", model, "--evidence", tmp_path / "ev")
    assert r.returncode == 2 and "Mars.txt" in r.stderr and "generated" not in r.stderr


@pytest.mark.parametrize("content,message", [
    ("[1, 2", r"dev.json: not JSON"),
    (json.dumps({"Domain": "Wikipedia"}), r"dev.json: missing 'Data'"),
    (json.dumps(dataset([])), r"dev.json: no questions to score"),
    (json.dumps(dataset([datum("a", ["x"]), {"QuestionId": "b", "Question": "q?",
                                             "Answer": {"Value": "x"}}])),
     r"dev.json: Data\[1\].Answer: missing 'NormalizedAliases'"),
    (json.dumps(dataset([datum("a", ["x", 3])])),
     r"Data\[0\].Answer.NormalizedAliases\[1\]: expected a string"),
    (json.dumps(dataset([datum("a", ["x"])], verified=True)),
     r"Data\[0\]: missing 'QuestionPartOfVerifiedEval'"),
])
def test_cli_bad_file_is_one_line_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "dev.json"
    path.write_text(content)
    r = run_here(capsys, "triviaqa", path, "--predictions", write_json(tmp_path / "p.json", {}))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and re.search(message, r.stderr), r.stderr
