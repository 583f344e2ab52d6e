"""Judge the responses written by train.py: offline scores and an LLM judge; benchmarks run as
`python evaluate.py <benchmark> ...` (MMLU, SQuAD, TriviaQA, ...: see BENCHMARKS and evals/).

Entry points: the pure scores (`exact_match`, `answer_contained`, `token_f1`, `rouge_l`),
`score_entries` / `render_report` and the judge client (`check_judge`, `ask_judge`,
`judge_entries`). Standard library only (HTTP through urllib).
Not a generator: it reads `model_response` fields, it does not produce them.
"""
import argparse
import collections
import http.client
import importlib
import json
import os
import re
import sys
import unicodedata
import urllib.error
import urllib.request
from typing import Callable

from data import (ArgumentParser, atomic_write_bytes, cli_main, format_input, input_file, load_data,
                  non_negative_int, positive_float, write_json)

METRICS = ("exact_match", "answer_contained", "token_f1", "rouge_l", "judge_score")


# ---- offline scores: small pure functions -------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lowercase, delete punctuation ("U.S." -> "us"), drop the articles a/an/the, one space."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(response: str, reference: str) -> float:
    return float(normalize_answer(response) == normalize_answer(reference))


def answer_contained(response: str, answer: str) -> float:
    """1.0 if the normalised answer appears in the normalised response as whole words."""
    a, r = normalize_answer(answer), normalize_answer(response)
    return float(f" {a} " in f" {r} ") if a else float(not r)


