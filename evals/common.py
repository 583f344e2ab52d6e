"""What every benchmark file shares: the command-line flags, loading the model, generating
answers with the project's cached batched generation, scoring options by log-likelihood, and
writing predictions, scores and report sections (each file written atomically).
"""
import argparse
import collections
import json
import re
import string
import sys
from pathlib import Path

import torch

from data import (PROMPT_STYLES, ArgumentParser, atomic_write_bytes, format_input, get_tokenizer,
                  input_file, positive_int, response_header, write_json)
from generate import check_writable, generate_batched
from extras.book_format import load_any_model as load_model
from gpt import DEVICE_HELP, pick_device, usable_device


# ---- command line ----------------------------------------------------------------------------
def benchmark_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `evaluate.py <name>`, described by the first paragraph of `doc`."""
    return ArgumentParser(doc, prog=f"evaluate.py {name}")


def input_folder(text: str) -> str:
    """An argparse type: a folder to read (MMLU's, GLUE's, evidence); refused at once if not."""
    if not Path(text).is_dir():
        problem = "not a folder" if Path(text).exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


def add_common_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Flags every benchmark takes: the model, how much to run, and where results go."""
    p.add_argument("--model-path", type=input_file, required=model_required,
                   help="model written by train.py (or the book's .pth)")
    p.add_argument("--limit", type=positive_int, help="only the first N examples (a quick look)")
    p.add_argument("--output", help="write the model's predictions here (JSON)")
    p.add_argument("--json", help="write the scores here (JSON)")
    p.add_argument("--report", help="append a Markdown section with the scores to this file")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    p.add_argument("--device", type=usable_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_answer_args(p: argparse.ArgumentParser, predictions: str, style: str = "alpaca",
                    max_new_tokens: int = 32) -> None:
    """Flags of the benchmarks that score answers: a predictions file instead of a model, the
    prompt style, and how long an answer may be."""
    p.add_argument("--predictions", type=input_file,
                   help=f"score this predictions file ({predictions}) instead of running a model")
    p.add_argument("--style", default=style, choices=(*PROMPT_STYLES, "raw"),
                   help="prompt format: the fine-tuning's alpaca or phi3, or raw text")
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help="longest answer generated, in tokens")


def check_run(args) -> None:
    """Exactly one of --model-path and --predictions; every output writable before any work."""
    if bool(args.model_path) == bool(getattr(args, "predictions", None)):
        raise ValueError("give either --model-path (run the model) or --predictions (score a "
                         "predictions file), not both or neither")
    check_outputs(args)


def check_outputs(args) -> None:
    """Fail before any work, not after it, when an output could not be written."""
    for flag in ("output", "json", "report"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), f"--{flag}")


def field(obj, key: str, kind, where: str):
    """obj[key] when obj is a dict holding a value of type `kind`; else a ValueError that names
    `where` (file and entry), the key and what was expected."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{where}: missing '{key}'")
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: '{key}' should be {names}, got {type(obj[key]).__name__}")
    return obj[key]


def check_string_list(items, where: str) -> list[str]:
    """A list of strings, or a ValueError naming the first entry that is not one."""
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a list of strings, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{where}[{i}]: expected a string, got {type(item).__name__}")
    return items


def read_predictions_list(path, n: int) -> list[str]:
    """A JSON list of n completion strings (one per example, in file order)."""
    preds = check_string_list(read_json_file(path, "a JSON list of completion strings"), str(path))
    if len(preds) != n:
        raise ValueError(f"{path}: {len(preds)} predictions for {n} examples (one per example, "
                         "in file order; with --limit N, the first N)")
    return preds


def read_predictions_dict(path) -> dict[str, str]:
    """An official {id: answer} predictions file (SQuAD, TriviaQA)."""
    preds = read_json_file(path, "an {id: answer} JSON object")
    if not isinstance(preds, dict):
        raise ValueError(f"{path}: expected an {{id: answer}} JSON object, "
                         f"got {type(preds).__name__}")
    for key, value in preds.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: the answer for {key!r} should be a string, "
                             f"got {type(value).__name__}")
    return preds


# ---- answers: the normalisation and token F1 of the SQuAD family of scorers -----------------
def normalize_squad(text: str) -> str:
    """SQuAD's normalize_answer (also OpenAI Evals' normalize): lower-case, delete ASCII
    punctuation (string.punctuation only: "’" and "—" stay), the articles a/an/the as whole
    words (regex \\b, so "the€" loses "the" too), then single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def overlap_f1(pred: list[str], gold: list[str]) -> float:
    """Bag-of-tokens F1 as the SQuAD v1.1 script computes it: 0 when nothing is shared (so two
    empty answers score 0 too; v2.0 handles empty answers before calling this)."""
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def mean_percent(values) -> float:
    """100 x the mean of the values (0.0 for none)."""
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def group_rows(names: list[str], columns: dict[str, list[float]]) -> tuple[dict, dict]:
    """({"n", col: mean percent} over all examples, {name: the same over that name's examples})
    for per-example score columns."""
    def summary(idx: list[int]) -> dict:
        return {"n": len(idx), **{c: mean_percent(v[i] for i in idx) for c, v in columns.items()}}
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return summary(list(range(len(names)))), {g: summary(idx) for g, idx in groups.items()}


# ---- the model -------------------------------------------------------------------------------
def load_scoring_model(path, device: str = "auto"):
    """(model in eval mode, its config, the tokenizer) for a model file train.py wrote."""
    model, cfg = load_model(path, device=pick_device(device))
    return model, cfg, get_tokenizer()


def styled_prompt(style: str, instruction: str, input_text: str, raw: str) -> str:
    """The prompt in the fine-tuning's format (alpaca, phi3) ending where the response starts,
    or the benchmark's `raw` text prompt for a model that was not instruction-tuned."""
    if style == "raw":
        return raw
    entry = {"instruction": instruction, "input": input_text}
    return format_input(entry, style) + response_header(style)


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """The text cut to its first max_tokens tokens (a passage cut to fit the context)."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max(max_tokens, 0)])


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first of the stop sequences (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                   batch_size: int = 16, stops: list[str] | None = None,
                   progress: bool = False, **sampling) -> list[str]:
    """The model's continuation of each prompt (cut at `stops`), greedy unless sampling says.

    A prompt longer than the context keeps its last tokens, leaving room for the answer.
    Greedy decoding gives a repeated prompt the same answer, so each distinct prompt runs once.
    """
    room = prompt_room(model, max_new_tokens)
    unique = list(dict.fromkeys(prompts)) if not sampling.get("temperature") else list(prompts)
    ids = [tokenizer.encode(p, allowed_special={"<|endoftext|>"})[-room:] or [50256]
           for p in unique]
    new = generate_batched(model, ids, max_new_tokens, batch_size, eos_id=50256,
                           progress=progress, **sampling)
    texts = [cut_at_stops(tokenizer.decode(t), stops or []) for t in new]
    if len(unique) == len(prompts):
        return texts
    answer = dict(zip(unique, texts))
    return [answer[p] for p in prompts]


def prompt_room(model, max_new_tokens: int) -> int:
    """How many prompt tokens fit in the context beside max_new_tokens new ones."""
    room = model.cfg["context_length"] - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"{model.cfg['context_length']}-token context")
    return room


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair.

    Rows are right-padded into batches; the logits are taken only at the positions that predict
    a continuation token. A context too long for the model keeps its last tokens.
    """
    device = next(model.parameters()).device
    limit = model.cfg["context_length"] + 1
    results = []
    for first in range(0, len(pairs), batch_size):
        rows = []
        for context, cont in pairs[first:first + batch_size]:
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood")
            seq = (list(context) + list(cont))[-limit:]
            rows.append((seq, len(cont)))
        width = max(len(seq) for seq, _ in rows) - 1
        idx = torch.tensor([seq[:-1] + [0] * (width - len(seq) + 1) for seq, _ in rows],
                           device=device)
        hidden = model.hidden(idx)  # (B, T, C); the head runs only where a continuation is
        for r, (seq, n) in enumerate(rows):
            logits = model.out_head(hidden[r, len(seq) - 1 - n:len(seq) - 1]).float()
            targets = torch.tensor(seq[-n:], device=device)
            results.append(float(logits.log_softmax(dim=-1).gather(1, targets[:, None]).sum()))
    return results


# ---- results ---------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers right-aligned, floats with one decimal."""
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
             for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def append_report(path, title: str, body: str) -> None:
    """Add a `## title` section to a Markdown file (created if missing), atomically."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    sep = "\n" if old and not old.endswith("\n\n") else ""
    atomic_write_bytes(path, (old + sep + f"## {title}\n\n{body}").encode("utf-8"))


def write_results(args, title: str, table: str, scores: dict, predictions=None) -> None:
    """Print the table, then write --output, --json and --report where they were asked for."""
    print(table, end="")
    if predictions is not None and getattr(args, "output", None):
        write_json(args.output, predictions)
        print(f"predictions written to {args.output}", file=sys.stderr)
    if getattr(args, "json", None):
        write_json(args.json, scores)
    if getattr(args, "report", None):
        append_report(args.report, title, table)


def read_json_file(path, what: str):
    """A JSON file's contents, or a one-line ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON (line {e.lineno}: {e.msg}); expected {what}") from None
