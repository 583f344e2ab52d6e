"""Test helper: a fake LLM judge on 127.0.0.1 that speaks Ollama's /api/chat (streamed NDJSON, or
one JSON object) and OpenAI's /v1/chat/completions; `policy(prompt)` decides every reply."""
import contextlib
import json
import re
import time

from local_server import local_server
from test_evaluate import JudgeHandler

SLOW = object()  # a policy's answer that makes the judge stall past the client's timeout


class PolicyJudgeHandler(JudgeHandler):
    """test_evaluate's fake judge (its model list names llama3), answering by a policy."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        self.server.prompts.append(prompt)
        reply = self.server.policy(prompt)
        if reply is SLOW:
            time.sleep(2)
            return
        if self.path == "/v1/chat/completions":
            return self.send_json(200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}}]})
        if not self.server.stream:
            return self.send_json(200, {"model": body["model"], "done": True,
                                   "message": {"role": "assistant", "content": reply}})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)] + [""]
        for k, piece in enumerate(pieces):
            line = json.dumps({"model": body["model"], "done": k == len(pieces) - 1,
                               "message": {"role": "assistant", "content": piece}}) + "\n"
            self.wfile.write(f"{len(line):X}\r\n{line}\r\n".encode())
        self.wfile.write(b"0\r\n\r\n")


@contextlib.contextmanager
def fake_judge(policy, stream: bool = True):
    """A judge server whose `url` to use and whose `prompts` list records what it was asked."""
    with local_server(PolicyJudgeHandler) as srv:
        srv.policy, srv.stream, srv.prompts = policy, stream, []
        srv.handle_error = lambda *args: None  # a stalled reply's client has gone away
        yield srv


def shown(prompt: str) -> tuple[str, str]:
    """(response A, response B) as the pairwise judge prompt shows them."""
    m = re.search(r"## Response A\n(.*)\n\n## Response B\n(.*)\n\nWhich response", prompt, re.S)
    return m[1], m[2]


def prefer(word: str):
    """A fair judge: picks the response that contains `word`; when both or neither do, it
    picks the first one shown (a position bias the swap must cancel)."""
    def policy(prompt: str) -> str:
        a, b = shown(prompt)
        return "Response B" if word in b and word not in a else "A"
    return policy
