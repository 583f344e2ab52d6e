import io
import json
import queue
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_judge import SLOW, fake_judge

from evals import arena
from evals.arena import model_names, pick_pair, read_prompts, record_battle
from evals.ratings import bradley_terry, read_battles
from evaluate import JudgeError
from gpt import GPTModel, save_model

REPO = Path(__file__).resolve().parents[1]
CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture
def models(tmp_path):
    paths = []
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"{name}.pt")
        save_model(GPTModel(CFG), CFG, paths[-1])
    return paths


class Terminal:
    """The arena as a subprocess: lines typed on its stdin, its stdout read as it comes."""

    def __init__(self, args):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "arena", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines = queue.Queue()
        threading.Thread(target=self.pump, daemon=True).start()

    def pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, marker: str) -> str:
        seen = []
        while True:
            line = self.lines.get(timeout=60)
            if line is None:
                raise AssertionError(f"arena ended before {marker!r}: {''.join(seen)}"
                                     f"{self.proc.stderr.read()}")
            seen.append(line)
            if marker in line:
                return "".join(seen)

    def type(self, text: str):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def test_terminal_arena_hides_names_until_the_vote(models, tmp_path):
    battles = tmp_path / "battles.jsonl"
    term = Terminal([*models[:2], "--battles", battles, "--max-new-tokens", "5", "--seed", "1"])
    before = term.read_until("Type a prompt")
    term.type("Name a colour.")
    before += term.read_until("Your vote")
    assert "=== Model A ===" in before and "=== Model B ===" in before
    assert "Name a colour." in before
    term.type("maybe")  # not a vote: asked again, names still hidden
    before += term.read_until("Your vote")
    assert "'maybe' is not a vote" in before
    for secret in ("alpha", "beta", str(tmp_path)):
        assert secret not in before
    term.type("b")
    reveal = term.read_until("Model A was").splitlines()[-1]
    names = reveal.removeprefix("Model A was ").removesuffix(".").split("; model B was ")
    assert sorted(names) == sorted(map(str, models[:2]))
    term.read_until("Type a prompt")
    term.type("")  # an empty prompt ends the session
    assert "1 battles added to" in term.read_until("battles added to")
    assert term.proc.wait(timeout=60) == 0
    [record] = [json.loads(line) for line in battles.read_text().splitlines()]
    assert [record["model_a"], record["model_b"]] == names
    assert record["winner"] == "model_b" and record["judge"] == "human"
    assert record["prompt"] == "Name a colour." and isinstance(record["answer_a"], str)
    assert read_battles(battles) == [(names[0], names[1], 0.0)]


def test_end_of_input_at_the_vote_records_nothing(models, tmp_path, monkeypatch, capsys):
    battles = tmp_path / "battles.jsonl"
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\nsecond\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("t\n"))  # one vote, then end of input
    arena.main([*map(str, models), "--battles", str(battles), "--prompts", str(prompts),
                "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "1 battles added" in out  # the second prompt's vote never came
    assert out.count("Your vote") == 2 and out.count("Model A was") == 1
    assert json.loads(battles.read_text())["winner"] == "tie"


def test_llm_judge_stands_in_for_the_user(models, tmp_path, capsys):
    battles = tmp_path / "battles.jsonl"
    record_battle(battles, {"model_a": "old", "model_b": "older", "winner": "tie"})
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"instruction": "Say hi.", "input": ""},
                                   {"instruction": "Add 2 and 2.", "input": "numbers"}]))
    with fake_judge(lambda prompt: "A") as judge:  # always the first shown: every battle a tie
        arena.main([*map(str, models), "--names", "a", "b", "c", "--battles", str(battles),
                    "--prompts", str(prompts), "--rounds", "5", "--judge", "openai",
                    "--judge-url", judge.url, "--max-new-tokens", "3",
                    "--quiet"])
    assert len(judge.prompts) == 10  # 5 battles x 2 orders (random models differ in answers)
    assert "Add 2 and 2.\n\nnumbers" in judge.prompts[2]
    lines = [json.loads(line) for line in battles.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["model_a"] == "old"  # earlier battles are kept
    assert {r["winner"] for r in lines[1:]} == {"tie"}
    assert {r["judge"] for r in lines[1:]} == {"openai:llama3"}
    assert "5 battles added" in capsys.readouterr().out
    ratings = bradley_terry([b for b in read_battles(battles) if b[0] != "old"], prior=0)
    assert len(set(round(v, 6) for v in ratings.values())) == 1  # all ties: equal ratings


def test_garbage_verdicts_skip_the_battle(models, tmp_path, capsys):
    battles = tmp_path / "battles.jsonl"
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    with fake_judge(lambda prompt: "no idea", stream=False) as judge:
        arena.main([*map(str, models[:2]), "--battles", str(battles), "--prompts",
                    str(prompts), "--judge", "ollama", "--judge-url", judge.url,
                    "--max-new-tokens", "3", "--quiet"])
    assert not battles.exists()
    out = capsys.readouterr().out
    assert "0 battles added to" in out and "(1 skipped: the judge gave no usable verdict)" in out
    assert len(judge.prompts) == 4  # each order asked twice (one retry), then given up


def test_judge_down_fails_before_loading_models(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    for name in ("unread1.pt", "unread2.pt"):  # files, never read: the judge fails first
        (tmp_path / name).write_bytes(b"x")
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "arena", str(tmp_path / "unread1.pt"),
                        str(tmp_path / "unread2.pt"), "--prompts", str(prompts), "--judge", "ollama",
                        "--judge-url", f"http://127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "cannot reach the judge" in r.stderr


def test_helpers():
    assert model_names(["a.pt", "b.pt"], None) == ["a.pt", "b.pt"]
    with pytest.raises(ValueError, match="must differ"):
        model_names(["a.pt", "b.pt"], ["x", "x"])
    with pytest.raises(ValueError, match="2 names for 3 models"):
        model_names(["a", "b", "c"], ["x", "y"])
    pairs = [pick_pair(random.Random(s), 3) for s in range(40)]
    assert all(i != j for i, j in pairs) and len(set(pairs)) == 6  # every ordered pair occurs


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == [{"instruction": "one", "input": ""},
                                                {"instruction": "two", "input": ""}]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_judge_timeout_keeps_the_battles_so_far(models, tmp_path):
    battles = tmp_path / "battles.jsonl"
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\nsecond\n")
    with fake_judge(lambda p: SLOW if "second" in p else "A") as judge:
        with pytest.raises(JudgeError, match=r"did not answer within 0.5s; the battles so far "
                                             r"are kept in .*battles.jsonl"):
            arena.main([*map(str, models[:2]), "--battles", str(battles), "--prompts",
                        str(prompts), "--judge", "openai", "--judge-url", judge.url,
                        "--judge-timeout", "0.5", "--max-new-tokens", "3", "--quiet"])
    [record] = [json.loads(line) for line in battles.read_text().splitlines()]
    assert record["prompt"] == "first" and record["winner"] == "tie"
