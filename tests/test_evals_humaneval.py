import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

import evaluate
from evals.humaneval import STOPS, build_program, pass_at_k, read_problems, score_samples
from evals.sandbox import Limits, isolation, run_programs

PROBLEM = {"task_id": "Test/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
           "entry_point": "add", "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
                   "    assert candidate(-1, 1) == 0\n"}
SETUP = isolation()
CONTAINED = SETUP["namespaces"] and SETUP["drops_user"]  # root with namespaces, as here
needs_containment = pytest.mark.skipif(not CONTAINED, reason="needs root and namespaces: the "
                                       "bypass variants would reach the host here")


# ---- pass@k -----------------------------------------------------------------------------------
def test_pass_at_k_hand_worked():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    # n=6, c=1, k=3: 1 - C(5,3)/C(6,3) = 1 - 10/20
    assert pass_at_k(6, 1, 3) == pytest.approx(0.5)
    assert pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: any 2 include a right one
    assert pass_at_k(5, 0, 3) == 0.0


def test_score_samples_averages_over_tasks_and_skips_large_k():
    samples = [{"task_id": "A", "passed": True}, {"task_id": "A", "passed": False},
               {"task_id": "B", "passed": False}, {"task_id": "B", "passed": False}]
    # A: n=2 c=1 -> pass@1 1/2, pass@2 1; B: 0 and 0
    assert score_samples(samples, [1, 2, 10]) == {"tasks": 2, "samples": 4, "pass@1": 0.25,
                                                  "pass@2": 0.5}


# ---- the command on a samples file ------------------------------------------------------------
def test_samples_file_is_scored_and_results_written(tmp_path):
    problems = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(problems, "wt", encoding="utf-8") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": "Test/0", "completion": c}) + "\n"
                               for c in ("    return a + b\n", "    return a - b\n")))
    scores = tmp_path / "scores.json"
    evaluate.main(["humaneval", str(problems), "--samples", str(samples), "--json", str(scores),
                   "--quiet", "--timeout", "5", "--k", "1,2,10"])
    results = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text()
               .splitlines()]
    assert [r["passed"] for r in results] == [True, False]
    assert results[0]["result"] == "passed" and results[1]["result"].startswith(
        "failed: AssertionError")
    # n=2, c=1: pass@1 = 1/2, pass@2 = 1
    assert json.loads(scores.read_text()) == {"tasks": 1, "samples": 2, "pass@1": 0.5,
                                              "pass@2": 1.0}


