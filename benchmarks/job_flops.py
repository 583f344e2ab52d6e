"""How fast can the book's job go on this CPU? Its matrix-product arithmetic against the CPU's rate.

Counts the multiply-adds of the chapter-7 job that `book_job.py` times (training steps at 3x a
forward pass, plus the evaluations every `--eval-every` steps over `--eval-batches` batches of the
training and the validation split) on the real batches two ways: book_job.py's book loaders
(shuffled, padded to each batch's longest row, the output head on every position) and train.py's
own (training/run.py's `prepare_loaders` for the model's preset: grouped by length, padded to a
multiple of 16, the head only on positions with a target). Then times this CPU's matrix products
on the job's shapes. The time a program cannot go under is its FLOPs at that rate:
with a `book_job.py --json` file, it prints the speed-up over the book's measured time that this
project could reach if it did nothing but matrix products at the measured rate.
Run: python benchmarks/job_flops.py --model gpt2-small --entries 240 [--results book_job.json]
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from book_job import add_job_flags, loaders as book_loaders  # noqa: E402
from data import ArgumentParser, get_tokenizer, input_file, load_data, positive_float  # noqa: E402
from fast.step import use_bf16  # noqa: E402
from gpt import model_config  # noqa: E402
from training.run import parse_args as train_py_args, prepare_loaders  # noqa: E402


def project_loaders(args):
    """train.py's own (train, validation) loaders (training/run.py's prepare_loaders) for the
    model's preset, on the same entries."""
    run = train_py_args(["--model", args.model, "--batch-size", str(args.batch_size),
                         "--seed", str(args.seed)])
    data = load_data(args.data)[:args.entries or None]
    train_loader, val_loader, _ = prepare_loaders(run, data, get_tokenizer(), torch.device("cpu"),
                                                  log=lambda _: None)
    return train_loader, val_loader


def forward_flops(cfg: dict, batch_shape: tuple[int, int], head_rows: int) -> tuple[int, int]:
    """FLOPs (2 x multiply-adds) of one forward pass: the blocks (their weights on every position
    and attention's two T x T products per layer), and the (emb x vocab) head on `head_rows`."""
    (rows, length), d, layers = batch_shape, cfg["emb_dim"], cfg["n_layers"]
    block_weights = 12 * d * d * layers  # q, k, v, out (4 d^2) and the 4x MLP (8 d^2)
    blocks = block_weights * rows * length + 2 * rows * length * length * d * layers
    return 2 * blocks, 2 * d * cfg["vocab_size"] * head_rows


def job_flops(cfg: dict, loaders, args, book: bool) -> dict:
    """FLOPs of the job's training steps and of its evaluations on (train, validation) loaders;
    `book`: the head on every position, else only on positions with a target (train.py's)."""
    train_loader, val_loader = loaders

    def add(into: dict, inputs, targets, times: int) -> None:
        head_rows = inputs.numel() if book else int((targets != -100).sum())
        blocks, head = forward_flops(cfg, tuple(inputs.shape), head_rows)
        into["blocks"], into["head"] = into["blocks"] + times * blocks, into["head"] + times * head

    train, evaluation, steps = {"blocks": 0, "head": 0}, {"blocks": 0, "head": 0}, 0
    for epoch in range(args.epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        for inputs, targets in train_loader:
            add(train, inputs, targets, 3)  # forward, and backward's two products per forward one
            steps += 1
            if steps % args.eval_every == 0:
                for each in (train_loader, val_loader):
                    for batch in itertools.islice(each, args.eval_batches):
                        add(evaluation, *batch, 1)
    return {"train": train, "evaluation": evaluation, "steps": steps}


def matmul_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of (m x k) @ (k x n) over `shapes`: each shape's fastest of 5 timings of about
    `seconds` / 5 (an upper bound is wanted; a busy moment only slows a timing down)."""
    flops = spent = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # the first call picks and builds the kernel
        best = float("inf")
        for _ in range(5):
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / 5:
                a @ b
                calls += 1
            best = min(best, (time.perf_counter() - start) / calls)
        flops, spent = flops + 2 * m * k * n, spent + best
    return flops / spent


def products(weights: list[tuple[int, int]], rows: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of a (k x n) weight's three products in a training step on `rows` positions:
    forward (rows x k @ k x n), the input's gradient (rows x n @ n x k), the weight's (k x rows @
    rows x n)."""
    return [shape for k, n in weights for shape in ((rows, k, n), (rows, n, k), (k, rows, n))]


def seconds_at(counts: dict, rates: tuple[float, float]) -> float:
    """The time the job's products take at (blocks, head) FLOP/s: the least it can take."""
    return sum(part["blocks"] / rates[0] + part["head"] / rates[1]
               for part in (counts["train"], counts["evaluation"]))


def total(counts: dict) -> int:
    return sum(sum(part.values()) for part in (counts["train"], counts["evaluation"]))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="job_flops.py")
    add_job_flags(p, model="gpt2-small", entries=240, epochs=1)
    p.add_argument("--seconds", type=positive_float, default=2.0,
                   help="timing per matrix shape")
    p.add_argument("--results", type=input_file, help="book_job.py --json output of the same job")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = model_config(args.model)
    book = book_loaders(args, torch.device("cpu"))
    counts = {"book": job_flops(cfg, book, args, book=True),
              "project": job_flops(cfg, project_loaders(args), args, book=False)}
    d, rows = cfg["emb_dim"], args.batch_size * 96  # ~96 tokens a row in the instruction data
    blocks = products([(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)], rows)
    head = products([(d, cfg["vocab_size"])], rows)
    dtypes = {"fp32": torch.float32}
    if use_bf16("auto", torch.device("cpu")):
        dtypes["bf16"] = torch.bfloat16
    rates = {k: (matmul_rate(blocks, t, args.seconds), matmul_rate(head, t, args.seconds))
             for k, t in dtypes.items()}
    print(f"{args.model}, {len(book[0].dataset)} training entries, {args.epochs} epoch(s), batch "
          f"{args.batch_size}, eval every {args.eval_every} steps over {args.eval_batches} batches; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; matrix products (blocks / "
          "head) " + ", ".join(f"{k} {b / 1e9:.0f} / {h / 1e9:.0f} GFLOP/s" for k, (b, h) in rates.items())
          + "\n")
    print("| batching | steps | training TFLOP | evaluation TFLOP | head's share | "
          + " | ".join(f"least {k} s" for k in rates) + " |\n|---|---:|---:|---:|---:|" + "---:|" * len(rates))
    for name, c in counts.items():
        train, evaluation = (sum(c[part].values()) / 1e12 for part in ("train", "evaluation"))
        share = (c["train"]["head"] + c["evaluation"]["head"]) / total(c)
        print(f"| {name} | {c['steps']} | {train:.2f} | {evaluation:.2f} | {share:.0%} | "
              + " | ".join(f"{seconds_at(c, r):.1f}" for r in rates.values()) + " |")
    results = json.loads(Path(args.results).read_text()) if args.results else {}
    book_seconds = results.get("book", {}).get("train_seconds")
    if book_seconds:
        print(f"\nthe book's measured training time, {book_seconds:.1f} s, over the least the "
              "project's products take: at most " + ", ".join(
                  f"{book_seconds / seconds_at(counts['project'], r):.2f}x in {k}"
                  for k, r in rates.items()))
        for name, r in results.items():
            if "train_seconds" in r and name != "generation":
                c = counts["book" if name == "book" else "project"]
                print(f"- {name}: {total(c) / r['train_seconds'] / 1e9:.0f} GFLOP/s of matrix "
                      "products over its training time")


if __name__ == "__main__":
    main()
