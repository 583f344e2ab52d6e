"""The arena page of serve/server.py (serve/arena.py, serve/arena.html): a real loopback server with two tiny
models written here, used through http.client and, in the last test, through headless Chromium
(skipped only when no Chromium is installed, as in test_serve_browser.py)."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

import evaluate
from serve import server as serve
from child_io import LineReader, quiet_env, terminal_ctrl_c
from evals.arena import record_battle
from evals.ratings import read_battles
from gpt import load_model, save_model
from test_batching import wait_for
from test_generate import lively_model
from test_serve import ROOT, TINY, call, greedy, start, start_app
from test_serve_browser import browser  # noqa: F401 (a fixture: Chromium over DevTools)

PROMPT = "Name a color."
TOKENS = 12  # answers of 12 tokens: enough to tell the two models apart, and quick


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for seed, name in ((11, "alpha"), (12, "beta")):
        save_model(lively_model(seed, TINY), TINY, folder / f"{name}.pt")
    return folder / "alpha.pt", folder / "beta.pt"


@pytest.fixture(scope="module")
def models(model_files):
    """The models as the server loads them, by their arena names."""
    return {path.stem: load_model(path)[0] for path in model_files}


def arena(model_files, battles, *flags):
    """serve/server.py's own App for the two files and `flags`, served on a free loopback port."""
    args = serve.parse_args([*map(str, model_files), "--battles", str(battles),
                             "--max-tokens", str(TOKENS), *flags])
    return start_app(serve.load_app(args))


@pytest.fixture
def server(model_files, tmp_path):
    srv = arena(model_files, tmp_path / "battles.jsonl", "--max-body", "4096")
    srv.battles = tmp_path / "battles.jsonl"
    yield srv
    srv.shutdown()
    srv.server_close()


def battle(port, prompt: str = PROMPT, **options) -> dict:
    status, reply, _ = call(port, "POST", "/arena/battle", {"prompt": prompt, **options})
    assert status == 200, reply
    return reply


def vote(port, battle_id, winner) -> tuple[int, dict]:
    status, reply, _ = call(port, "POST", "/arena/vote", {"battle_id": battle_id,
                                                          "winner": winner})
    return status, reply


def test_names_stay_hidden_until_the_vote_which_is_added_to_the_battles_file(server, models,
                                                                             tmp_path):
    record_battle(server.battles, {"model_a": "old1", "model_b": "old2", "winner": "tie"})
    earlier = server.battles.read_text()
    expected = {name: greedy(model, PROMPT, TOKENS)[0].strip() for name, model in models.items()}
    assert expected["alpha"] != expected["beta"]  # so each answer tells which model gave it

    reply = battle(server.port)
    assert set(reply) == {"battle_id", "answer_a", "answer_b"}
    assert not any(secret in json.dumps(reply) for secret in ("alpha", "beta", str(tmp_path)))
    assert {reply["answer_a"], reply["answer_b"]} == set(expected.values())

    before = time.time()
    status, names = vote(server.port, reply["battle_id"], "model_b")
    assert status == 200 and names["winner"] == "model_b"
    assert sorted([names["model_a"], names["model_b"]]) == ["alpha", "beta"]
    # the revealed names belong to the answers shown on their sides (greedy: reproducible)
    assert reply["answer_a"] == expected[names["model_a"]]
    assert reply["answer_b"] == expected[names["model_b"]]

    old_line, new_line = server.battles.read_text().splitlines()
    assert old_line + "\n" == earlier  # earlier battles are kept, byte for byte
    record = json.loads(new_line)
    assert before <= record.pop("tstamp") <= time.time()
    assert record == {"model_a": names["model_a"], "model_b": names["model_b"],
                      "winner": "model_b", "judge": "human", "anony": True, "prompt": PROMPT,
                      "input": "", "answer_a": reply["answer_a"], "answer_b": reply["answer_b"]}

    # a second vote on the same battle is refused and changes nothing
    assert vote(server.port, reply["battle_id"], "model_a")[0] == 409
    assert server.battles.read_text().splitlines() == [old_line, new_line]

    # `evaluate.py ratings` reads the file. Elo by hand (K=4, start 1000): the tie of two
    # 1000s expects 0.5 and scores 0.5, no change; then model_b wins with expected score
    # 1 / (1 + 10^0) = 0.5: +4 * (1 - 0.5) = +2 for model_b, -2 for model_a
    assert read_battles(server.battles) == [("old1", "old2", 0.5),
                                            (names["model_a"], names["model_b"], 0.0)]
    evaluate.main(["ratings", str(server.battles), "--bootstrap", "0", "--quiet",
                   "--json", str(tmp_path / "ratings.json")])
    rated = json.loads((tmp_path / "ratings.json").read_text())["models"]
    elo = {names["model_a"]: 998.0, names["model_b"]: 1002.0, "old1": 1000.0, "old2": 1000.0}
    assert {m: r["elo"] for m, r in rated.items()} == pytest.approx(elo)
    status, shown, _ = call(server.port, "GET", "/arena/ratings")
    assert status == 200 and shown["battles"] == 2
    assert {m: r["elo"] for m, r in shown["models"].items()} == pytest.approx(elo)
    assert shown["models"][names["model_b"]]["wins"] == 1
    assert list(shown["models"]) == list(rated)  # ranked alike (by Bradley–Terry)