def token_f1(response: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (tokens counted with multiplicity)."""
    r, ref = normalize_answer(response).split(), normalize_answer(reference).split()
    if not r or not ref:
        return float(r == ref)
    same = sum((collections.Counter(r) & collections.Counter(ref)).values())
    return 2 * same / (len(r) + len(ref))  # = 2PR / (P + R) with P = same/|r|, R = same/|ref|


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, one row of the DP table at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F1 on normalised tokens: P = lcs/|response|, R = lcs/|reference|."""
    r, ref = normalize_answer(response).split(), normalize_answer(reference).split()
    if not r or not ref:
        return float(r == ref)
    return 2 * lcs_length(r, ref) / (len(r) + len(ref))  # = 2PR / (P + R)


def score_entry(entry: dict) -> dict:
    """Every score of one entry; None where it does not apply (no `answer`, not judged).

    Exact match is 1 when the normalised response equals the normalised `output`, or the
    normalised `answer` when the entry has one (a short answer should not need the full sentence).
    """
    response, output, answer = entry["model_response"], entry["output"], entry.get("answer")
    answer = None if answer is None else str(answer)
    return {"exact_match": max(exact_match(response, output),
                               exact_match(response, answer) if answer is not None else 0.0),
            "answer_contained": None if answer is None else answer_contained(response, answer),
            "token_f1": token_f1(response, output),
            "rouge_l": rouge_l(response, output),
            "judge_score": entry.get("judge_score")}


def average(rows: list[dict]) -> dict:
    """{"n": rows, metric: mean or None, metric + "_n": how many rows have that metric}."""
    out = {"n": len(rows)}
    for m in METRICS:
        values = [r[m] for r in rows if r[m] is not None]
        out[m] = sum(values) / len(values) if values else None
        out[m + "_n"] = len(values)
    return out


def score_entries(entries: list[dict]) -> dict:
    """{"overall": average, "tasks": {task: average}}; entries without a `task` go to "-"."""
    rows = [score_entry(e) for e in entries]
    by_task = collections.defaultdict(list)
    for e, r in zip(entries, rows):
        by_task[str(e.get("task", "-"))].append(r)
    return {"overall": average(rows), "tasks": {t: average(by_task[t]) for t in sorted(by_task)}}


# ---- Markdown report ----------------------------------------------------------------------------
SCORE_NOTES = ("Percentages over normalised text (lowercase, no punctuation, no a/an/the). "
               "Exact match: the response equals `output`, or `answer` when present. "
               "Contained: `answer` appears in the response as whole words. "
               "Token F1 and ROUGE-L (LCS F1): against `output`. "
               "Judge: mean 0-100 score from the LLM judge.")


def cell(text, limit: int = 400) -> str:
    """Text made safe for one Markdown table cell (pipes escaped, newlines as <br>)."""
    text = str(text) if len(str(text)) <= limit else str(text)[:limit] + "…"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def fmt(summary: dict, m: str) -> str:
    """A metric as a percentage (the judge's 0-100 as is), with its count when partial."""
    if summary[m] is None:
        return "-"
    shown = f"{summary[m] if m == 'judge_score' else 100 * summary[m]:.1f}"
    return shown if summary[m + "_n"] == summary["n"] else f"{shown} (n={summary[m + '_n']})"


def render_worst(entries: list[dict], n: int) -> list[str]:
    """The n worst entries side by side: by judge score when judged, else by ROUGE-L then F1."""
    rows = [score_entry(e) for e in entries]
    judged = any(r["judge_score"] is not None for r in rows)

    def badness(i: int) -> tuple:  # lowest first; unjudged entries after every judged one
        r = rows[i]
        return (r["judge_score"] is None, r["judge_score"] or 0) if judged \
            else (r["rouge_l"], r["token_f1"])
    ranked = sorted(range(len(entries)), key=badness)[:n]
    lines = [f"## {len(ranked)} worst entries (by {'judge score' if judged else 'ROUGE-L'})", "",
             "| # | Instruction | Expected | Model response | F1 | ROUGE-L | Judge |",
             "|---:|---|---|---|---:|---:|---:|"]
    for i in ranked:
        e, r = entries[i], rows[i]
        prompt = e["instruction"] + (f"\n\n{e['input']}" if e.get("input") else "")
        judge = "-" if r["judge_score"] is None else r["judge_score"]
        lines.append(f"| {i} | {cell(prompt)} | {cell(e['output'])} | {cell(e['model_response'])} "
                     f"| {100 * r['token_f1']:.0f} | {100 * r['rouge_l']:.0f} | {judge} |")
    return lines


def render_report(entries: list[dict], worst: int = 10, source: str = "") -> str:
    """Markdown: what the scores mean, a table overall and per task, the entries the judge left
    unscored (`judge_score` null), then the `worst` entries."""
    scores = score_entries(entries)
    unscored = [i for i, e in enumerate(entries) if "judge_score" in e and e["judge_score"] is None]
    lines = [f"# Evaluation of {source or 'responses'}", "",
             f"{len(entries)} entries. {SCORE_NOTES}", "",
             "| Task | N | Exact match | Contained | Token F1 | ROUGE-L | Judge |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    groups = [("**all**", scores["overall"])]
    if list(scores["tasks"]) != ["-"]:  # per-task rows only when the file has tasks
        groups += list(scores["tasks"].items())
    for name, s in groups:
        lines.append(f"| {cell(name)} | {s['n']} | " + " | ".join(fmt(s, m) for m in METRICS)
                     + " |")
    if unscored:
        lines += ["", f"Not scored by the judge ({len(unscored)}): entries "
                  + ", ".join(map(str, unscored))]
    if worst > 0 and entries:
        lines += [""] + render_worst(entries, worst)
    return "\n".join(lines) + "\n"


# ---- LLM judge over HTTP: Ollama /api/chat, or any OpenAI-compatible /v1/chat/completions ------
class JudgeError(OSError):
    """The judge could not be reached or answered badly; the message names the URL."""


DEFAULT_URLS = {"ollama": "http://localhost:11434", "openai": "https://api.openai.com/v1"}


def judge_prompt(entry: dict) -> str:
    return (f"Given the input `{format_input(entry)}` and the correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}` on a scale from 0 to 100, "
            "where 100 is the best score. Respond with the integer number only.")


def parse_score(reply: str) -> int | None:
    """The first whole number from 0 to 100 in the reply (decimals such as 7.5 are skipped)."""
    for m in re.finditer(r"\d+(?:\.\d+)?", reply):
        if m[0].isdigit() and int(m[0]) <= 100:
            return int(m[0])
    return None


def endpoint(kind: str, url: str, what: str) -> str:
    """Full URL of "chat" or "models"; an OpenAI base URL may end in /v1 or not."""
    base = url.rstrip("/")
    if kind == "ollama":
        return base + {"chat": "/api/chat", "models": "/api/tags"}[what]
    base = base if base.endswith("/v1") else base + "/v1"
    return base + {"chat": "/chat/completions", "models": "/models"}[what]


def http_json(kind: str, url: str, body: dict | None, timeout: float, lines: bool = False):
    """GET (body None) or POST JSON; the parsed reply, or a list of parsed lines if `lines`."""
    headers = {"Content-Type": "application/json"}
    if kind == "openai" and os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                     headers)
    try:  # timeout bounds the connect and each read, so a stalled stream fails too
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = [line for line in r if line.strip()] if lines else [r.read()]
        parsed = [json.loads(line) for line in raw]
    except urllib.error.HTTPError as e:
        detail = e.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
        raise JudgeError(f"judge at {url} answered HTTP {e.code}: {detail or e.reason}") from None
    except (TimeoutError, urllib.error.URLError) as e:
        if isinstance(e, TimeoutError) or isinstance(e.reason, TimeoutError):
            raise JudgeError(f"judge at {url} did not answer within {timeout:g}s") from None
        raise JudgeError(f"cannot reach the judge at {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise JudgeError(f"bad reply from the judge at {url}: {e.__class__.__name__}") from None
    return parsed if lines else parsed[0]


def check_judge(kind: str, url: str, model: str, timeout: float) -> None:
    """Fail before any scoring if the judge is not running (or, for Ollama, lacks the model)."""
    target = endpoint(kind, url, "models")
    reply = http_json(kind, target, None, timeout)
    if kind == "ollama":
        if not isinstance(reply, dict) or not isinstance(reply.get("models"), list):
            raise JudgeError(f"judge at {target} sent a reply without the expected fields")
        names = {m.get("name") for m in reply["models"] if isinstance(m, dict)}
        if model not in names and f"{model}:latest" not in names:
            raise JudgeError(f"judge at {url} has no model {model!r} (try `ollama pull {model}`)")


def ask_judge(kind: str, url: str, model: str, prompt: str, timeout: float) -> str:
    """One chat turn with the judge at temperature 0; returns the reply text."""
    target, messages = endpoint(kind, url, "chat"), [{"role": "user", "content": prompt}]
    try:
        if kind == "openai":
            body = {"model": model, "messages": messages, "temperature": 0}
            return http_json(kind, target, body, timeout)["choices"][0]["message"]["content"] or ""
        # Ollama streams one JSON object per line, each holding the next piece of the reply
        body = {"model": model, "messages": messages, "stream": True,
                "options": {"temperature": 0, "seed": 123}}
        chunks = http_json(kind, target, body, timeout, lines=True)
        errors = [c["error"] for c in chunks if "error" in c]
        if errors:
            raise JudgeError(f"judge at {target}: {errors[0]}")
        return "".join(c["message"]["content"] for c in chunks if "message" in c)
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge at {target} sent a reply without the expected fields") from None


def judge_entries(entries: list[dict], ask: Callable[[str], str],
                  progress: bool = True) -> list[int | None]:
    """A 0-100 score per entry, None if two replies held no number; `ask` maps prompt -> reply."""
    scores = []
    for i, entry in enumerate(entries, 1):
        prompt = judge_prompt(entry)
        score = parse_score(ask(prompt))
        if score is None:  # one retry: servers that ignore temperature 0 may answer properly
            score = parse_score(ask(prompt))
        scores.append(score)
        if progress:
            print(f"\rjudge {i}/{len(entries)}", end="\n" if i == len(entries) else "",
                  file=sys.stderr, flush=True)
    return scores


# ---- command line -------------------------------------------------------------------------------
def load_responses(path: str) -> list[dict]:
    """Entries checked by data.load_data, each with a string `model_response` as well."""
    entries = load_data(path)
    for i, e in enumerate(entries):
        if not isinstance(e.get("model_response"), str):
            raise ValueError(f"{path}: entry {i} has no string 'model_response' "
                             "(run train.py or generate.py first)")
        score = e.get("judge_score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise ValueError(f"{path}: entry {i} has a non-numeric 'judge_score' {score!r}")
    return entries


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """The judge's flags, here and in the comparisons that use one (pairwise, arena)."""
    p.add_argument("--judge", choices=("ollama", "openai"), help="score with this LLM judge")
    p.add_argument("--judge-url", help="ollama: default http://localhost:11434; openai: base URL "
                                       "with or without /v1, default https://api.openai.com/v1")
    p.add_argument("--judge-model", default="llama3", help="judge model name")
    p.add_argument("--judge-timeout", type=positive_float, default=120.0,
                   help="seconds to wait for the judge's next bytes")


def responses_file(text: str) -> str:
    """The responses file's type: a file to read; a word that is neither a file nor a benchmark
    is most likely a benchmark's name misspelt, or a benchmark's option put before its name."""
    try:
        return input_file(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}, nor a benchmark ({', '.join(BENCHMARKS)}); a "
                                         f"benchmark's options go after its name") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        "Score the responses train.py or generate.py wrote (the model_response fields): exact "
        "match, answer contained, token F1, ROUGE-L and, with --judge, an LLM judge's 0-100.",
        prog="evaluate.py", usage="%(prog)s [options] RESPONSES\n"
        "       %(prog)s BENCHMARK [options] ...   (%(prog)s BENCHMARK -h: its options)",
        epilog=f"BENCHMARK: {', '.join(BENCHMARKS)} (docs/evaluation.md). Options given before "
               f"a benchmark's name (--quiet, --debug) apply to it.")
    p.add_argument("responses", type=responses_file, metavar="RESPONSES",
                   help="OUT/instruction-data-with-response.json")
    p.add_argument("--report", help="also write the report, with the worst entries, as Markdown")
    p.add_argument("--worst", type=non_negative_int, default=10,
                   help="worst entries in --report, 0: none")
    add_judge_args(p)
    p.add_argument("--write-scores", action="store_true",
                   help="store the judge's scores in the responses file as judge_score")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.write_scores and not args.judge:
        p.error("--write-scores needs --judge")
    return args


# `python evaluate.py <benchmark> ...` runs the `main(argv)` of a small file in evals/; those files
# import this one, never the reverse: a benchmark's module is looked up only when it is asked for.
BENCHMARKS = {name: f"evals.{module}" for name, module in (
    ("squad", "squad"), ("triviaqa", "triviaqa"), ("bigbench", "bigbench"),
    ("openai-evals", "openai_evals"), ("mmlu", "mmlu"), ("glue", "glue"),
    ("superglue", "superglue"), ("humaneval", "humaneval"), ("pairwise", "pairwise"),
    ("arena", "arena"), ("ratings", "ratings"), ("report", "report"))}


def split_benchmark(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the benchmark asked for or None, its arguments); options before its name (--quiet,
    --debug) move after it, where its own parser reads them."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return (arg, argv[i + 1:] + argv[:i]) if arg in BENCHMARKS else (None, argv)
    return None, argv


def main(argv=None) -> None:
    benchmark, argv = split_benchmark(sys.argv[1:] if argv is None else argv)
    if benchmark:
        return importlib.import_module(BENCHMARKS[benchmark]).main(argv)
    args = parse_args(argv)
    entries = load_responses(args.responses)
    if args.judge:
        url = args.judge_url or DEFAULT_URLS[args.judge]
        check_judge(args.judge, url, args.judge_model, args.judge_timeout)

        def ask(prompt: str) -> str:
            return ask_judge(args.judge, url, args.judge_model, prompt, args.judge_timeout)
        scores = judge_entries(entries, ask, progress=not args.quiet)
        for entry, score in zip(entries, scores):
            entry["judge_score"] = score
        if args.write_scores:
            write_json(args.responses, entries)
    print(render_report(entries, worst=0, source=args.responses), end="")
    if args.report:
        text = render_report(entries, args.worst, source=args.responses)
        atomic_write_bytes(args.report, text.encode("utf-8"))
        print(f"report written to {args.report}")


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
