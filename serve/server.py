"""Talk to a trained model: an OpenAI-compatible HTTP server and a chat page (chat.html at GET /);
given two or more models, also an arena page at /arena (serve/arena.py) that compares them blind.

Entry points: `Handler` (routes, errors, streaming), `make_app` / `load_app` / `make_server`, and
the command line `python serve/server.py out/model.pt [more.pt ...]`. Standard library HTTP only;
openai_api.py reads and writes the JSON, batching.Engine generates. Not a production server: no
TLS, the API answers with the first model only, single turns.
"""
import argparse
import hmac
import http.server
import ipaddress
import json
import select
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the chapter's files

from data import (PROMPT_STYLES, ArgumentParser, cli_main, get_tokenizer, input_file,  # noqa: E402
                  non_negative_int, number, positive_int)
from evals.arena import model_names  # noqa: E402
from generate import check_writable  # noqa: E402
from extras.book_format import load_any_model as load_model  # noqa: E402
from gpt import DEVICE_HELP, pick_device, usable_device  # noqa: E402
from serve.arena import ROUTES as ARENA_ROUTES  # noqa: E402
from serve.arena import Arena, Contestant  # noqa: E402
from serve.batching import Engine, Request  # noqa: E402
from serve.openai_api import ApiError, choice, error_body, get, parse_request, usage  # noqa: E402

PAGE = Path(__file__).with_name("chat.html")


@dataclass
class App:
    """What the handlers share: the engine, the tokenizer and the server's settings."""
    engine: Engine
    tokenizer: object
    context_length: int
    model_name: str
    style: str = "alpaca"
    api_key: str | None = None
    default_max_tokens: int = 256
    max_body: int = 1 << 20
    page: bytes = field(default_factory=lambda: PAGE.read_bytes())
    created: int = field(default_factory=lambda: int(time.time()))
    arena: Arena | None = None  # the models compared at /arena (the first one is `engine`'s)


def not_json(constant: str) -> NoReturn:
    """NaN and Infinity are not JSON (Python reads them; they would poison sampling)."""
    raise ValueError(f"{constant} is not a JSON value")


class ClientGone(Exception):
    """The client closed its connection (or stopped reading for `Handler.timeout` seconds)."""


