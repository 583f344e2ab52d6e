"""The chat page in a real headless Chromium, driven over the DevTools protocol (a WebSocket
client written here with the standard library): it loads, sends a typed message, shows the
streamed answer, and its stop button ends an answer. Skipped only when no Chromium is installed."""
import base64
import hashlib
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from urllib.parse import urlparse

import pytest

from gpt import save_model
from test_batching import slow_steps, wait_for
from test_generate import lively_model
from test_serve import TINY, call, greedy, start

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


class DevTools:
    """Chrome DevTools Protocol over a WebSocket (RFC 6455): masked text frames out, whole
    messages in. Events the browser sends between replies are ignored."""

    def __init__(self, ws_url: str):
        url = urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert b" 101 " in head.split(b"\r\n")[0] and accept.encode() in head, head
        self.next_id = 0

    def recv_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "the browser closed the DevTools connection"
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_frame(self, opcode: int, payload: bytes) -> None:
        n, mask = len(payload), os.urandom(4)  # client frames are always masked
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) \
            if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def recv_message(self) -> str:
        parts = []
        while True:
            b0, b1 = self.recv_exact(2)
            n = b1 & 0x7F
            n = struct.unpack(">H", self.recv_exact(2))[0] if n == 126 else \
                struct.unpack(">Q", self.recv_exact(8))[0] if n == 127 else n
            mask = self.recv_exact(4) if b1 & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.recv_exact(n))) \
                if b1 & 0x80 else self.recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: answer pong
                self.send_frame(0xA, payload)
            elif opcode == 0x8:
                raise AssertionError("the browser closed the DevTools connection")
            elif opcode in (0x0, 0x1):  # continuation or text
                parts.append(payload)
                if b0 & 0x80:  # FIN: the message is complete
                    return b"".join(parts).decode()

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.send_frame(0x1, json.dumps({"id": self.next_id, "method": method,
                                         "params": params}).encode())
        while True:
            reply = json.loads(self.recv_message())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real left click in the middle of the element, as a user's mouse makes it."""
        x, y = self.js(f"(() => {{ const r = document.querySelector('{selector}')"
                       ".getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2] })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_and_enter(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector('{selector}').focus()")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13)


def launch(browser: str, profile) -> tuple[subprocess.Popen, str]:
    """Headless Chromium on a free DevTools port; returns it and its page's WebSocket URL."""
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=820,640",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 60
    while True:  # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line.startswith("DevTools listening on "):
            port = urlparse(line.split()[-1]).port
            break
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
        pages = [t for t in json.load(r) if t["type"] == "page"]
    return proc, pages[0]["webSocketDebuggerUrl"]


@pytest.fixture
def browser(tmp_path):
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip("no Chromium found (.ci/run installs Debian's: apt-get install -y chromium)")
    proc, ws_url = launch(found, tmp_path / "profile")
    devtools = DevTools(ws_url)
    yield devtools
    devtools.sock.close()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def last_answer(devtools: DevTools) -> dict:
    return devtools.js("(() => { const b = [...document.querySelectorAll('.assistant')].pop();"
                       " return b ? {text: b.textContent, state: b.dataset.state} : null })()")


def test_page_streams_an_answer_and_stop_ends_one(browser, tmp_path):
    model = lively_model(11, TINY)
    save_model(model, TINY, tmp_path / "tiny.pt")
    server = start(model, TINY)
    try:
        browser.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
        wait_for(lambda: browser.js("document.getElementById('model')?.textContent") ==
                 "tiny-test", timeout=30)  # the page's script ran and asked /v1/models
        # every change of the answer's text is recorded, to see it grow piece by piece
        browser.js("window.seen = []; new MutationObserver(() => window.seen.push("
                   "[...document.querySelectorAll('.assistant')].pop().textContent.length))"
                   ".observe(document.getElementById('log'), {subtree: true, childList: true,"
                   " characterData: true}); document.getElementById('temperature').value = 0;"
                   " document.getElementById('max-tokens').value = 30")
        browser.type_and_enter("#prompt", "Name a color.")
        wait_for(lambda: last_answer(browser)["state"] == "done", timeout=30)
        assert last_answer(browser)["text"] == greedy(model, "Name a color.", 30)[0]
        lengths = set(browser.js("window.seen")) - {0}
        assert len(lengths) > 3  # streamed: several partial answers were on screen
        assert "finished (length): 30 tokens" in browser.js("document.body.innerText")

        before = call(server.port, "GET", "/healthz")[1]["cancelled"]
        hook = slow_steps(model, 0.01)  # about 220 tokens: 2 s or more, time to press stop
        try:
            browser.js("document.getElementById('max-tokens').value = ''")
            browser.type_and_enter("#prompt", "Talk a lot.")
            wait_for(lambda: len(last_answer(browser)["text"]) > 0, timeout=30)
            browser.click("#stop")
            wait_for(lambda: last_answer(browser)["state"] == "stopped")
            wait_for(lambda: call(server.port, "GET", "/healthz")[1]["cancelled"] == before + 1)
        finally:
            hook.remove()
        shown = last_answer(browser)["text"]
        time.sleep(0.3)
        assert last_answer(browser)["text"] == shown  # nothing more arrives after stop
        assert browser.js("document.getElementById('send').disabled") is False
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        (tmp_path / "chat.png").write_bytes(png)
    finally:
        server.shutdown()
        server.server_close()
