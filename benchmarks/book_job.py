"""The book's chapter-7 fine-tuning job, four ways, each a whole process: one table.

`project` is `python train.py` itself; `book` is the book's `train_model_simple` loop on the book's
modules (book_model.py: fp32, untied head, AdamW's default update, the book's collate); `plain` is
a plain loop a user would write on this project's model (bf16 autocast where native, fused AdamW,
logits everywhere); `hf` is that loop on Hugging Face's GPT2LMHeadModel (where transformers is
installed: a benchmark's reference, not a dependency of the project). All of them start from the
same random weights, written in Hugging Face's layout by extras/export.py (no network), train on
the same split with the same batches' contents, and evaluate every `--eval-every` steps over
`--eval-batches` batches, as the book. Then test-set generation: this project's cached batches
against the book's plain loop on a few prompts.
Run: python benchmarks/book_job.py --device cuda (gpu_check.sh) or --device cpu --model gpt2-small
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench import GIB, peak_rss, sync  # noqa: E402
from bench_generate import EOS  # noqa: E402
from book_model import from_gpt  # noqa: E402
from collate import make_loader  # noqa: E402
from data import (ArgumentParser, InstructionDataset, get_tokenizer, input_file,  # noqa: E402
                  load_data, non_negative_int, positive_int, split_data)
from extras.export import hf_tensors, write_safetensors  # noqa: E402
from fast.step import use_bf16  # noqa: E402
from generate import encode_prompts, generate, generate_responses  # noqa: E402
from gpt import MODEL_NAMES, GPTModel, load_weights, model_config, usable_device  # noqa: E402
from training.run import DEFAULT_DATA  # noqa: E402


def loaders(args, device):
    """The book's loaders: shuffled batches padded to their longest row, evaluation in order."""
    train_part, val_part, _ = split_data(load_data(args.data)[:args.entries or None])
    tok = get_tokenizer()
    make = lambda part, train: make_loader(  # noqa: E731
        InstructionDataset(part, tok), args.batch_size, shuffle=train, drop_last=train,
        seed=args.seed, group_by_length=False, allowed_max_length=1024,
        pin_memory=device.type == "cuda")
    return make(train_part, True), make(val_part, False)


