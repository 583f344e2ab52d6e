import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_judge import SLOW, fake_judge, prefer, shown

from evals import pairwise
from evals.pairwise import judge_pair, parse_choice, summarize, win_rate
from evaluate import JudgeError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), "pairwise", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- win rates ---------------------------------------------------------------------------------
def test_win_rate_hand_computed():
    # preference - 1 = [1, 1, 0.5, 0, 0.5]: mean 0.6 -> 60; deviations .4 .4 -.1 -.6 -.1,
    # squares sum 0.70, sample variance 0.70 / 4 = 0.175, SE = sqrt(0.175 / 5) = 0.18708
    w = win_rate([2, 2, 1.5, 1, 0, None])  # AlpacaEval's old 0 is a draw; None is not annotated
    assert w["win_rate"] == pytest.approx(60.0)
    assert w["standard_error"] == pytest.approx(100 * math.sqrt(0.175 / 5))
    assert (w["n_wins"], w["n_wins_base"], w["n_draws"], w["n_total"], w["n_unannotated"]) == \
        (2, 1, 2, 5, 1)
    # a weighted annotator's fractional preferences: mean of (1.8 - 1, 1.2 - 1) = 0.5
    assert win_rate([1.8, 1.2])["win_rate"] == pytest.approx(50.0)
    one = win_rate([2])
    assert one["win_rate"] == 100.0 and one["standard_error"] is None
    assert win_rate([None])["win_rate"] is None


def test_summarize_groups_by_model_pair_and_dataset():
    records = [{"generator_2": "m", "generator_1": "base", "dataset": "x", "preference": 2.0},
               {"generator_2": "m", "generator_1": "base", "dataset": "y", "preference": 1.0},
               {"generator_2": "n", "generator_1": "base", "dataset": "x", "preference": 1.5}]
    s = summarize(records)
    assert [(x["model"], x["baseline"]) for x in s] == [("m", "base"), ("n", "base")]
    assert s[0]["overall"]["win_rate"] == 50.0
    assert s[0]["tasks"]["x"]["win_rate"] == 100.0 and s[0]["tasks"]["y"]["win_rate"] == 0.0


@pytest.mark.parametrize("reply,choice", [
    ("A", 1), ("b", 2), ("**B**", 2), ("(a)", 1), ("Response A", 1), ("Output (b).", 2),
    ("The better one is Response B, because it answers.", 2),
    ("Response A is better than Response B", None), ("Both are fine", None), ("", None),
    ("A response about cats", None),
])
def test_parse_choice(reply, choice):
    assert parse_choice(reply) == choice


def test_judge_pair_position_swap_rule():
    calls = []

    def first(prompt):  # always prefers whatever is shown first
        calls.append(shown(prompt))
        return "A"
    result = judge_pair(first, "Say hi.", "hello", "hi there")
    assert result["preference"] == 1.5 and result["preferences_by_order"] == [1, 2]
    assert calls == [("hello", "hi there"), ("hi there", "hello")]  # asked in both orders
    fair = prefer("good")
    assert judge_pair(fair, "q", "bad", "good")["preference"] == 2.0
    assert judge_pair(fair, "q", "good", "bad")["preference"] == 1.0
    assert judge_pair(lambda p: 1 / 0, "q", "same", "same")["preference"] == 1.5  # no call


