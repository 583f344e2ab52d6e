import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import evaluate
from evaluate import (JudgeError, answer_contained, ask_judge, check_judge, exact_match,
                      judge_entries, lcs_length, normalize_answer, parse_score, render_report,
                      rouge_l, score_entries, score_entry, token_f1)

REPO = Path(__file__).resolve().parents[1]


def entry(response, output, **extra):
    return {"instruction": "Answer.", "input": "", "output": output, "model_response": response,
            **extra}


# ---- offline scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("The  Cat, sat!", "cat sat"),
    ("An apple a day", "apple day"),
    ("U.S.A. — well-known", "usa wellknown"),
    ("  \n\t ", ""),
    ("Theory of THE anthem", "theory of anthem"),  # only whole-word articles go
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert exact_match("The Answer!", "answer") == 1.0
    assert exact_match("answers", "answer") == 0.0


def test_answer_contained_matches_whole_words_only():
    assert answer_contained("The answer is Paris.", "paris") == 1.0
    assert answer_contained("Parisian food", "Paris") == 0.0
    assert answer_contained("it is New York City", "new york") == 1.0
    assert answer_contained("anything", "The") == 0.0  # an answer that normalises to nothing
    assert answer_contained("", "the") == 1.0


def test_token_f1_hand_worked():
    # response [cat, sat], reference [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # tokens count with multiplicity: one shared "cat", P = 1/3, R = 1, F1 = 0.5
    assert token_f1("cat cat cat", "cat") == pytest.approx(0.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_lcs_length_classic_example():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("AB")) == 0


def test_rouge_l_hand_worked_and_order_sensitive():
    # [police, kill, gunman] vs [police, killed, gunman]: LCS 2, P = R = 2/3
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(2 / 3)
    # same bag of words in another order: token F1 is perfect, ROUGE-L is not (LCS "police killed")
    assert token_f1("the gunman police killed", "police killed the gunman") == 1.0
    assert rouge_l("the gunman police killed", "police killed the gunman") == pytest.approx(2 / 3)
    # LCS 3 of response length 4 and reference length 3: P = 3/4, R = 1, F = 6/7
    assert rouge_l("a b c d x", "b c d") == pytest.approx(6 / 7)
    assert rouge_l("x", "y") == 0.0


def test_score_entry_uses_answer_field_when_present():
    e = entry("paris", "The capital of France is Paris.", answer="Paris")
    assert score_entry(e)["exact_match"] == 1.0 and score_entry(e)["answer_contained"] == 1.0
    e = entry("It is Paris.", "The capital of France is Paris.", answer="Paris")
    assert score_entry(e)["exact_match"] == 0.0 and score_entry(e)["answer_contained"] == 1.0
    e = entry("The capital of France is Paris", "The capital of France is Paris.", answer="Paris")
    assert score_entry(e)["exact_match"] == 1.0  # equal to the output counts too
    no_answer = score_entry(entry("x", "y"))
    assert no_answer["answer_contained"] is None and no_answer["judge_score"] is None


def test_score_entries_overall_and_per_task():
    entries = [entry("yes", "yes", task="qa", answer="yes", judge_score=80),
               entry("no", "yes", task="qa", answer="yes"),
               entry("a b", "a b c", task="sum")]
    s = score_entries(entries)
    assert s["overall"]["n"] == 3
    assert s["overall"]["exact_match"] == pytest.approx(1 / 3)
    assert s["overall"]["answer_contained"] == 0.5 and s["overall"]["answer_contained_n"] == 2
    assert s["overall"]["judge_score"] == 80 and s["overall"]["judge_score_n"] == 1
    assert set(s["tasks"]) == {"qa", "sum"}
    assert s["tasks"]["qa"]["token_f1"] == 0.5
    # "a b" normalises to [b]; "a b c" to [b, c]: F1 = 2 / 3
    assert s["tasks"]["sum"]["token_f1"] == pytest.approx(2 / 3)
    assert s["tasks"]["sum"]["answer_contained"] is None


