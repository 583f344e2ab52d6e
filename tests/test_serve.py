"""serve/server.py on a real loopback port with a tiny random model, used through http.client."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve import server as serve
from child_io import LineReader, quiet_env, terminal_ctrl_c
from data import format_input, get_tokenizer, response_header, write_json
from generate import encode_prompts, generate, generate_responses
from gpt import load_model, save_model
from test_batching import slow_steps, wait_for
from test_generate import lively_model

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vocab_size": 50257, "context_length": 256, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
EOS = 50256


def start(model, cfg, **settings):
    return start_app(serve.make_app(model, cfg, "tiny-test", **settings))


def start_app(app):
    """The app served on a free loopback port, in a thread; the port is `server.port`."""
    server = serve.make_server(app, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    server.port = server.server_address[1]
    return server


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(lively_model(11, TINY), TINY, path)
    return path


@pytest.fixture(scope="module")
def server(model_file):
    """The model as a user loads it (the real file format), served with a 4 KiB body limit."""
    model, cfg = load_model(model_file)
    srv = start(model, cfg, max_body=4096)
    srv.model = model
    yield srv
    srv.shutdown()
    srv.server_close()


def call(port, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON reply, headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    reply = conn.getresponse()
    status, text, head = reply.status, reply.read(), dict(reply.getheaders())
    conn.close()
    return status, json.loads(text) if head.get("Content-Type") == "application/json" \
        else text, head


def stream(port, path, body) -> list:
    """The `data:` payloads of a streamed reply, parsed ("[DONE]" kept as the string)."""
    status, text, head = call(port, "POST", path, {**body, "stream": True})
    assert status == 200 and head["Content-Type"] == "text/event-stream"
    events = text.decode().split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events[:-1]]


def greedy(model, instruction: str, n: int) -> tuple[str, int]:
    """generate.py's greedy answer (raw text, header and EOS excluded) and the prompt length."""
    prompt = encode_prompts([{"instruction": instruction}], get_tokenizer())[0]
    return get_tokenizer().decode(generate(model, [prompt], n, eos_id=EOS)[0][len(prompt):]), \
        len(prompt)


def chat(instruction: str, **options) -> dict:
    return {"model": "anything", "messages": [{"role": "user", "content": instruction}],
            "temperature": 0, **options}


def test_chat_answer_is_generate_greedy_answer(server):
    expected, n_prompt = greedy(server.model, "Name a color.", 20)
    assert expected != greedy(server.model, "Name a fruit.", 20)[0]  # answers depend on the prompt
    status, reply, _ = call(server.port, "POST", "/v1/chat/completions",
                            chat("Name a color.", max_tokens=20))
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "tiny-test"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 20,
                              "total_tokens": n_prompt + 20}
    # generate.py's own answer for a data set entry is the same text, stripped
    entry = {"instruction": "Name a color.", "input": ""}
    assert generate_responses(server.model, [entry], get_tokenizer(), max_new_tokens=20) == \
        [expected.strip()]


