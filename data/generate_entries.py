"""Write new instruction entries with a local LLM (Ollama or an OpenAI-compatible server).
The book's way (ch07/05_dataset-generation, the "Magpie" method): the model's own chat template,
opened at the user turn, goes out as a raw prompt, so the model writes an instruction; a normal
chat turn then asks for its response. HTTP through evaluate.py's judge client.

Entry points: `make_entry`, `generate_entries`, `main`.

    python data/generate_entries.py --backend ollama --model llama3 --n 200 --out my-data.json

--n is the total the file should hold: running the same command again resumes an interrupted run
(OUT.progress beside the file keeps the next attempt's seed, so no finished request is repeated).
Not a filter for existing data: it only skips its own malformed or duplicate answers.
"""
import argparse
import collections
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core: data.py, evaluate.py
from data import (ArgumentParser, cli_main, entry_problem, load_data, non_negative_float,  # noqa: E402
                  non_negative_int, positive_float, positive_int, write_json)
from evaluate import DEFAULT_URLS, JudgeError, check_judge, endpoint, http_json  # noqa: E402
from evaluate import normalize_answer  # noqa: E402

# A pre-query template is the chat template up to where the user's text would begin; the model
# continues it with a user message. The stops end that message where the model would close it.
PRESETS = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
               ["<|eot_id|>", "<|start_header_id|>"]),
    "phi3": ("<|user|>\n", ["<|end|>", "<|assistant|>"]),
    "chatml": ("<|im_start|>user\n", ["<|im_end|>", "<|im_start|>"]),  # Qwen, SmolLM, ...
}
URLS = {"ollama": DEFAULT_URLS["ollama"], "openai": "http://localhost:8000/v1"}  # vLLM's port
INSTRUCTION_TOKENS = 256  # an instruction that needs more was cut off: skipped as "too long"
SKIPS_IN_A_ROW = 50       # then the server is not sampling (seed ignored?) or the template is wrong


# ---- talking to the server ----------------------------------------------------------------------
class ServerError(OSError):
    """The server could not be reached or broke the protocol: the run stops (and can resume)."""


@dataclass
class Server:
    kind: str  # "ollama" or "openai"
    url: str
    model: str
    timeout: float


class Sampling(NamedTuple):
    seed: int
    temperature: float
    max_tokens: int
    stop: list[str]


class Reply(NamedTuple):
    text: object     # a str, unless the server sent something else (then the answer is skipped)
    truncated: bool  # the server stopped at max_tokens


@contextlib.contextmanager
def server_errors():
    """evaluate.http_json's messages name "the judge"; here the same model is the generator."""
    try:
        yield
    except JudgeError as e:
        raise ServerError(str(e).replace("judge", "server", 1)) from None


def api_url(kind: str, url: str, what: str) -> str:
    """URL of "complete" (a raw prompt, no chat template), "chat" or "models"."""
    if what != "complete":
        return endpoint(kind, url, what)
    base = url.rstrip("/")
    if kind == "ollama":
        return base + "/api/generate"
    return (base if base.endswith("/v1") else base + "/v1") + "/completions"


def dig(target: str, obj, *keys):
    """obj[k1][k2]...; a ServerError (the run stops, the protocol broke) if the reply lacks them."""
    try:
        for key in keys:
            obj = obj[key]
        return obj
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"server at {target} sent a reply without the expected fields") from None


def ollama_reply(target: str, chunks: list, keys: tuple) -> Reply:
    """Ollama streams one JSON object per line, each with the next piece of text; the last one says
    why it stopped. A server that does not stream sends the same fields in one object."""
    errors = [c["error"] for c in chunks if isinstance(c, dict) and "error" in c]
    if errors:
        raise ServerError(f"server at {target}: {errors[0]}")
    pieces = [dig(target, c, *keys) for c in chunks]
    text = "".join(pieces) if all(isinstance(p, str) for p in pieces) else None
    return Reply(text, any(c.get("done_reason") == "length" for c in chunks))