class Handler(http.server.BaseHTTPRequestHandler):
    """One thread per connection: it parses, hands the request to the engine, and writes the
    reply from the request's own event queue, so a slow reader only ever slows itself."""
    protocol_version = "HTTP/1.1"
    server_version = "gpt2-instruct"
    timeout = 60  # seconds a read or write may stall before the connection is dropped
    quiet = False

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    do_PUT = do_DELETE = do_PATCH = lambda self: self.route(self.command)  # noqa: E731

    def route(self, method: str) -> None:
        app, path = self.server.app, self.path.split("?")[0]
        self.streaming = False
        try:
            if path not in ROUTES:
                raise ApiError(404, f"no such path {path[:80]}; try /v1/chat/completions, "
                                    "/v1/completions, /v1/models, /healthz or /")
            allowed, action = ROUTES[path]
            if method != allowed:
                raise ApiError(405, f"{path} takes {allowed}, not {method}", None,
                               {"Allow": allowed})
            if path.startswith(("/v1/", "/arena/")) and app.api_key:  # what spends compute
                given = self.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {app.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send 'Authorization: "
                                        "Bearer KEY'", None, {"WWW-Authenticate": "Bearer"})
            action(self, app)
        except ApiError as e:
            self.send_json(e.status, error_body(e.status, e.message, e.param), e.headers)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 if still possible, and keep serving
            traceback.print_exc()
            if not self.streaming:
                self.send_json(500, error_body(500, f"internal error: {e.__class__.__name__}"))
            self.close_connection = True

    def send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status >= 400:  # the request's body may be unread: never parse it as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method) as JSON too."""
        self.send_json(code, error_body(code, message or self.responses.get(code, ("",))[0]))

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def read_json(self, app: App) -> dict:
        # JSON only: a web page elsewhere cannot send that type to 127.0.0.1 without a CORS
        # preflight, which this server never grants (a plain-text POST could spend its compute)
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "send the body as JSON, with 'Content-Type: application/json'")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked bodies are not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a POST needs a Content-Length header")
        if int(length) > app.max_body:
            raise ApiError(413, f"body of {length} bytes is over the limit of {app.max_body}")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw, parse_constant=not_json)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"body is not valid JSON ({str(e)[:80]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    def client_gone(self) -> bool:
        """True if the client closed the connection: readable, yet nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def events(self, request: Request) -> Iterator[tuple]:
        """The request's events as the engine makes them, until "done" or "error"."""
        while True:
            if not request.ready.acquire(timeout=0.2):
                if self.client_gone():
                    raise ClientGone()
                continue
            event = request.events.popleft()
            yield event
            if event[0] != "delta":
                return

    def completions(self, app: App, chat: bool) -> None:
        body = self.read_json(app)
        request = parse_request(body, chat, app.tokenizer, app.context_length, app.style,
                                app.default_max_tokens, app.engine.device)
        stream = get(body, "stream", (bool,), False)
        with_usage = get(get(body, "stream_options", (dict,), {}), "include_usage", (bool,), False)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": app.model_name}
        self.submit(app.engine, request)
        try:
            if stream:
                self.stream(request, head, chat, with_usage)
            else:
                self.answer(request, head, chat)
        finally:
            request.cancelled.set()  # a no-op once finished; frees the slot if we left early

    def submit(self, engine: Engine, request: Request) -> None:
        if not engine.submit(request):
            raise ApiError(503, f"server busy: {engine.max_queue} requests already wait; "
                                "retry later")

    def collect(self, request: Request) -> tuple[str, tuple]:
        """The whole answer and its "done" event; an "error" event becomes its ApiError."""
        pieces = []
        for event in self.events(request):
            if event[0] == "delta":
                pieces.append(event[1])
            elif event[0] == "error":
                raise ApiError(event[1], event[2])
            else:
                return "".join(pieces), event

    def answer(self, request: Request, head: dict, chat: bool) -> None:
        text, done = self.collect(request)
        self.send_json(200, {**head, "choices": [choice(chat, text, done[1], False)],
                             "usage": usage(*done[2:])})

    def stream(self, request: Request, head: dict, chat: bool, with_usage: bool) -> None:
        """Server-sent events: `data: {chunk}` per piece of text, then `data: [DONE]`."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                            ("Connection", "close")):
            self.send_header(name, value)
        self.end_headers()
        self.streaming, self.close_connection = True, True
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def send(obj) -> None:
            self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
                             .encode())
        if chat:  # the role comes first, as OpenAI's streams do
            send({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})
        for event in self.events(request):
            if event[0] == "delta":
                send({**head, "choices": [choice(chat, event[1], None, True)]})
            elif event[0] == "error":
                send(error_body(event[1], event[2]))
            else:
                send({**head, "choices": [choice(chat, None, event[1], True)]})
                if with_usage:
                    send({**head, "choices": [], "usage": usage(*event[2:])})
                send("[DONE]")


ROUTES = {
    "/": ("GET", lambda h, app: h.send_bytes(200, app.page, "text/html; charset=utf-8")),
    "/healthz": ("GET", lambda h, app: h.send_json(200, {"status": "ok", "model": app.model_name,
                                                         **app.engine.stats()})),
    "/v1/models": ("GET", lambda h, app: h.send_json(200, {"object": "list", "data": [
        {"id": app.model_name, "object": "model", "created": app.created,
         "owned_by": "gpt2-instruct", "max_model_len": app.context_length}]})),
    "/v1/chat/completions": ("POST", lambda h, app: h.completions(app, chat=True)),
    "/v1/completions": ("POST", lambda h, app: h.completions(app, chat=False)),
    **ARENA_ROUTES,  # /arena: 404 unless two or more models are served
}


# ---- putting it together ------------------------------------------------------------------------
def make_engine(model, tokenizer, max_batch: int = 8, max_queue: int = 32) -> Engine:
    """The model's engine; its thread starts now."""
    return Engine(model, tokenizer.eot_token, tokenizer.decode_single_token_bytes, max_batch,
                  max_queue)