def test_model_completions_are_generated_cut_and_run(tmp_path):
    import torch
    from gpt import GPTModel, save_model
    cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": True}
    torch.manual_seed(0)
    save_model(GPTModel(cfg), cfg, tmp_path / "model.pt")
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "task_id": "T/1"}))
    out, scores = tmp_path / "samples.jsonl", tmp_path / "scores.json"
    evaluate.main(["humaneval", str(problems), "--model-path", str(tmp_path / "model.pt"),
                   "--samples-per-task", "3", "--temperature", "1.0", "--max-new-tokens", "8",
                   "--output", str(out), "--json", str(scores), "--quiet"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["Test/0"] * 3 + ["T/1"] * 3
    assert all(not any(stop in r["completion"] for stop in STOPS) for r in rows)
    # a random model writes no working body, so every sample fails: pass@1 = 0
    assert json.loads(scores.read_text()) == {"tasks": 2, "samples": 6, "pass@1": 0.0}


def test_bad_problem_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({"task_id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: a HumanEval problem needs string fields"):
        read_problems(path)


# ---- the sandbox against hostile completions --------------------------------------------------
def body(code: str) -> str:
    """A completion: the code indented as the function's body, then a correct return."""
    return "".join(f"    {line}\n" for line in code.strip().splitlines()) + "    return a + b\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Every hostile completion run at once beside a correct one: {name: (outcome, facts)}."""
    outside = tmp_path_factory.mktemp("outside")
    keep = outside / "keep.txt"
    keep.write_text("precious")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    os.environ["HUMANEVAL_TEST_SECRET"] = "hunter2"
    cases = {
        "correct": "",
        "infinite loop": "while True:\n    pass",
        "fork bomb (os.fork)": "import os\nwhile True:\n    os.fork()",
        "fork bomb (posix.fork)": "import posix, time\nfor _ in range(10000):\n    try:\n"
                                  "        posix.fork()\n    except OSError:\n        pass\n"
                                  "time.sleep(30)",
        "allocate 10 GB": "x = bytearray(10 * 2**30)",
        "write 1 GB file": "with open('big.bin', 'wb') as f:\n    for _ in range(1024):\n"
                           "        f.write(b'x' * 2**20)",
        "delete outside": f"import os\nos.remove({str(keep)!r})",
        "delete outside (posix)": f"import posix\nposix.unlink({str(keep)!r})",
        "write outside": f"open({str(outside / 'new.txt')!r}, 'w').write('x')",
        "write outside (posix)": f"import posix\nposix.open({str(outside / 'new.txt')!r}, "
                                 "posix.O_WRONLY | posix.O_CREAT)",
        "read env": "import os\nassert os.environ['HUMANEVAL_TEST_SECRET'] == 'hunter2'",
        "read parent env (/proc)": f"assert b'hunter2' in open('/proc/{os.getpid()}/environ', "
                                   "'rb').read()",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "socket (bypass)": f"import sys\ndel sys.modules['socket'], sys.modules['_socket']\n"
                           f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                           "timeout=1)",
        "kill parent": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",
        "kill parent (posix)": f"import posix, signal\nposix.kill({os.getpid()}, signal.SIGTERM)",
    }
    if not CONTAINED:  # the bypass variants only run where the kernel stops them
        cases = {k: v for k, v in cases.items() if "(" not in k}
    programs = [build_program(PROBLEM, body(code)) for code in cases.values()]
    start = time.perf_counter()
    try:
        outcomes = run_programs(programs, timeout=2.0, limits=Limits(memory_mb=512, processes=16),
                                workers=4)
    finally:
        del os.environ["HUMANEVAL_TEST_SECRET"]
    elapsed = time.perf_counter() - start
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    listener.close()
    leftovers = [p for p in Path("/proc").glob("[0-9]*") if b"sandbox_child.py" in read(p)]
    yield {"outcomes": dict(zip(cases, outcomes)), "elapsed": elapsed, "keep": keep,
           "new": outside / "new.txt", "connected": connected, "leftovers": leftovers}


def read(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def test_correct_completion_passes_beside_hostile_ones(hostile):
    assert hostile["outcomes"]["correct"].passed


def test_every_hostile_completion_fails(hostile):
    failed = {name: o.result for name, o in hostile["outcomes"].items() if name != "correct"}
    assert all(not hostile["outcomes"][n].passed for n in failed), failed
    assert failed["infinite loop"] == "timed out"
    assert failed["allocate 10 GB"] == "failed: MemoryError"
    assert "File too large" in failed["write 1 GB file"]  # stopped at the 16 MB file limit
    assert "NoneType" in failed["fork bomb (os.fork)"]  # the guard removed os.fork
    assert "KeyError" in failed["read env"]
    assert "NoneType" in failed["kill parent"]


def test_host_is_unharmed_and_the_run_is_bounded(hostile):
    assert hostile["keep"].read_text() == "precious"
    assert not hostile["new"].exists()
    assert not hostile["connected"]
    assert hostile["leftovers"] == []  # the fork bomb's processes are all gone
    assert hostile["elapsed"] < 30  # two 2-second timeouts, the rest at once, 4 at a time


@needs_containment
def test_the_kernel_stops_what_the_guard_alone_would_not(hostile):
    """Code that restores what the guard removed still meets the namespaces and user nobody."""
    failed = {name: o.result for name, o in hostile["outcomes"].items()}
    assert failed["fork bomb (posix.fork)"] == "timed out"
    assert "PermissionError" in failed["delete outside (posix)"]
    assert "PermissionError" in failed["write outside (posix)"]
    assert "PermissionError" in failed["read parent env (/proc)"]
    assert "Network is unreachable" in failed["socket (bypass)"]
    assert "ProcessLookupError" in failed["kill parent (posix)"]  # not even visible: own pid ns