def stop_field(sampling: Sampling) -> dict:
    return {"stop": sampling.stop} if sampling.stop else {}  # some servers refuse an empty list


def ask_ollama(server: Server, what: str, prompt: dict, sampling: Sampling) -> Reply:
    """/api/generate with "raw" (no template around the prompt) or /api/chat, streamed. Sampling
    goes in "options": Ollama ignores top-level fields such as "seed"."""
    target = api_url("ollama", server.url, what)
    options = {"seed": sampling.seed, "temperature": sampling.temperature, "top_p": 1.0,
               "num_predict": sampling.max_tokens, **stop_field(sampling)}
    body = {"model": server.model, **prompt, "stream": True, "options": options}
    if what == "complete":
        body["raw"] = True
    with server_errors():
        chunks = http_json("ollama", target, body, server.timeout, lines=True)
    return ollama_reply(target, chunks, ("response",) if what == "complete"
                        else ("message", "content"))


def ask_openai(server: Server, what: str, prompt: dict, sampling: Sampling) -> Reply:
    """/v1/completions (the prompt as is) or /v1/chat/completions, one JSON reply."""
    target = api_url("openai", server.url, what)
    body = {"model": server.model, **prompt, "seed": sampling.seed, "top_p": 1.0,
            "temperature": sampling.temperature, "max_tokens": sampling.max_tokens,
            **stop_field(sampling)}
    with server_errors():
        reply = http_json("openai", target, body, server.timeout)
    choice = dig(target, reply, "choices", 0)
    text = dig(target, choice, "text") if what == "complete" else \
        dig(target, choice, "message", "content")
    return Reply(text, choice.get("finish_reason") == "length")


def ask(server: Server, what: str, text: str, sampling: Sampling) -> Reply:
    """One request: "complete" sends `text` as the raw prompt, "chat" as the user's turn."""
    prompt = {"prompt": text} if what == "complete" else \
        {"messages": [{"role": "user", "content": text}]}
    return (ask_ollama if server.kind == "ollama" else ask_openai)(server, what, prompt, sampling)


# ---- one entry: an instruction, then its response; or why the answers were skipped --------------
@dataclass
class Recipe:
    template: str          # the pre-query template, sent exactly as written
    stops: list[str]
    temperature: float = 1.0  # the book's; Magpie samples at 1.0 with top_p 1.0 too
    max_tokens: int = 1024    # of the response; one that needs more is skipped as "too long"


def unescape(text: str) -> str:
    """\\n and \\t typed as two characters on the command line become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def read_template(text: str) -> str:
    """A preset's template, or the literal text (unescaped)."""
    return PRESETS[text][0] if text in PRESETS else unescape(text)


MARKER = re.compile(r"<\|?[^<>|\s]+\|?>|\[/?[A-Z]+\]")  # <|im_start|>, <start_of_turn>, [INST]


def template_markers(template: str) -> list[str]:
    """The special pieces of a template, which a real user message would not contain."""
    return MARKER.findall(template)


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text before the first stop string: a server that ignores "stop" runs on into the reply."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def answer_problem(reply: Reply) -> str | None:
    """Why a reply's text cannot go into an entry, or None."""
    if not isinstance(reply.text, str):
        return "not text"
    if not reply.text.strip():
        return "empty"
    return "too long" if reply.truncated else None


def echoes_template(instruction: str, template: str) -> bool:
    """The model wrote template pieces (or only the template's words) instead of a user message."""
    plain = MARKER.sub(" ", template)
    return any(m in instruction for m in template_markers(template)) or \
        normalize_answer(instruction) == normalize_answer(plain)