def test_render_report_table_and_worst_entries_side_by_side():
    entries = [entry("good answer", "good answer", task="t1"),
               entry("bad | one\nline two", "the expected text", task="t2", judge_score=None),
               entry("half right", "half wrong", task="t1")]
    text = render_report(entries, worst=2, source="resp.json")
    assert text.startswith("# Evaluation of resp.json")
    assert "| **all** | 3 | 33.3 |" in text and "| t1 | 2 |" in text and "| t2 | 1 |" in text
    assert "2 worst entries (by ROUGE-L)" in text
    assert "bad \\| one<br>line two" in text  # cell-safe
    worst = text.split("worst entries")[1]
    assert worst.index("\n| 1 |") < worst.index("\n| 2 |") and "\n| 0 |" not in worst
    assert "Not scored by the judge (1): entries 1" in text
    assert "worst" not in render_report(entries, worst=0)


def test_render_report_ranks_by_judge_score_when_judged():
    entries = [entry("a", "b", judge_score=90), entry("b", "b", judge_score=10), entry("c", "b")]
    worst = render_report(entries, worst=3).split("worst entries (by judge score)")[1]
    assert worst.index("\n| 1 |") < worst.index("\n| 0 |") < worst.index("\n| 2 |")


@pytest.mark.parametrize("reply,score", [
    ("85", 85), (" Score: 92/100", 92), ("0", 0), ("100", 100), ("I'd say 7.5, so 80.", 80),
    ("150, no: 60", 60), ("101", None), ("no idea", None), ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# ---- the judge against a real HTTP server ------------------------------------------------------
class JudgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/api/tags":
            self.send_json(200, {"models": [{"name": "llama3:latest", "size": 1}]})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        action = self.server.replies.pop(0)
        if action == "slow":
            self.server.release.wait(10)  # far beyond the client's timeout
            return
        if isinstance(action, int):
            return self.send_json(action, {"error": "internal judge failure"})
        if self.path == "/v1/chat/completions":
            return self.send_json(200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": action},
                 "finish_reason": "stop"}]})
        # Ollama: chunked NDJSON, the reply in two-character pieces, then a "done" line
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        line = lambda text, done: {"model": body["model"], "done": done,  # noqa: E731
                                   "message": {"role": "assistant", "content": text}}
        pieces = [line(action[i:i + 2], False) for i in range(0, len(action), 2)]
        for obj in pieces + [dict(line("", True), total_duration=1)]:
            data = (json.dumps(obj) + "\n").encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            if action == "stall":  # the stream stops after its first line
                self.server.release.wait(10)
                return
        self.wfile.write(b"0\r\n\r\n")


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.replies, self.requests, self.release = [], [], threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # the slow handler's client has gone; nothing to report


@pytest.fixture
def judge():
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def test_ollama_streamed_reply_is_concatenated(judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-ollama")
    judge.replies = ["Score: 85 out of 100"]
    check_judge("ollama", judge.url, "llama3", timeout=5)
    reply = ask_judge("ollama", judge.url + "/", "llama3", "How good?", timeout=5)
    assert reply == "Score: 85 out of 100"
    path, headers, body = judge.requests[0]
    assert path == "/api/chat" and "Authorization" not in headers
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": "How good?"}],
                    "stream": True, "options": {"temperature": 0, "seed": 123}}


