"""Run untrusted programs (a model's code with its unit tests) in a contained child process.

Each program runs in its own `python -I -S` process, in a fresh empty folder, with a minimal
environment, resource limits, the dangerous functions disabled, and, where the platform allows it,
no network, its own process namespace and an unprivileged user. Entry points: `run_program`,
`run_programs` (several at once), `isolation` (what containment this machine gives).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534  # the uid/gid a root parent drops programs to: then limits and file rights apply


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_mb: int = 16      # largest file it may write, stdout and stderr included (RLIMIT_FSIZE)
    processes: int = 32    # processes and threads of the sandbox user (RLIMIT_NPROC)
    open_files: int = 64   # RLIMIT_NOFILE


@dataclass
class Outcome:
    passed: bool
    result: str     # "passed", "timed out", or "failed: <why>"
    seconds: float


CHILD = Path(__file__).with_name("sandbox_child.py")  # what runs in the child, before the program


def child_env(workdir: Path) -> dict:
    """The only environment the program sees: nothing inherited, so no secrets."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def bootstrap_command(python: str, mode: str, workdir: Path, limits: Limits, timeout: float,
                      drop: bool) -> list[str]:
    return [python, "-I", "-S", str(CHILD), mode, str(workdir), json.dumps(asdict(limits)),
            str(timeout), str(NOBODY), "1" if drop else "0"]


def probe(python: str) -> dict | None:
    """What `python` gives as a sandbox here; None when it does not run."""
    try:
        done = subprocess.run(bootstrap_command(python, "probe", Path("/"), Limits(), 5, False),
                              input=b"", capture_output=True, env=child_env(Path("/")), timeout=30)
        return json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


@lru_cache(maxsize=None)
def isolation() -> dict:
    """{"python": the interpreter programs run in, "namespaces": no network and an own process
    namespace, "drops_user": runs as nobody (so the process limit holds)}.

    As root the program runs as nobody, who must be able to read the interpreter's standard
    library; when this one's is private (e.g. under /root) the system python3 is tried instead.
    """
    candidates = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                     if os.path.exists(p)]
    found = [(python, got) for python in candidates if (got := probe(python)) is not None]
    if not found:
        raise OSError(f"sandbox: none of {candidates} runs the sandbox bootstrap")
    python, got = next((f for f in found if f[1]["drops_user"]), found[0])
    return {"python": python, **got}


def isolation_warning() -> str | None:
    """A one-line warning when programs can reach the network or escape the process limit."""
    got = isolation()
    if not got["namespaces"]:
        return ("warning: no network namespace here (needs root or user namespaces): sandboxed "
                "programs may reach the network and leave processes behind; the guard still "
                "blocks `import socket` and os.fork")
    if os.geteuid() == 0 and not got["drops_user"]:
        return ("warning: running as root and no interpreter whose standard library user nobody "
                "can read: programs run as root, so the process-count limit does not hold")
    return None


def kill_group(proc: subprocess.Popen, wait: float = 2.0) -> None:
    """SIGKILL the bootstrap's whole process group (its pid is the group's id), reap it, and wait
    at most `wait` seconds until the group's last process is gone (a busy machine is slow)."""
    deadline = time.monotonic() + wait
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
            time.sleep(0.01)
    except (ProcessLookupError, PermissionError):
        proc.wait()


def describe(code: int, err: bytes) -> str:
    """Why a program failed: its last stderr line, or the signal that ended it."""
    if code > 128:
        name = signal.Signals(code - 128).name if code - 128 in signal.valid_signals() else code
        why = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed (CPU or memory limit)",
               "SIGXFSZ": "file size limit"}.get(str(name), "")
        return f"failed: killed by {name}" + (f" ({why})" if why else "")
    lines = err.decode("utf-8", errors="replace").strip().splitlines()
    return f"failed: {lines[-1][:300] if lines else f'exit code {code}'}"


def run_program(program: str, timeout: float = 3.0, limits: Limits = Limits()) -> Outcome:
    """Run one program; it passes when it runs to its end without an exception in `timeout` s."""
    start = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        run_dir.chmod(0o711)  # the sandbox user may enter its folder but not list this one
        work = run_dir / "work"
        work.mkdir()
        setup = isolation()
        if setup["drops_user"]:
            os.chown(work, NOBODY, NOBODY)
        with open(run_dir / "stdout", "wb") as out, open(run_dir / "stderr", "wb+") as err:
            proc = subprocess.Popen(bootstrap_command(setup["python"], "run", work, limits,
                                                      timeout, setup["drops_user"]),
                                    stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env=child_env(work), cwd=work, start_new_session=True)
            try:
                try:
                    proc.stdin.write(program.encode("utf-8"))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                code = proc.wait(timeout + 10)  # the bootstrap keeps the time; this is a backstop
            except subprocess.TimeoutExpired:
                code = 124
            finally:
                kill_group(proc)  # whatever else it started goes with it
            err.seek(0)
            tail = err.read()[-4000:]
        result = {0: "passed", 124: "timed out"}.get(code) or describe(code, tail)
        return Outcome(result == "passed", result, time.perf_counter() - start)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_programs(programs: list[str], timeout: float = 3.0, limits: Limits = Limits(),
                 workers: int = 4, progress: bool = False) -> list[Outcome]:
    """run_program for each, `workers` at a time, in the programs' order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    outcomes, start = [], time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for i, outcome in enumerate(pool.map(lambda p: run_program(p, timeout, limits), programs)):
            outcomes.append(outcome)
            if progress and ((i + 1) % 20 == 0 or i + 1 == len(programs)):
                print(f"ran {i + 1}/{len(programs)} programs "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return outcomes