def make_entry(server: Server, recipe: Recipe, seed: int,
               seen: set[str]) -> tuple[dict | None, str | None]:
    """(entry, None), or (None, why it was skipped). Both requests of an attempt use its seed;
    an instruction whose entry_key is in `seen` gets no response request."""
    reply = ask(server, "complete", recipe.template,
                Sampling(seed, recipe.temperature, INSTRUCTION_TOKENS, recipe.stops))
    if isinstance(reply.text, str):
        reply = reply._replace(text=cut_at_stops(reply.text, recipe.stops).strip())
    if problem := answer_problem(reply):
        return None, problem
    if echoes_template(reply.text, recipe.template):
        return None, "template echo"
    instruction = reply.text
    if entry_key({"instruction": instruction}) in seen:
        return None, "duplicate"
    reply = ask(server, "chat", instruction,
                Sampling(seed, recipe.temperature, recipe.max_tokens, []))
    if problem := answer_problem(reply):
        return None, problem
    entry = {"instruction": instruction, "input": "", "output": reply.text.strip(),
             "generator": f"{server.kind}:{server.model}", "seed": seed}
    return (None, "not text") if entry_problem(entry) else (entry, None)  # e.g. a lone surrogate


def entry_key(entry: dict) -> str:
    """What makes two entries the same: instruction and input, case/punctuation/spaces ignored."""
    return normalize_answer(entry["instruction"]) + "\n" + normalize_answer(entry.get("input", ""))


# ---- the run: attempts until the file holds n entries ------------------------------------------
@dataclass
class Run:
    entries: list[dict]  # the file's entries, then this run's
    next_seed: int       # the seed of the next attempt; stored so a resumed run never repeats one
    new: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    start: float = field(default_factory=time.perf_counter)


def generate_entries(run: Run, target: int, attempt: Callable[[int, set], tuple],
                     save: Callable[[Run], None], save_every: int = 10,
                     show: Callable[[Run], None] = lambda run: None) -> None:
    """Attempt seed after seed until run.entries holds `target` entries, counting the skipped
    attempts; save after every `save_every` new entries. `attempt(seed, keys of the entries so
    far)` returns make_entry's pair. A ServerError leaves run.next_seed at the failed attempt."""
    keys = {entry_key(e) for e in run.entries}
    in_a_row = 0
    while len(run.entries) < target:
        entry, problem = attempt(run.next_seed, keys)
        run.next_seed += 1
        if entry is None:
            run.skipped[problem] += 1
            in_a_row += 1
            if in_a_row >= SKIPS_IN_A_ROW:
                raise ServerError(f"the last {in_a_row} answers were all skipped "
                                  f"({describe(run)}); does the server ignore the seed, or not "
                                  "fit the --template?")
        else:
            run.entries.append(entry)
            keys.add(entry_key(entry))
            run.new, in_a_row = run.new + 1, 0
            if run.new % save_every == 0:
                save(run)
        show(run)


def describe(run: Run) -> str:
    """"skipped 3: 2 empty, 1 duplicate" or "skipped none"."""
    if not run.skipped:
        return "skipped none"
    parts = ", ".join(f"{n} {why}" for why, n in run.skipped.most_common())
    return f"skipped {sum(run.skipped.values())}: {parts}"


def progress_line(run: Run, target: int) -> str:
    per_entry = (time.perf_counter() - run.start) / run.new if run.new else 0.0
    return f"\rentries {len(run.entries)}/{target}, {describe(run)}, {per_entry:.1f} s/entry"


# ---- files: the entries, and beside them the next seed ------------------------------------------
def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def first_seed(entries: list[dict], progress: Path, seed: int) -> int:
    """The next attempt's seed: after every seed the file's entries and its .progress file record
    (attempts that were skipped leave no entry), and never below --seed."""
    seeds = [seed] + [e["seed"] + 1 for e in entries if type(e.get("seed")) is int]
    if progress.exists():
        try:
            stored = json.loads(progress.read_text(encoding="utf-8"))["next_seed"]
        except (ValueError, KeyError, TypeError):
            stored = None
        if type(stored) is not int:
            raise ValueError(f"{progress} holds no integer next_seed (delete it to start anew)")
        seeds.append(stored)
    return max(seeds)