class HFLogits(torch.nn.Module):
    """Hugging Face's GPT2LMHeadModel with `model`'s weights, behind the book's interface:
    token ids in, logits out (`pos_emb` gives the book's loop the context length)."""

    def __init__(self, model: GPTModel):
        from transformers import GPT2Config, GPT2LMHeadModel
        super().__init__()
        cfg = model.cfg
        self.hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"], n_head=cfg["n_heads"], resid_pdrop=cfg["drop_rate"],
            embd_pdrop=cfg["drop_rate"], attn_pdrop=cfg["drop_rate"]))
        missing, unexpected = self.hf.load_state_dict(hf_tensors(model), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to wte
            raise ValueError(f"weights do not fit GPT2LMHeadModel: {missing} {unexpected}")
        self.pos_emb = self.hf.transformer.wpe

    def forward(self, idx):
        return self.hf(idx, use_cache=False).logits


def book_loop(model, optimizer, train_loader, val_loader, device, args, autocast) -> dict:
    """The book's `train_model_simple`: step, evaluate every eval_freq steps over eval_iter
    batches, and the book's 50-token sample (uncached) after each epoch."""
    def loss_of(inputs, targets):
        with autocast():
            logits = model(inputs.to(device))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten())

    def mean_loss(loader):
        with torch.no_grad():
            losses = [loss_of(x, y).item() for i, (x, y) in zip(range(args.eval_batches), loader)]
        return sum(losses) / len(losses)

    tokens, step, val_loss = 0, 0, float("nan")
    sample = torch.tensor([[EOS] * 8], device=device)
    for epoch in range(args.epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = loss_of(inputs, targets)
            loss.backward()
            optimizer.step()
            tokens, step = tokens + int((targets != -100).sum()), step + 1
            if step % args.eval_every == 0:
                model.eval()
                mean_loss(train_loader)
                val_loss = mean_loss(val_loader)
                model.train()
        model.eval()
        generate(model, sample, 50, model.pos_emb.weight.shape[0], use_cache=False)
    return {"target_tokens": tokens, "steps": step, "val_loss": val_loss}


def run_loop(args, program: str) -> dict:
    """`book`, `plain` or `hf` in this process: load the weights, train, time the training only."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = GPTModel(model_config(args.model))
    load_weights(model, args.weights)
    bf16 = program in ("plain", "hf") and use_bf16("auto", device)
    if program == "book":
        model = from_gpt(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    else:
        model = HFLogits(model) if program == "hf" else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)
    model.to(device)
    train_loader, val_loader = loaders(args, device)
    sync(device)
    start = time.perf_counter()
    result = book_loop(model, optimizer, train_loader, val_loader, device, args,
                       partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16))
    sync(device)
    return dict(result, train_seconds=time.perf_counter() - start, bf16=bf16)


def run_project(args, extra: list[str], root: Path = ROOT) -> dict:
    """`python train.py` on the same job; its metrics.json gives the training time. `root`: the
    checkout whose train.py runs (another commit's, to compare two in one run)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(root) / "train.py"), "--model", args.model, "--weights",
               args.weights, "--data", args.data, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
               "--eval-batches", str(args.eval_batches), "--patience", "0", "--no-generate",
               "--no-checkpoint", "--device", args.device, "--out-dir", out, "--quiet", *extra]
        if args.entries:
            subset = Path(out) / "data.json"
            subset.write_text(json.dumps(load_data(args.data)[:args.entries]))
            cmd[cmd.index("--data") + 1] = str(subset)
        subprocess.run(cmd, check=True)
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {"target_tokens": metrics["target_tokens_seen"], "steps": metrics["steps"],
            "val_loss": metrics["history"][-1]["val_loss"],
            "train_seconds": metrics["train_seconds"]}


def run_generation(args) -> dict:
    """Test-set responses: cached batches for `--prompts`, the book's loop for a few."""
    device = torch.device(args.device)
    model = GPTModel(model_config(args.model))
    load_weights(model, args.weights)
    model.to(device).eval()
    tok = get_tokenizer()
    entries = split_data(load_data(args.data))[2][:args.prompts]
    sync(device)
    start = time.perf_counter()
    answers = generate_responses(model, entries, tok, max_new_tokens=256)
    sync(device)
    cached = time.perf_counter() - start, sum(len(tok.encode(a)) + 1 for a in answers)
    start, plain_tokens = time.perf_counter(), 0
    for ids in encode_prompts(entries[:args.book_prompts], tok):  # the book's loop, one by one
        out = generate(model, torch.tensor([ids], device=device), 256, None, 0.0, None, EOS,
                       use_cache=False)
        plain_tokens += out.shape[1] - len(ids)
    sync(device)
    plain = time.perf_counter() - start, plain_tokens
    return {"cached_tokens_per_s": cached[1] / cached[0], "cached_seconds": cached[0],
            "book_tokens_per_s": plain[1] / plain[0], "prompts": len(entries)}


def in_child(argv: list[str], job: str) -> dict:
    """One job in a fresh process (this script's flags `argv`): its whole wall time and peak
    memory are its own."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--one", job, *argv],
                         stdout=subprocess.PIPE, text=True)
    if out.returncode:
        return {"error": f"exit code {out.returncode}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(result, process_seconds=time.perf_counter() - start)


def peak_memory(device: torch.device) -> float:
    """GiB: the GPU's peak allocation, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return peak_rss() / GIB


def one(args) -> dict:
    program, _, flags = args.one.partition(":")
    program, _, checkout = program.partition("@")
    if program == "generation":
        result = run_generation(args)
    elif program == "project":
        result = run_project(args, flags.split(), Path(checkout) if checkout else ROOT)
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        return dict(result, peak_gib=child if args.device == "cpu" else None)
    else:
        result = run_loop(args, program)
    return dict(result, peak_gib=peak_memory(torch.device(args.device)))


def table(rows: dict) -> str:
    book = rows.get("book", {})
    lines = ["| program | training s | process s | target tokens/s | vs book | peak GiB | "
             "last val loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "error" in r or name == "generation":
            continue
        speed = r["target_tokens"] / r["train_seconds"]
        ratio = speed / (book["target_tokens"] / book["train_seconds"]) if "steps" in book else 0
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {name} | {r['train_seconds']:.1f} | {r['process_seconds']:.1f} | "
                     f"{speed:,.0f} | {ratio:.2f}x | {peak} | {r['val_loss']:.3f} |")
    return "\n".join(lines)


def add_job_flags(p: argparse.ArgumentParser, model: str, entries: int, epochs: int) -> None:
    """The flags that define the chapter-7 job (shared with job_flops.py, which counts its FLOPs)."""
    p.add_argument("--model", choices=MODEL_NAMES, default=model,
                   help="preset, random weights unless --weights (the book's: gpt2-medium)")
    p.add_argument("--data", type=input_file, default=DEFAULT_DATA, help="the instruction data")
    p.add_argument("--entries", type=non_negative_int, default=entries,
                   help="use the first N entries, 0: all")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    p.add_argument("--batch-size", type=positive_int, default=8, help="entries per step")
    p.add_argument("--eval-every", type=positive_int, default=5, help="evaluate every N steps")
    p.add_argument("--eval-batches", type=positive_int, default=5,
                   help="batches per loss estimate")
    p.add_argument("--seed", type=non_negative_int, default=123, help="weights and batches")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="book_job.py")
    add_job_flags(p, model="gpt2-medium", entries=0, epochs=2)
    p.add_argument("--device", type=usable_device, default="cuda", choices=("cuda", "cpu"),
                   help="where every program runs")
    p.add_argument("--prompts", type=positive_int, default=110,
                   help="test prompts for generation")
    p.add_argument("--book-prompts", type=positive_int, default=3,
                   help="prompts for the book's loop")
    p.add_argument("--programs", default="book,plain,project,project:--compile,generation",
                   help="comma-separated; project:FLAGS passes FLAGS to train.py, "
                        "project@DIR runs DIR/train.py (another checkout, in the same run)")
    p.add_argument("--weights", type=input_file,
                   help="HF-layout weights (default: random ones written first)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.weights:  # random weights in Hugging Face's layout, by the project's writer
            torch.manual_seed(args.seed)
            args.weights = str(Path(tmp) / "model.safetensors")
            write_safetensors(args.weights, hf_tensors(GPTModel(model_config(args.model))))
            argv += ["--weights", args.weights]
        rows = {}
        for job in args.programs.split(","):
            rows[job] = in_child(argv, job)
            print(f"{job}: {json.dumps(rows[job])}", flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else os.uname().machine
    print(f"\n{args.model}, {args.epochs} epochs, batch {args.batch_size}, eval every "
          f"{args.eval_every} steps over {args.eval_batches} batches, on {name}\n")
    print(table(rows))
    gen = rows.get("generation", {})
    if "cached_tokens_per_s" in gen:
        print(f"\ngeneration, {gen['prompts']} test prompts: cached batches "
              f"{gen['cached_tokens_per_s']:,.1f} tokens/s ({gen['cached_seconds']:.2f} s), the "
              f"book's loop {gen['book_tokens_per_s']:,.1f} tokens/s: "
              f"{gen['cached_tokens_per_s'] / gen['book_tokens_per_s']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
