"""What every benchmark file shares: the command-line flags, loading the model, generating
answers with the project's cached batched generation, scoring options by log-likelihood, and
writing predictions, scores and report sections (each file written atomically).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from data import atomic_write_bytes, get_tokenizer, write_json
from generate import generate_batched, pick_device
from gpt import load_model


# ---- command line ----------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    """Flags every benchmark takes: the model, how much to run, and where results go."""
    p.add_argument("--model-path", required=model_required, help="model written by train.py")
    p.add_argument("--limit", type=int, help="only the first N examples (a quick look)")
    p.add_argument("--output", help="write the model's predictions here (JSON)")
    p.add_argument("--json", help="write the scores here (JSON)")
    p.add_argument("--report", help="append a Markdown section with the scores to this file")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (16)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


# ---- the model -------------------------------------------------------------------------------
def load_scoring_model(path, device: str = "auto"):
    """(model in eval mode, its config, the tokenizer) for a model file train.py wrote."""
    model, cfg = load_model(path, device=pick_device(device))
    return model, cfg, get_tokenizer()


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first of the stop sequences (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                   batch_size: int = 16, stops: list[str] | None = None,
                   progress: bool = False, **sampling) -> list[str]:
    """The model's continuation of each prompt (cut at `stops`), greedy unless sampling says.

    A prompt longer than the context keeps its last tokens, leaving room for the answer.
    """
    room = model.cfg["context_length"] - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"{model.cfg['context_length']}-token context")
    ids = [tokenizer.encode(p, allowed_special={"<|endoftext|>"})[-room:] or [50256]
           for p in prompts]
    new = generate_batched(model, ids, max_new_tokens, batch_size, eos_id=50256,
                           progress=progress, **sampling)
    return [cut_at_stops(tokenizer.decode(t), stops or []) for t in new]


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