def test_streamed_chat_is_the_same_answer_piece_by_piece(server):
    expected, n_prompt = greedy(server.model, "Describe the sea.", 25)
    events = stream(server.port, "/v1/chat/completions",
                    chat("Describe the sea.", max_tokens=25,
                         stream_options={"include_usage": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-3]]
    assert len(pieces) > 5 and "".join(pieces) == expected
    assert events[-3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 25
    assert events[-1] == "[DONE]"
    assert {e["id"] for e in events[:-1]} == {events[0]["id"]}


def test_completions_take_raw_text_and_token_ids(server):
    text = format_input({"instruction": "Add 2 and 3."}) + response_header()
    expected, _ = greedy(server.model, "Add 2 and 3.", 15)
    status, reply, _ = call(server.port, "POST", "/v1/completions",
                            {"prompt": text, "max_tokens": 15, "temperature": 0})
    assert status == 200 and reply["choices"][0]["text"] == expected
    ids = get_tokenizer().encode(text)
    events = stream(server.port, "/v1/completions", {"prompt": [ids], "max_tokens": 15,
                                                     "temperature": 0})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer_before_it(server):
    expected, _ = greedy(server.model, "Name a color.", 20)
    stop = expected[8:11]  # a piece from the middle of the greedy answer
    status, reply, _ = call(server.port, "POST", "/v1/chat/completions",
                            chat("Name a color.", max_tokens=20, stop=[stop, "never seen"]))
    assert reply["choices"][0]["message"]["content"] == expected[:expected.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(server):
    def sample(seed):
        body = chat("Tell a story.", max_tokens=12, temperature=1.0, seed=seed)
        return call(server.port, "POST", "/v1/chat/completions", body)[1]["choices"][0]
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_eight_concurrent_streams_are_batched_and_all_correct(server):
    instructions = [f"Write word number {i}." for i in range(8)]
    expected = [greedy(server.model, s, 30)[0] for s in instructions]
    results = [None] * 8

    def client(i):
        time.sleep(0.01 * i)  # staggered: later clients join a batch already generating
        events = stream(server.port, "/v1/chat/completions", chat(instructions[i], max_tokens=30))
        results[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    hook = slow_steps(server.model, 0.005)  # keep the first ones busy while the others arrive
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        hook.remove()
    assert results == expected
    assert call(server.port, "GET", "/healthz")[1]["largest_batch"] > 1


LONG = "word " * 300  # about 300 tokens: more than the 256-token context
BAD = [  # (method, path, body or raw bytes, extra headers, status, words in the message)
    ("POST", "/v1/chat/completions", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "JSON object"),
    ("POST", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', {}, 400, "NaN"),
    ("POST", "/v1/chat/completions", {"model": "x"}, {}, 400, "'messages'"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, {}, 400, "'messages' must be an array"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "be nice"}]}, {},
     400, "no user message"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, {}, 400,
     "messages[0].content"),
    ("POST", "/v1/chat/completions", chat("hi", temperature="hot"), {}, 400, "'temperature'"),
    ("POST", "/v1/chat/completions", chat("hi", temperature=-1), {}, 400, "temperature"),
    ("POST", "/v1/chat/completions", chat("hi", temperature=10**400), {}, 400, "from 0 to 2"),
    ("POST", "/v1/chat/completions", chat("hi", top_p=0), {}, 400, "top_p"),
    ("POST", "/v1/chat/completions", chat("hi", max_tokens=0), {}, 400, "'max_tokens'"),
    ("POST", "/v1/chat/completions", chat("hi", max_tokens=True), {}, 400, "'max_tokens'"),
    ("POST", "/v1/chat/completions", chat("hi", max_tokens=250), {}, 400, "from 1 to"),
    ("POST", "/v1/chat/completions", chat("hi", n=2), {}, 400, "n = 1"),
    ("POST", "/v1/chat/completions", chat("hi", stop=["a", ""]), {}, 400, "'stop'"),
    ("POST", "/v1/chat/completions", chat("hi", seed=-1), {}, 400, "'seed'"),
    ("POST", "/v1/chat/completions", chat(LONG[:3000]), {}, 400, "context holds 256"),
    ("POST", "/v1/completions", {"prompt": [[1, 2], [3]]}, {}, 400, "'prompt'"),
    ("POST", "/v1/completions", {"prompt": [99999999]}, {}, 400, "'prompt'"),
    ("POST", "/v1/chat/completions", b"x" * 5000, {}, 413, "over the limit of 4096"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', {"Content-Type": "text/plain"}, 415,
     "application/json"),
    ("POST", "/v1/chat/completions", b"0\r\n\r\n", {"Transfer-Encoding": "chunked"}, 411,
     "send a Content-Length"),
    ("GET", "/v1/chat/completions", None, {}, 405, "takes POST"),
    ("PUT", "/", b"{}", {}, 405, "takes GET"),
    ("DELETE", "/v1/nothing", None, {}, 404, "no such path"),
    ("GET", "/admin", None, {}, 404, "no such path"),
    ("OPTIONS", "/", None, {}, 501, "Unsupported method"),
]


@pytest.mark.parametrize("method, path, body, headers, status, words", BAD,
                         ids=[f"{b[4]}-{b[5]}" for b in BAD])
def test_bad_input_gets_its_status_and_the_server_goes_on(server, method, path, body, headers,
                                                          status, words):
    raw = body if isinstance(body, bytes) else None
    got, reply, head = call(server.port, method, path, None if raw else body, headers, raw)
    assert got == status, reply
    assert head["Content-Type"] == "application/json" and words in reply["error"]["message"]
    assert "\n" not in reply["error"]["message"]
    if status == 405:
        assert head["Allow"] in ("GET", "POST")
    assert call(server.port, "GET", "/healthz")[0] == 200


def test_internal_error_is_a_500_and_the_next_request_works(server):
    def fail_once(*_):
        hook.remove()
        raise RuntimeError("out of memory")
    hook = server.model.trf_blocks[0].register_forward_hook(fail_once)
    status, reply, _ = call(server.port, "POST", "/v1/chat/completions", chat("hi", max_tokens=3))
    assert status == 500 and "out of memory" in reply["error"]["message"]
    status, reply, _ = call(server.port, "POST", "/v1/chat/completions", chat("hi", max_tokens=3))
    assert status == 200 and reply["choices"][0]["message"]["content"] == \
        greedy(server.model, "hi", 3)[0]


def raw_stream_request(port: int, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """A socket that has sent a streaming chat request and read nothing yet."""
    sock = socket.socket()
    if rcvbuf:  # a tiny receive window: the server's writes block once it is full
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_disconnect_mid_stream_frees_the_slot(server):
    before = call(server.port, "GET", "/healthz")[1]
    hook = slow_steps(server.model, 0.01)  # 200 tokens would take 2 s or more
    try:
        sock = raw_stream_request(server.port, chat("Talk a lot.", max_tokens=200))
        received = b""
        while b"data: " not in received:  # the stream has begun (headers may come apart)
            received += sock.recv(4096)
        sock.close()
        wait_for(lambda: call(server.port, "GET", "/healthz")[1]["cancelled"] ==
                 before["cancelled"] + 1)
    finally:
        hook.remove()
    health = call(server.port, "GET", "/healthz")[1]
    assert health["active"] == 0 and health["length"] == before["length"]
    assert call(server.port, "POST", "/v1/chat/completions", chat("hi", max_tokens=2))[0] == 200


def test_a_client_that_stops_reading_does_not_hold_up_the_others(server):
    """Its answer is generated to the end while it reads nothing; the others' streams finish."""
    before = call(server.port, "GET", "/healthz")[1]["length"]
    slow = raw_stream_request(server.port, chat("Talk a lot.", max_tokens=200), rcvbuf=1024)
    try:
        for i in range(3):
            events = stream(server.port, "/v1/chat/completions", chat(f"Count {i}.", max_tokens=10))
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
                greedy(server.model, f"Count {i}.", 10)[0]
        wait_for(lambda: call(server.port, "GET", "/healthz")[1]["length"] == before + 4)
    finally:
        slow.close()


def test_full_queue_answers_503(model_file):
    model, cfg = load_model(model_file)
    srv = start(model, cfg, max_batch=1, max_queue=1)
    hook = slow_steps(model, 0.02)
    try:
        busy = raw_stream_request(srv.port, chat("one", max_tokens=100))
        wait_for(lambda: call(srv.port, "GET", "/healthz")[1]["active"] == 1)
        waiting = raw_stream_request(srv.port, chat("two", max_tokens=100))
        wait_for(lambda: call(srv.port, "GET", "/healthz")[1]["queued"] == 1)
        status, reply, _ = call(srv.port, "POST", "/v1/chat/completions", chat("three"))
        assert status == 503 and "busy" in reply["error"]["message"]
        busy.close()
        waiting.close()
        wait_for(lambda: call(srv.port, "GET", "/healthz")[1]["active"] == 0)
    finally:
        hook.remove()
        srv.shutdown()
        srv.server_close()


def test_api_key_is_required_and_evaluate_judges_through_this_server(model_file, tmp_path):
    """evaluate.py's judge client (OPENAI_API_KEY as its Bearer token) against this server."""
    model, cfg = load_model(model_file)
    srv = start(model, cfg, api_key="s3cret")
    try:
        assert call(srv.port, "GET", "/v1/models")[0] == 401
        bad = call(srv.port, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad[0] == 401 and bad[2]["WWW-Authenticate"] == "Bearer"
        assert call(srv.port, "GET", "/healthz")[0] == 200  # health and the page stay open
        status, models, _ = call(srv.port, "GET", "/v1/models",
                                 headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and models["data"][0]["id"] == "tiny-test"
        entries = [{"instruction": "Name a color.", "input": "", "output": "Blue.",
                    "model_response": "Red."},
                   {"instruction": "Add 2 and 2.", "input": "", "output": "4",
                    "model_response": "4"}]
        write_json(tmp_path / "responses.json", entries)
        done = subprocess.run(
            [sys.executable, "evaluate.py", str(tmp_path / "responses.json"), "--judge", "openai",
             "--judge-url", f"http://127.0.0.1:{srv.port}/v1", "--write-scores", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "OPENAI_API_KEY": "s3cret"})
        assert done.returncode == 0, done.stderr
        assert "| **all** | 2 |" in done.stdout
        health = call(srv.port, "GET", "/healthz")[1]
        assert health["stop"] + health["length"] >= 2  # each entry asked at least once
        scored = json.loads((tmp_path / "responses.json").read_text())
        assert all("judge_score" in e for e in scored)  # a number, or null when none was given
    finally:
        srv.shutdown()
        srv.server_close()


def test_command_line_warns_on_all_interfaces_and_stops_on_ctrl_c(model_file):
    proc = subprocess.Popen([sys.executable, "serve/server.py", str(model_file), "--host", "0.0.0.0",
                             "--port", "0", "--quiet"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, env=quiet_env(), preexec_fn=terminal_ctrl_c)
    try:  # bounded waits: a stalled server fails the test instead of hanging it
        reader = LineReader(proc.stderr)
        warning = reader.wait_for(lambda line: True)
        serving = reader.wait_for(lambda line: True)
        assert warning.startswith("warning: listening on 0.0.0.0 with no authentication")
        port = int(serving.split("/v1")[0].rsplit(":", 1)[1])
        status, page, head = call(port, "GET", "/")
        assert status == 200 and head["Content-Type"].startswith("text/html")
        assert b"<script>" in page and b"http" not in page.split(b"<script>")[1]  # no CDN
        assert call(port, "GET", "/v1/models")[1]["data"][0]["id"] == "tiny"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_command_line_names_a_missing_model_or_a_bad_flag(tmp_path, model_file, capsys):
    for argv, message in [([str(tmp_path / "none.pt")], "none.pt: no such file"),
                          ([str(model_file), "--max-batch", "0"], "argument --max-batch")]:
        with pytest.raises(SystemExit) as stop:  # one line, exit 2, as the flags are read
            serve.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