def save(out: Path, run: Run) -> None:
    """Both files atomically, entries first: a crash between the two leaves an older .progress,
    and first_seed still starts after the entries' seeds. The entries only once this run has
    added some: a file it could not extend stays as it was, and no empty list is ever written
    (load_data would refuse it)."""
    if run.new:
        write_json(out, run.entries)
    write_json(progress_path(out), {"next_seed": run.next_seed})


def run_and_save(run: Run, target: int, attempt: Callable[[int, set], tuple], out: Path,
                 save_every: int, show: Callable[..., None]) -> None:
    """generate_entries, and the files saved however it ends: done, a server error, Ctrl-C."""
    show(run)
    try:
        generate_entries(run, target, attempt, lambda run: save(out, run), save_every, show)
    finally:
        save(out, run)
        show(run, "\n")  # end the progress line before any message


# ---- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="generate_entries.py")
    p.add_argument("--backend", choices=("ollama", "openai"), default="ollama",
                   help="the server's protocol")
    p.add_argument("--url", help=f"ollama: default {URLS['ollama']}; openai (/v1/completions and "
                                 f"/v1/chat/completions): base URL, default {URLS['openai']}")
    p.add_argument("--model", default="llama3", help="model name on the server")
    p.add_argument("--n", type=positive_int, required=True, help="entries the file should hold")
    p.add_argument("--out", required=True, help="JSON file to write, or to extend and resume")
    p.add_argument("--template", default="llama3",
                   help=f"pre-query template: a preset ({', '.join(PRESETS)}) or the literal text "
                        "the model continues with a user message, no {} placeholders, \\n for a "
                        "newline")
    p.add_argument("--stop", action="append", help="text that ends the user message (repeatable, "
                                                    "\\n for a newline; default: the preset's)")
    p.add_argument("--seed", type=non_negative_int, default=123,
                   help="first attempt's seed in a new file; attempt i uses seed + i")
    p.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="the server's sampling temperature, 0: greedy")
    p.add_argument("--max-tokens", type=positive_int, default=1024,
                   help="longest response; longer ones are skipped")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="seconds to wait for the server's next bytes")
    p.add_argument("--save-every", type=positive_int, default=10,
                   help="rewrite the file after this many new entries")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not read_template(args.template).strip():
        p.error("--template is empty")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    entries = load_data(str(out)) if out.exists() else []
    run = Run(entries, first_seed(entries, progress_path(out), args.seed))
    if len(entries) >= args.n:
        print(f"{out} already holds {len(entries)} entries (--n {args.n}): nothing to do")
        return
    out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not at the first save
    server = Server(args.backend, args.url or URLS[args.backend], args.model, args.timeout)
    with server_errors():  # before any work: is the server there, with the model (Ollama)?
        check_judge(server.kind, server.url, server.model, server.timeout)
    stops = [unescape(s) for s in args.stop if s] if args.stop is not None \
        else PRESETS.get(args.template, ("", []))[1]
    recipe = Recipe(read_template(args.template), stops, args.temperature, args.max_tokens)

    def show(run: Run, end: str = "") -> None:
        if not args.quiet:
            print(progress_line(run, args.n), end=end, file=sys.stderr, flush=True)
    try:
        run_and_save(run, args.n, lambda seed, seen: make_entry(server, recipe, seed, seen), out,
                     args.save_every, show)
    except ServerError as e:
        raise ServerError(f"{e}; {len(run.entries)} of {args.n} entries are in {out}: "
                          "run the same command again to resume") from None
    except KeyboardInterrupt:
        print(f"{len(run.entries)} of {args.n} entries are in {out}: run the same command "
              "again to resume", file=sys.stderr)
        raise
    print(f"{out}: {len(run.entries)} entries, {run.new} new; {describe(run)}")

if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