def test_bad_input_is_a_4xx_json_error_and_records_nothing(server):
    open_id = battle(server.port)["battle_id"]
    cases = [  # (method, path, body, raw bytes, content type, status, words of the message)
        ("POST", "/arena/vote", {"battle_id": "0" * 32, "winner": "tie"}, None, None, 404,
         "no such battle"),
        ("POST", "/arena/vote", {"battle_id": open_id, "winner": "A"}, None, None, 400,
         "'winner' must be one of model_a, model_b, tie, tie (bothbad)"),
        ("POST", "/arena/vote", {"winner": "tie"}, None, None, 400, "'battle_id' is missing"),
        ("POST", "/arena/vote", {"battle_id": 7, "winner": "tie"}, None, None, 400,
         "'battle_id' must be a string"),
        ("POST", "/arena/vote", None, b"{not json", None, 400, "not valid JSON"),
        ("POST", "/arena/vote", None, b"[]", None, 400, "must be a JSON object"),
        ("POST", "/arena/battle", {}, None, None, 400, "'prompt' must be a non-empty string"),
        ("POST", "/arena/battle", {"prompt": "  \n"}, None, None, 400, "'prompt' must be"),
        ("POST", "/arena/battle", {"prompt": "x", "temperature": 5}, None, None, 400,
         "'temperature' must be from 0 to 2"),
        ("POST", "/arena/battle", {"prompt": "x", "max_tokens": 10**6}, None, None, 400,
         "'max_tokens' must be from 1 to"),
        ("POST", "/arena/battle", {"prompt": "x" * 5000}, None, None, 413, "over the limit"),
        ("POST", "/arena/battle", None, b"prompt=x", "text/plain", 415, "send the body as JSON"),
        ("GET", "/arena/battle", None, None, None, 405, "takes POST"),
        ("POST", "/arena/ratings", {}, None, None, 405, "takes GET"),
    ]
    for method, path, body, raw, kind, status, message in cases:
        got, reply, _ = call(server.port, method, path, body, raw=raw,
                             headers={"Content-Type": kind} if kind else None)
        assert (got, message) == (status, message) and message in reply["error"]["message"], \
            (path, body, raw, reply)
    assert not server.battles.exists()  # no vote was counted
    status, names = vote(server.port, open_id, "tie")  # the bad vote left the battle open
    assert status == 200 and names["winner"] == "tie"
    assert [b[2] for b in read_battles(server.battles)] == [0.5]