def test_ollama_check_names_a_missing_model(judge):
    with pytest.raises(JudgeError, match="no model 'mistral'.*ollama pull mistral"):
        check_judge("ollama", judge.url, "mistral", timeout=5)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_openai_base_url_with_or_without_v1(judge, suffix, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge.replies = ["70"]
    check_judge("openai", judge.url + suffix, "judge", timeout=5)
    assert ask_judge("openai", judge.url + suffix, "judge", "How good?", timeout=5) == "70"
    path, headers, body = judge.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body == {"model": "judge", "messages": [{"role": "user", "content": "How good?"}],
                    "temperature": 0}


def test_openai_without_key_sends_no_authorization(judge, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge.replies = ["70"]
    ask_judge("openai", judge.url, "judge", "p", timeout=5)
    assert "Authorization" not in judge.requests[0][1]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_reply_without_number_is_retried_once_then_unscored(judge, kind):
    judge.replies = ["I cannot say", "70", "no", "still no"]
    entries = [entry("r1", "o1"), entry("r2", "o2")]
    ask = lambda p: ask_judge(kind, judge.url, "llama3", p, timeout=5)  # noqa: E731
    assert judge_entries(entries, ask, progress=False) == [70, None]
    assert len(judge.requests) == 4
    prompt = judge.requests[0][2]["messages"][0]["content"]
    assert "`r1`" in prompt and "`o1`" in prompt and "0 to 100" in prompt and "Answer." in prompt


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_slow_reply_times_out_with_a_message_naming_the_url(judge, kind):
    judge.replies = ["slow"]
    start = time.monotonic()
    with pytest.raises(JudgeError, match=rf"judge at {judge.url}/\S+ did not answer within 0.3s"):
        ask_judge(kind, judge.url, "llama3", "p", timeout=0.3)
    assert time.monotonic() - start < 3


def test_ollama_stream_that_stalls_times_out(judge):
    judge.replies = ["stall"]
    start = time.monotonic()
    with pytest.raises(JudgeError, match="did not answer within 0.3s"):
        ask_judge("ollama", judge.url, "llama3", "p", timeout=0.3)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_http_500_gives_a_message_naming_the_url(judge, kind):
    judge.replies = [500]
    message = rf"judge at {judge.url}/\S+ answered HTTP 500: .*internal judge failure"
    with pytest.raises(JudgeError, match=message):
        ask_judge(kind, judge.url, "llama3", "p", timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_not_running_is_reported_by_the_check():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(JudgeError, match=f"cannot reach the judge at {url}/api/tags"):
        check_judge("ollama", url, "llama3", timeout=2)


def test_progress_goes_to_stderr(capsys):
    judge_entries([entry("a", "b"), entry("c", "d")], lambda p: "50")
    assert capsys.readouterr().err.replace("\r", "\n").split() == ["judge", "1/2", "judge", "2/2"]


# ---- command line -------------------------------------------------------------------------------
def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_cli_judge_writes_scores_and_report(judge, tmp_path):
    path = tmp_path / "resp.json"
    path.write_text(json.dumps([entry("a", "a", extra_field=1), entry("b", "c")]))
    judge.replies = ["90", "nothing", "nothing"]
    r = run_cli(path, "--judge", "ollama", "--judge-url", judge.url, "--write-scores",
                "--report", tmp_path / "r.md")
    assert r.returncode == 0, r.stderr
    assert "judge 2/2" in r.stderr and "| **all** | 2 | 50.0 |" in r.stdout
    saved = json.loads(path.read_text())
    assert [e["judge_score"] for e in saved] == [90, None] and saved[0]["extra_field"] == 1
    report = (tmp_path / "r.md").read_text()
    assert "90.0 (n=1)" in report and "Not scored by the judge (1): entries 1" in report
    assert "worst entries (by judge score)" in report


def test_cli_judge_down_is_one_line_before_scoring(tmp_path):
    path = tmp_path / "resp.json"
    path.write_text(json.dumps([entry("a", "a")]))
    before = path.read_bytes()
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli(path, "--judge", "openai", "--judge-url", url, "--write-scores")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and url in r.stderr and "judge 0" not in r.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("content,message", [
    (None, "resp.json: no such file"),
    ("{not json", "resp.json: line 1 not valid JSON"),
    ("[]", "resp.json: the list of entries is empty"),
    (json.dumps([{"instruction": "i", "output": 3, "model_response": "r"}]), "entry 0 .*'output'"),
    (json.dumps([{"instruction": "i", "input": "", "output": "o"}]),
     "entry 0 has no string 'model_response'"),
    (json.dumps([entry("a", "b", judge_score="high")]), "non-numeric 'judge_score'"),
])
def test_cli_bad_responses_file_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "resp.json"
    if content is not None:
        path.write_text(content)
    r = run_cli(path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr
