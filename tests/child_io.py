"""Helpers for tests that watch a child process through a pipe: bounded waits for a line (a
stalled child fails the test instead of hanging it) and an environment without PYTHONUNBUFFERED,
so a test proves the child flushes its own output."""
import os
import queue
import signal
import threading
import time

FRESH_TORCH_S = 300  # a fresh torch process on a loaded 2-core machine can take a minute to start


def quiet_env(**extra: str) -> dict:
    """os.environ without PYTHONUNBUFFERED: the child's prints reach the pipe only if flushed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(extra)
    return env


class LineReader:
    """Reads a text stream in a thread so the test can wait for a line with a time limit."""

    def __init__(self, stream):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # end of stream

    def wait_for(self, predicate, timeout: float = FRESH_TORCH_S) -> str:
        """The first line for which predicate is true; AssertionError on timeout or at the end."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no matching line within {timeout} s; seen: {self.seen[-5:]}")
            if line is None:
                raise AssertionError(f"the stream ended, no matching line; seen: {self.seen[-5:]}")
            self.seen.append(line)
            if predicate(line):
                return line


def terminal_ctrl_c():
    """In the child: Ctrl-C as in a terminal, even when the tests run in a background job (which
    starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