def test_votes_at_the_same_time_each_count_once_and_none_is_lost(server):
    """Three battles, each voted twice at once from six threads: one vote per battle counts
    (the other gets 409) and all three reach the file, whatever the order of the writes."""
    ids = [battle(server.port, f"Prompt {i}.")["battle_id"] for i in range(3)]
    results, go = {}, threading.Barrier(6)

    def cast(battle_id, winner):
        go.wait()
        results[battle_id, winner] = vote(server.port, battle_id, winner)
    threads = [threading.Thread(target=cast, args=(i, w)) for i in ids for w in ("model_a", "tie")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    counted = {}
    for (battle_id, winner), (status, reply) in results.items():
        assert status in (200, 409), reply
        if status == 200:
            assert battle_id not in counted
            counted[battle_id] = winner
    assert sorted(counted) == sorted(ids)
    lines = [json.loads(line) for line in server.battles.read_text().splitlines()]
    assert sorted((r["prompt"], r["winner"]) for r in lines) == \
        sorted((f"Prompt {ids.index(i)}.", w) for i, w in counted.items())


def test_with_one_model_there_is_no_arena(model_files):
    model, cfg = load_model(model_files[0])
    srv = start(model, cfg)
    try:
        for method, path in (("GET", "/arena"), ("POST", "/arena/battle"),
                             ("GET", "/arena/ratings")):
            status, reply, _ = call(srv.port, method, path, {"prompt": "x"})
            assert status == 404 and "needs two or more models" in reply["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_api_key_guards_the_arena_calls_not_the_page(model_files, tmp_path):
    srv = arena(model_files, tmp_path / "b.jsonl", "--api-key", "sesame", "--model-name", "one",
                "--model-name", "two")
    try:
        status, page, head = call(srv.port, "GET", "/arena")
        assert status == 200 and head["Content-Type"] == "text/html; charset=utf-8"
        assert b"<script>" in page and b"http" not in page.split(b"<script>")[1]  # no CDN
        for method, path in (("POST", "/arena/battle"), ("POST", "/arena/vote"),
                             ("GET", "/arena/ratings")):
            assert call(srv.port, method, path, {"prompt": "x"})[0] == 401
        key = {"Authorization": "Bearer sesame"}
        status, reply, _ = call(srv.port, "POST", "/arena/battle", {"prompt": "Hi."}, key)
        assert status == 200
        status, names, _ = call(srv.port, "POST", "/arena/vote",
                                {"battle_id": reply["battle_id"], "winner": "tie (bothbad)"}, key)
        assert status == 200 and {names["model_a"], names["model_b"]} == {"one", "two"}
    finally:
        srv.shutdown()
        srv.server_close()


def test_command_line_serves_the_arena_and_names_bad_flags(model_files, tmp_path):
    a, b = map(str, model_files)
    with pytest.raises(ValueError, match="--model-name gives 1 names for 2 models"):
        serve.main([a, b, "--model-name", "x"])
    with pytest.raises(ValueError, match="model names must differ"):
        serve.main([a, b, "--model-name", "x", "--model-name", "x"])
    with pytest.raises(OSError, match="cannot write --battles .*missing"):
        serve.main([a, b, "--battles", str(tmp_path / "missing" / "b.jsonl")])
    assert serve.served_names(["x/model.pt", "y/model.pt"], None) == ["x/model.pt", "y/model.pt"]
    assert serve.served_names(["x/one.pt", "y/two.pt"], None) == ["one", "two"]

    proc = subprocess.Popen([sys.executable, "serve/server.py", a, b, "--port", "0", "--quiet",
                             "--battles", str(tmp_path / "b.jsonl")], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env=quiet_env(),
                            preexec_fn=terminal_ctrl_c)
    try:  # bounded waits: a stalled server fails the test instead of hanging it
        reader = LineReader(proc.stderr)
        line = reader.wait_for(lambda line: True)
        assert line.startswith("arena of 2 models at http://127.0.0.1:") and \
            line.rstrip().endswith(f"/arena, votes added to {tmp_path / 'b.jsonl'}")
        port = int(line.split("/arena")[0].rsplit(":", 1)[1])
        assert reader.wait_for(lambda line: True).startswith("serving alpha on")
        assert call(port, "GET", "/arena")[0] == 200
        assert call(port, "GET", "/v1/models")[1]["data"][0]["id"] == "alpha"  # the first
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def page_state(browser) -> dict:
    return browser.js("(() => { const t = (id) => document.getElementById(id).textContent;"
                      " return {a: t('answer-a'), b: t('answer-b'), name_a: t('name-a'),"
                      " name_b: t('name-b'), status: t('status'), count: t('count'),"
                      " rows: document.querySelectorAll('#ratings tr').length,"
                      " can_vote: !document.getElementById('vote-tie').disabled} })()")


def test_page_shows_two_answers_and_the_names_only_after_the_vote(
        browser, server, models):  # noqa: F811 (the fixture imported above)
    browser.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/arena")
    wait_for(lambda: browser.js("document.getElementById('count')?.textContent") == "0",
             timeout=30)  # the page's script ran and asked /arena/ratings
    browser.type_and_enter("#prompt", PROMPT)
    wait_for(lambda: page_state(browser)["can_vote"], timeout=30)
    shown = page_state(browser)
    expected = {name: greedy(model, PROMPT, TOKENS)[0].strip() for name, model in models.items()}
    assert {shown["a"], shown["b"]} == set(expected.values())
    assert shown["name_a"] == shown["name_b"] == ""
    text = browser.js("document.body.innerText")
    assert "alpha" not in text and "beta" not in text  # nowhere on the page before the vote

    browser.click("#vote-b")
    wait_for(lambda: page_state(browser)["rows"] == 2, timeout=30)  # voted, ratings reloaded
    after = page_state(browser)
    [record] = [json.loads(line) for line in server.battles.read_text().splitlines()]
    assert record["winner"] == "model_b" and record["prompt"] == PROMPT
    assert (after["name_a"], after["name_b"]) == (record["model_a"], record["model_b"])
    assert (after["a"], after["b"]) == (record["answer_a"], record["answer_b"])
    assert expected[after["name_a"]] == after["a"]  # the names belong to their answers
    assert f"Model A was {record['model_a']}; model B was {record['model_b']}" in after["status"]
    assert after["count"] == "1" and not after["can_vote"]
