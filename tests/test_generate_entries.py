"""Tests for data/generate_entries.py against a fake LLM on 127.0.0.1 that answers as Ollama
(/api/tags, raw /api/generate, /api/chat; streamed NDJSON or one object) and as an OpenAI-compatible
server (/v1/models, /v1/completions, /v1/chat/completions), with errors, bad JSON and stalls."""
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from data import entry_problem, load_data
from local_server import local_server
from script_loader import REPO, load_script

gen = load_script("data/generate_entries.py")
LLAMA3, LLAMA3_STOPS = gen.PRESETS["llama3"]
SLOW, STALL, NOT_JSON, NO_FIELDS = "<slow>", "<stall>", "<not json>", "<no fields>"


def cut(text):  # the server stopped at max_tokens
    return ("length", text)


def value(obj):  # the reply's text field holds a JSON value that is not a string
    return ("value", obj)


def seed_of(body: dict) -> int:
    return body["options"]["seed"] if "options" in body else body["seed"]


def is_instruction(path: str) -> bool:
    return path in ("/api/generate", "/v1/completions")


def magpie(path: str, body: dict):
    """A model that honours the seed: a new instruction per seed, then an answer that quotes it."""
    if is_instruction(path):
        return f"Write a haiku about the number {seed_of(body)}."
    return "Answer to: " + body["messages"][-1]["content"]


def scripted(instructions: dict | None = None, responses: dict | None = None):
    """magpie, except for the seeds listed (an action per seed for either request)."""
    def policy(path, body):
        table = (instructions if is_instruction(path) else responses) or {}
        return table.get(seed_of(body), magpie(path, body))
    return policy


class LLMHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_bytes(self, status: int, data: bytes, kind: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, obj):
        self.send_bytes(status, json.dumps(obj).encode())

    def do_GET(self):
        self.server.requests.append((self.path, None))
        if self.path == "/api/tags":
            self.send_json(200, {"models": [{"name": "llama3:latest"}, {"name": "phi3:mini"}]})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        action = self.server.policy(self.path, body)
        if action == SLOW:
            self.server.release.wait(10)  # far beyond the client's timeout
        elif action == NOT_JSON:
            self.send_bytes(200, b"<html>busy</html>", "text/html")
        elif action == NO_FIELDS:
            self.send_json(200, {"unexpected": True})
        elif isinstance(action, int):
            self.send_json(action, {"error": "model runner crashed"})
        elif isinstance(action, tuple) and action[0] == "error":  # Ollama's error line
            self.send_ndjson([{"error": action[1]}])
        else:
            kind, text = action if isinstance(action, tuple) else ("text", action)
            self.answer(body, text, "length" if kind == "length" else "stop", action == STALL)

    def answer(self, body: dict, text, reason: str, stall: bool):
        if self.path == "/v1/completions":
            return self.send_json(200, {"choices": [{"text": text, "finish_reason": reason}]})
        if self.path == "/v1/chat/completions":
            return self.send_json(200, {"choices": [{"finish_reason": reason, "message": {
                "role": "assistant", "content": text}}]})

        def chunk(piece, done: bool) -> dict:
            obj = {"model": body["model"], "done": done, "done_reason": reason if done else None}
            if self.path == "/api/generate":
                return {**obj, "response": piece}
            return {**obj, "message": {"role": "assistant", "content": piece}}
        if not (self.server.stream and body["stream"]) or not isinstance(text, str):
            return self.send_json(200, chunk(text, True))  # one object, as with "stream": false
        pieces = [chunk(text[i:i + 4], False) for i in range(0, len(text), 4)]
        self.send_ndjson(pieces + [chunk("", True)], stall)

    def send_ndjson(self, objects: list, stall: bool = False):
        """Ollama's stream: chunked transfer, one JSON object per line."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for obj in objects:
            data = (json.dumps(obj) + "\n").encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            if stall:  # the stream stops after its first line
                self.server.release.wait(10)
                return
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def llm():
    with local_server(LLMHandler) as srv:
        srv.policy, srv.stream, srv.requests, srv.release = magpie, True, [], threading.Event()
        srv.handle_error = lambda *args: None  # a stalled reply's client has gone away
        yield srv
        srv.release.set()


def posts(srv) -> list[tuple[str, dict]]:
    return [(path, body) for path, body in srv.requests if body is not None]


def args(srv, out: Path, n: int, backend: str = "ollama", *extra: str) -> list[str]:
    model = "llama3" if backend == "ollama" else "tiny"
    return ["--backend", backend, "--url", srv.url, "--model", model, "--out", str(out),
            "--n", str(n), "--timeout", "2", "--quiet", *extra]


def run(argv: list[str]) -> int:
    """main() under cli_main, as the command runs it: the exit status (0 when it returns)."""
    try:
        gen.cli_main(lambda: gen.main(argv))
    except SystemExit as e:
        return e.code
    return 0


# ---- pieces --------------------------------------------------------------------------------------
def test_templates_presets_and_literal_text():
    assert gen.read_template("llama3") == LLAMA3
    assert LLAMA3.endswith("<|end_header_id|>\n\n")
    assert gen.read_template("<start_of_turn>user\\n") == "<start_of_turn>user\n"
    assert gen.template_markers(LLAMA3 + "[INST]") == ["<|begin_of_text|>", "<|start_header_id|>",
                                                       "<|end_header_id|>", "[INST]"]


@pytest.mark.parametrize("instruction,echo", [
    ("<|start_header_id|>user<|end_header_id|>", True), ("User", True), ("user:", True),
    ("What does a user of <b>HTML</b> write?", False), ("Name a user interface.", False)])
def test_template_echo(instruction, echo):
    assert gen.echoes_template(instruction, LLAMA3) == echo


def test_cut_at_stops_and_duplicate_key():
    assert gen.cut_at_stops("Hi?<|eot_id|><|start_header_id|>assistant", LLAMA3_STOPS) == "Hi?"
    a = {"instruction": "Name  a FRUIT!", "input": ""}
    assert gen.entry_key(a) == gen.entry_key({"instruction": "name the fruit"})
    assert gen.entry_key(a) != gen.entry_key({"instruction": "Name a fruit", "input": "red"})


@pytest.mark.parametrize("flags", [["--n", "-1"], ["--n", "0"], ["--n", "x"], ["--timeout", "0"],
                                   ["--save-every", "0"], ["--temperature", "-1"],
                                   ["--seed", "-5"], ["--template", ""], ["--backend", "vllm"]])
def test_bad_flags_exit_2_at_parse_time(flags, capsys):
    with pytest.raises(SystemExit) as e:
        gen.parse_args(["--out", "x.json", "--n", "3", *flags])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


# ---- requests and entries, per backend -----------------------------------------------------------
@pytest.mark.parametrize("backend,stream", [("ollama", True), ("ollama", False), ("openai", True)])
def test_requests_follow_the_book_and_entries_load(llm, tmp_path, capsys, backend, stream):
    llm.stream, out = stream, tmp_path / "gen.json"
    assert run(args(llm, out, 3, backend)) == 0
    sent = posts(llm)
    assert [p for p, _ in sent] == (["/api/generate", "/api/chat"] if backend == "ollama"
                                    else ["/v1/completions", "/v1/chat/completions"]) * 3
    assert [seed_of(b) for _, b in sent] == [123, 123, 124, 124, 125, 125]
    (_, first), (_, second) = sent[:2]
    assert first["prompt"] == LLAMA3 and "messages" not in first
    assert second["messages"] == [{"role": "user", "content": magpie(*sent[0])}]
    if backend == "ollama":
        assert first["raw"] is True and "raw" not in second
        assert first["options"] == {"seed": 123, "temperature": 1.0, "top_p": 1.0,
                                    "num_predict": gen.INSTRUCTION_TOKENS, "stop": LLAMA3_STOPS}
        assert second["options"]["num_predict"] == 1024 and "stop" not in second["options"]
    else:
        assert first["stop"] == LLAMA3_STOPS and first["max_tokens"] == gen.INSTRUCTION_TOKENS
        assert second["max_tokens"] == 1024 and first["top_p"] == 1.0
    entries = load_data(str(out))
    model = "llama3" if backend == "ollama" else "tiny"
    assert entries[0] == {"instruction": "Write a haiku about the number 123.", "input": "",
                          "output": "Answer to: Write a haiku about the number 123.",
                          "generator": f"{backend}:{model}", "seed": 123}
    assert all(entry_problem(e) is None for e in entries) and len(entries) == 3
    assert capsys.readouterr().out == f"{out}: 3 entries, 3 new; skipped none\n"


def test_template_preset_and_literal_flags(llm, tmp_path):
    assert run(args(llm, tmp_path / "a.json", 1, "ollama", "--template", "chatml")) == 0
    assert run(args(llm, tmp_path / "b.json", 1, "openai", "--template", "<start_of_turn>user\\n",
                    "--stop", "<end_of_turn>")) == 0
    chatml, literal = posts(llm)[0][1], posts(llm)[2][1]
    assert chatml["prompt"] == "<|im_start|>user\n"
    assert chatml["options"]["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert literal["prompt"] == "<start_of_turn>user\n" and literal["stop"] == ["<end_of_turn>"]


# ---- skipped answers -----------------------------------------------------------------------------
def test_malformed_and_duplicate_answers_are_skipped_and_counted(llm, tmp_path, capsys):
    out = tmp_path / "gen.json"
    out.write_text(json.dumps([{"instruction": "Name a fruit.", "input": "", "output": "Apple."}]))
    llm.policy = scripted(instructions={
        123: "", 124: "  \n ", 125: value(None), 126: value(7), 127: cut("Write a very long"),
        128: "<|begin_of_text|>user", 129: "user",  # a stop would cut "<|start_header_id|>"
        130: "Real question?<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
        131: "real QUESTION", 132: "name the fruit!", 133: "Second one."},
        responses={133: "", 134: cut("On and on"), 135: "\ud800"})
    assert run(args(llm, out, 4)) == 0
    entries = load_data(str(out))
    assert [e["instruction"] for e in entries] == ["Name a fruit.", "Real question?",
                                                   magpie("/api/generate", {"seed": 136}),
                                                   magpie("/api/generate", {"seed": 137})]
    assert capsys.readouterr().out == (f"{out}: 4 entries, 3 new; skipped 12: 3 empty, "
                                       "3 not text, 2 too long, 2 template echo, 2 duplicate\n")
    chats = [seed_of(b) for p, b in posts(llm) if p == "/api/chat"]
    assert chats == [130, 133, 134, 135, 136, 137]  # skipped instructions get no chat


def test_a_server_that_ignores_the_seed_stops_the_run(llm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gen, "SKIPS_IN_A_ROW", 4)
    llm.policy = lambda path, body: "Same question." if is_instruction(path) else "Same answer."
    out = tmp_path / "gen.json"
    assert run(args(llm, out, 3)) == 2
    err = capsys.readouterr().err
    assert "the last 4 answers were all skipped (skipped 4: 4 duplicate)" in err
    assert "1 of 3 entries are in" in err and len(load_data(str(out))) == 1


# ---- saving and resuming -------------------------------------------------------------------------
def test_file_is_rewritten_every_k_entries(llm, tmp_path):
    out, seen = tmp_path / "gen.json", {}

    def policy(path, body):  # how many entries the file holds when each attempt starts
        if is_instruction(path):
            seen[seed_of(body)] = len(json.loads(out.read_text())) if out.exists() else 0
        return magpie(path, body)
    llm.policy = policy
    assert run(args(llm, out, 5, "ollama", "--save-every", "2")) == 0
    assert seen == {123: 0, 124: 0, 125: 2, 126: 2, 127: 4}
    assert len(load_data(str(out))) == 5


@pytest.mark.parametrize("fail_at", [6, 7])  # seed 126's instruction request, its response's
def test_resume_after_server_errors_repeats_no_finished_request(llm, tmp_path, capsys, fail_at):
    out, served = tmp_path / "gen.json", []
    skips_125 = scripted(instructions={125: ""})  # a skipped attempt: no entry records its seed

    def policy(path, body):
        if len(served) == fail_at - 1:
            return 500
        served.append((path, seed_of(body)))
        return skips_125(path, body)
    llm.policy = policy
    assert run(args(llm, out, 5)) == 2
    err = capsys.readouterr().err
    assert "server at" in err and "HTTP 500" in err and "run the same command again" in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    first = load_data(str(out))
    assert [e["seed"] for e in first] == [123, 124]
    llm.policy, llm.requests = skips_125, []
    assert run(args(llm, out, 5)) == 0
    again = [(p, seed_of(b)) for p, b in posts(llm)]
    assert again[0] == ("/api/generate", 126)  # after the skipped 125, at the attempt cut short
    repeated = set(again) & set(served)
    assert repeated == (set() if fail_at == 6 else {("/api/generate", 126)})  # 126 had no answer
    final = load_data(str(out))
    assert final[:2] == first and [e["seed"] for e in final] == [123, 124, 126, 127, 128]
    assert len({gen.entry_key(e) for e in final}) == 5


def test_ctrl_c_keeps_the_entries_and_the_next_seed(llm, tmp_path, capsys, monkeypatch):
    make_entry = gen.make_entry

    def interrupted(server, recipe, seed, seen):
        if seed == 125:
            raise KeyboardInterrupt
        return make_entry(server, recipe, seed, seen)
    monkeypatch.setattr(gen, "make_entry", interrupted)
    out = tmp_path / "gen.json"
    assert run(args(llm, out, 4)) == 130
    assert "2 of 4 entries are in" in capsys.readouterr().err
    assert len(load_data(str(out))) == 2
    assert json.loads((tmp_path / "gen.json.progress").read_text()) == {"next_seed": 125}


def test_a_full_file_needs_no_server(llm, tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert run(args(llm, out, 2)) == 0
    llm.requests = []
    assert run(args(llm, out, 2)) == 0
    assert llm.requests == [] and "nothing to do" in capsys.readouterr().out


def test_an_unreadable_output_file_is_left_alone(llm, tmp_path, capsys):
    out = tmp_path / "gen.json"
    out.write_text('{"not": "a list"}')
    assert run(args(llm, out, 2)) == 2
    assert "line 1 has no 'instruction' field" in capsys.readouterr().err and llm.requests == []
    assert out.read_text() == '{"not": "a list"}'


# ---- errors: before any work, and mid-run --------------------------------------------------------
def test_unreachable_server_fails_before_any_work(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "gen.json"
    assert run(["--url", f"http://127.0.0.1:{port}", "--out", str(out), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the server at") and err.count("\n") == 1
    assert not out.exists()


def test_missing_ollama_model_fails_before_any_work(llm, tmp_path, capsys):
    argv = args(llm, tmp_path / "gen.json", 2)
    argv[argv.index("llama3")] = "mistral"
    assert run(argv) == 2
    assert "has no model 'mistral' (try `ollama pull mistral`)" in capsys.readouterr().err
    assert posts(llm) == [] and not (tmp_path / "gen.json").exists()


@pytest.mark.parametrize("backend,action,message", [
    ("openai", NOT_JSON, "bad reply from the server at"),
    ("ollama", NOT_JSON, "bad reply from the server at"),
    ("ollama", NO_FIELDS, "sent a reply without the expected fields"),
    ("openai", NO_FIELDS, "sent a reply without the expected fields"),
    ("ollama", ("error", "model requires more system memory"), "model requires more system"),
    ("openai", 404, "answered HTTP 404: {\"error\": \"model runner crashed\"}")])
def test_bad_replies_stop_the_run_and_keep_the_file(llm, tmp_path, capsys, backend, action,
                                                    message):
    llm.policy = scripted(responses={124: action})
    out = tmp_path / "gen.json"
    assert run(args(llm, out, 3, backend)) == 2
    err = capsys.readouterr().err
    assert message in err and "1 of 3 entries are in" in err
    assert [e["seed"] for e in load_data(str(out))] == [123]


@pytest.mark.parametrize("backend,action", [("ollama", SLOW), ("ollama", STALL), ("openai", SLOW)])
def test_a_stalled_server_times_out(llm, tmp_path, capsys, backend, action):
    llm.policy = scripted(instructions={124: action})
    out, start = tmp_path / "gen.json", time.perf_counter()
    assert run(args(llm, out, 3, backend, "--timeout", "0.3")) == 2
    assert time.perf_counter() - start < 3
    assert "did not answer within 0.3s" in capsys.readouterr().err
    assert len(load_data(str(out))) == 1


def test_an_error_before_the_first_entry_writes_no_entries_file(llm, tmp_path):
    llm.policy = lambda path, body: 500
    out = tmp_path / "gen.json"
    assert run(args(llm, out, 2)) == 2
    assert not out.exists()
    assert json.loads((tmp_path / "gen.json.progress").read_text()) == {"next_seed": 123}


# ---- the command, run by path --------------------------------------------------------------------
def test_progress_on_stderr_and_the_command_by_path(llm, tmp_path):
    out = tmp_path / "gen.json"
    argv = [a for a in args(llm, out, 2) if a != "--quiet"]
    done = subprocess.run([sys.executable, "data/generate_entries.py", *argv], cwd=REPO,
                          capture_output=True, timeout=120)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()  # bytes: "\r" kept as it is
    assert done.returncode == 0, stderr
    assert stdout == f"{out}: 2 entries, 2 new; skipped none\n"
    lines = stderr.split("\r")
    assert lines[0] == "" and lines[1].startswith("entries 0/2, skipped none, ")
    assert lines[-1].startswith("entries 2/2, skipped none, ") and lines[-1].endswith(" s/entry\n")