def make_app(model, cfg: dict, model_name: str, max_batch: int = 8, max_queue: int = 32,
             **settings) -> App:
    """An App around `model` (its Engine thread starts now); settings: App's fields."""
    tokenizer = get_tokenizer()
    return App(make_engine(model, tokenizer, max_batch, max_queue), tokenizer,
               cfg["context_length"], model_name, **settings)


def served_names(paths: list[str], given: list[str] | None) -> list[str]:
    """--model-name once per model if given, else the files' names (the paths if two share one)."""
    stems = [Path(p).stem for p in paths]
    return model_names(paths, given or (stems if len(set(stems)) == len(stems) else None),
                       "--model-name")


def load_app(args: argparse.Namespace) -> App:
    """The command line's App: the first model behind the API and the chat page; with two or
    more models, all of them in the arena, each with its own engine and its own prompt style."""
    names = served_names(args.model_paths, args.model_name)
    if len(names) > 1:
        check_writable(args.battles, "--battles")  # fail now, not at the first vote
    device = pick_device(args.device)
    loaded = [load_model(path, device=device) for path in args.model_paths]
    styles = [args.prompt_style or cfg.get("prompt_style", "alpaca") for _, cfg in loaded]
    app = make_app(*loaded[0], names[0], args.max_batch, args.max_queue, style=styles[0],
                   api_key=args.api_key, default_max_tokens=args.max_tokens,
                   max_body=args.max_body)
    if len(loaded) > 1:
        engines = [app.engine] + [make_engine(model, app.tokenizer, args.max_batch,
                                              args.max_queue) for model, _ in loaded[1:]]
        app.arena = Arena([Contestant(name, engine, cfg["context_length"], style) for
                           name, engine, (_, cfg), style in zip(names, engines, loaded, styles)],
                          args.battles, args.seed)
    return app


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000,
                quiet: bool = False) -> http.server.ThreadingHTTPServer:
    """A bound server (port 0: a free one); call its serve_forever() to answer."""
    handler = type("QuietHandler" if quiet else "Handler", (Handler,), {"quiet": quiet})
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True  # a stuck client never blocks shutdown
    server.app = app
    return server


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may well be reachable
        return False


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Serve a trained model: an OpenAI-compatible API under /v1 and a chat page "
                       "at /; with two or more models, an arena page at /arena that compares "
                       "them blind.", prog="server.py")
    p.add_argument("model_paths", metavar="MODEL", nargs="+", type=input_file,
                   help="model.pt written by train.py; with two or more, the API and chat page "
                        "use the first and the arena page at /arena compares them all")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 127.0.0.1: this machine only, 0.0.0.0: all")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000,
                   help="port, 0: a free one")
    p.add_argument("--api-key",
                   help="require 'Authorization: Bearer KEY' on /v1/ and /arena/ requests")
    p.add_argument("--model-name", action="append",
                   help="the model's id in the API and its name in the arena (default: the "
                        "file's name); give it once per model")
    p.add_argument("--battles", default="battles.jsonl",
                   help="with two or more models: the JSON-lines file each arena vote is added "
                        "to, as `evaluate.py arena` writes it")
    p.add_argument("--seed", type=non_negative_int,
                   help="seed of the arena's pairings (default: random)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES,
                   help="default: the style the model was trained with (else alpaca)")
    p.add_argument("--device", type=usable_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="requests generated together; more wait in the queue")
    p.add_argument("--max-queue", type=positive_int, default=32,
                   help="requests that may wait; past that the server answers 503")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="answer length when a request does not set max_tokens")
    p.add_argument("--max-body", type=positive_int, default=1 << 20,
                   help="largest request body in bytes; larger ones get 413")
    p.add_argument("--quiet", action="store_true", help="no log line per request")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    app = load_app(args)
    server = make_server(app, args.host, args.port, args.quiet)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} with no authentication: anyone who can reach "
              "this port can use the model (add --api-key KEY)", file=sys.stderr, flush=True)
    host, port = server.server_address[:2]
    if app.arena:
        print(f"arena of {len(app.arena.contestants)} models at http://{host}:{port}/arena, "
              f"votes added to {args.battles}", file=sys.stderr, flush=True)
    print(f"serving {app.model_name} on http://{host}:{port}/ (chat page), API at "
          f"http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