# ---- against a fake judge on 127.0.0.1 -----------------------------------------------------------
def write_pair_files(tmp_path):
    """A in the book's response shape, B in AlpacaEval's model_outputs shape (input joined)."""
    a = [{"instruction": "Q1", "input": "ctx", "output": "ref", "model_response": "good one",
          "task": "t1"},
         {"instruction": "Q2", "input": "", "output": "ref", "model_response": "good two",
          "task": "t1"},
         {"instruction": "Q3", "input": "", "output": "ref", "model_response": "good three",
          "task": "t2"},
         {"instruction": "Q4", "input": "", "output": "ref", "model_response": "bad four",
          "task": "t2"},
         {"instruction": "Q5", "input": "", "output": "ref", "model_response": "same",
          "task": "t2"},
         {"instruction": "only in A", "input": "", "output": "ref", "model_response": "x"}]
    b = [{"instruction": "Q5", "output": "same", "generator": "base"},
         {"instruction": "Q1\n\nctx", "output": "bad one", "generator": "base"},
         {"instruction": "Q2", "output": "bad two", "generator": "base"},
         {"instruction": "Q3", "output": "good too", "generator": "base"},
         {"instruction": "Q4", "output": "good four", "generator": "base"}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    return tmp_path / "a.json", tmp_path / "b.json"


def test_ollama_streamed_judge_gives_alpacaeval_win_rate_and_annotations(tmp_path):
    a, b = write_pair_files(tmp_path)
    ann, out = tmp_path / "annotations.json", tmp_path / "wr.json"
    with fake_judge(prefer("good")) as judge:
        pairwise.main([str(a), str(b), "--names", "mine", "theirs", "--judge", "ollama",
                       "--judge-url", judge.url, "--annotations",
                       str(ann), "--json", str(out), "--quiet"])
    # Q1, Q2: A wins (2); Q3 both good: the judge picks the first shown each time, a tie (1.5);
    # Q4: B wins (1); Q5 identical: a tie without asking. Same as the hand example: 60.0
    assert len(judge.prompts) == 8  # 4 pairs x 2 orders
    s = json.loads(out.read_text())[0]
    assert (s["model"], s["baseline"]) == ("mine", "theirs")
    assert s["overall"]["win_rate"] == pytest.approx(60.0)
    assert s["overall"]["standard_error"] == pytest.approx(100 * math.sqrt(0.175 / 5))
    # t1: Q1, Q2 both won; t2: tie, loss, tie = (0.5 + 0 + 0.5) / 3
    assert s["tasks"]["t1"]["win_rate"] == 100.0
    assert s["tasks"]["t2"]["win_rate"] == pytest.approx(100 / 3)
    records = json.loads(ann.read_text())
    assert [r["preference"] for r in records] == [2.0, 2.0, 1.5, 1.0, 1.5]
    first = records[0]
    assert first["instruction"] == "Q1\n\nctx" and first["output_1"] == "bad one"
    assert first["output_2"] == "good one" and first["generator_1"] == "theirs"
    assert first["generator_2"] == "mine" and first["annotator"] == "ollama:llama3"
    assert "Q1\n\nctx" in judge.prompts[0] and shown(judge.prompts[0]) == ("bad one", "good one")
    # recomputed from the annotations alone, through evaluate.py, with no judge at all
    r = run_cli("--annotations", ann)
    assert r.returncode == 0, r.stderr
    assert "| mine | theirs | **all** | 60.0 | 18.7 | 2 | 1 | 2 | 5 |" in r.stdout


@pytest.mark.parametrize("kind,stream", [("openai", False), ("ollama", False)])
def test_judge_that_always_prefers_the_first_answer_yields_all_ties(tmp_path, kind, stream):
    a, b = write_pair_files(tmp_path)
    out = tmp_path / "wr.json"
    with fake_judge(lambda prompt: "A", stream=stream) as judge:
        pairwise.main([str(a), str(b), "--judge", kind, "--judge-url", judge.url,
                       "--json", str(out), "--quiet"])
    w = json.loads(out.read_text())[0]["overall"]
    assert (w["win_rate"], w["n_draws"], w["n_wins"], w["n_wins_base"]) == (50.0, 5, 0, 0)


def test_garbage_answers_are_retried_left_out_and_asked_again_later(tmp_path):
    a, b = write_pair_files(tmp_path)
    ann, out = tmp_path / "annotations.json", tmp_path / "wr.json"
    with fake_judge(lambda prompt: "Both are lovely.") as judge:
        pairwise.main([str(a), str(b), "--judge", "ollama", "--judge-url", judge.url,
                       "--annotations", str(ann), "--json", str(out),
                       "--quiet"])
    assert len(judge.prompts) == 16  # 4 pairs x 2 orders x (ask + one retry)
    w = json.loads(out.read_text())[0]["overall"]
    assert (w["n_total"], w["n_unannotated"]) == (1, 4)  # only the identical pair has a verdict
    assert [r["preference"] for r in json.loads(ann.read_text())] == [None] * 4 + [1.5]
    with fake_judge(prefer("good")) as judge:
        pairwise.main([str(a), str(b), "--judge", "ollama", "--judge-url", judge.url,
                       "--annotations", str(ann), "--json", str(out),
                       "--quiet"])
    assert len(judge.prompts) == 8
    assert json.loads(out.read_text())[0]["overall"]["win_rate"] == pytest.approx(60.0)


def test_timeout_keeps_the_annotations_so_far_and_a_rerun_goes_on(tmp_path):
    a, b = write_pair_files(tmp_path)
    ann = tmp_path / "annotations.json"
    fair = prefer("good")
    with fake_judge(lambda p: SLOW if "Q3" in p else fair(p)) as judge:
        with pytest.raises(JudgeError, match=r"did not answer within 0.5s; the pairs judged "
                                             r"so far are kept in .*annotations.json"):
            pairwise.main([str(a), str(b), "--judge", "openai", "--judge-url", judge.url,
                           "--judge-timeout", "0.5",
                           "--annotations", str(ann), "--quiet"])
    assert [r["preference"] for r in json.loads(ann.read_text())] == [2.0, 2.0]
    with fake_judge(fair) as judge:
        pairwise.main([str(a), str(b), "--judge", "openai", "--judge-url", judge.url,
                       "--annotations", str(ann), "--quiet"])
    assert len(judge.prompts) == 4  # Q1 and Q2 were not asked again
    assert len(json.loads(ann.read_text())) == 5


def test_a_failed_run_keeps_older_annotations_it_had_not_reached(tmp_path):
    a, b = write_pair_files(tmp_path)
    ann = tmp_path / "annotations.json"
    old = {"instruction": "Q4", "output_1": "good four", "output_2": "bad four",
           "generator_1": "base", "generator_2": str(a), "preference": 1.0}
    other = {"instruction": "Q9", "output_1": "x", "output_2": "y", "generator_1": "p",
             "generator_2": "q", "preference": 2.0}
    ann.write_text(json.dumps([other, old]))
    fair = prefer("good")
    with fake_judge(lambda p: SLOW if "Q2" in p else fair(p)) as judge:
        with pytest.raises(JudgeError, match="did not answer"):
            pairwise.main([str(a), str(b), "--judge", "ollama", "--judge-url", judge.url,
                           "--judge-timeout", "0.5", "--annotations", str(ann), "--quiet"])
    saved = json.loads(ann.read_text())
    assert [r["instruction"] for r in saved] == ["Q9", "Q1\n\nctx", "Q4"]
    assert saved[2]["preference"] == 1.0 and saved[0] == other


def test_judge_down_is_one_line_exit_2_and_annotations_untouched(tmp_path):
    a, b = write_pair_files(tmp_path)
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps([{"instruction": "old", "output_1": "x", "output_2": "y",
                                "generator_1": "p", "generator_2": "q", "preference": 2}]))
    before = ann.read_bytes()
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli(a, b, "--judge", "ollama", "--judge-url", url, "--annotations", ann)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and f"cannot reach the judge at {url}" in r.stderr
    assert ann.read_bytes() == before


def test_missing_annotations_without_a_judge_are_named(tmp_path):
    a, b = write_pair_files(tmp_path)
    with pytest.raises(ValueError, match=r"pair 1 \('Q1.*has no annotation; give --judge"):
        pairwise.main([str(a), str(b), "--quiet"])


@pytest.mark.parametrize("content,message", [
    ("{oops", r"a.json: not JSON"),
    ("[]", r"a.json: expected a non-empty JSON list"),
    (json.dumps([{"instruction": "q"}]), r"a.json: entry 0 needs a string 'instruction'"),
])
def test_bad_response_file_is_named(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content)
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "q", "output": "o"}]))
    with pytest.raises(ValueError, match=message):
        pairwise.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_bad_preference_in_annotations_is_one_line_exit_2(tmp_path):
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps([{"instruction": "q", "output_1": "x", "output_2": "y",
                                "preference": 1.5},
                               {"instruction": "q", "output_1": "x", "output_2": "y",
                                "preference": 3}]))
    r = run_cli("--annotations", ann)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "annotations.json: annotation 1: preference 3 is not on AlpacaEval's 1..2 scale" \
        in r.stderr
