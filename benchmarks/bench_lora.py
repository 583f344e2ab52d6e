"""Benchmark: LoRA against full fine-tuning (trainable parameters, target tokens/s, peak memory),
and the DPO step time of each.

Each configuration runs in a fresh child process (`--one`, JSON out), so its peak resident memory
(ru_maxrss) is its own; all start from the same random weights and time the same real batches
with train.py's default step (fast/step.py's `make_step`) or extras/dpo.py's (its loss, backward
and optimizer step).
Run: python benchmarks/bench_lora.py --model gpt2-small --steps 3   (prints a Markdown table)
"""
import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from bench import GIB, bench_batches, busy_cpu_seconds, peak_rss  # noqa: E402
from data import (ArgumentParser, InstructionDataset, get_tokenizer, load_data,  # noqa: E402
                  non_negative_int, positive_int, split_data)
from gpt import MODEL_NAMES, GPTModel, model_config  # noqa: E402
from fast.step import make_step, use_bf16  # noqa: E402
from train import calc_loss_batch, train_step  # noqa: E402
from training.run import DEFAULT_DATA, PAD_MULTIPLE, make_optimizer  # noqa: E402
from extras import dpo, lora  # noqa: E402

CONFIGS = [  # (label, LoRA rank or 0 for full fine-tuning, LoRA targets)
    ("full fine-tuning", 0, None),
    ("LoRA r=16 on every Linear (head too)", 16, lora.TARGETS),
    ("LoRA r=16 without the head", 16, ("qkv", "out_proj", "fc", "proj")),
]


def build(model: str, rank: int, targets, seed: int) -> tuple[GPTModel, int]:
    torch.manual_seed(seed)  # same weights in every configuration
    net = GPTModel(model_config(model)).train()
    trainable = lora.add_lora(net, rank, 16.0, targets) if rank else \
        sum(p.numel() for p in net.parameters())
    return net, trainable


def run_sft(model: str, rank: int, targets, batch_size: int, steps: int, warmup: int,
            seed: int, precision: str) -> dict:
    """Seconds and target tokens of `steps` real train.py steps after `warmup` ones: its default
    step on CPU (fast/step.py's `make_step`: head on targets, sliced; bf16 autocast where native)."""
    cfg = model_config(model)
    dataset = InstructionDataset(split_data(load_data(DEFAULT_DATA))[0], get_tokenizer())
    batches = bench_batches(dataset, batch_size, warmup + steps, True, seed,
                            cfg["context_length"], PAD_MULTIPLE)
    net, trainable = build(model, rank, targets, seed)
    device = torch.device("cpu")
    optimizer = make_optimizer(net, 5e-5, 0.1, device)
    flags = argparse.Namespace(precision=precision, full_head=False, no_cuda_graphs=False,
                               compile=None, keep_memory=False, lora_rank=rank)
    step, _ = make_step(net, optimizer, device, flags, calc_loss_batch, train_step,
                        log=lambda *_: None)
    tokens, seconds = 0, 0.0
    for i, (inputs, targets_) in enumerate(batches):
        start = time.perf_counter()
        _, n_targets = step(inputs, targets_)
        if i >= warmup:
            tokens, seconds = tokens + n_targets, seconds + time.perf_counter() - start
    return {"trainable": trainable, "tokens_per_s": tokens / seconds,
            "s_per_step": seconds / steps, "peak_rss": peak_rss()}


def run_dpo(model: str, rank: int, targets, batch_size: int, steps: int, warmup: int,
            seed: int, precision: str) -> dict:
    """Seconds per DPO step (four forward passes, backward, AdamW) on real preference pairs, as
    extras/dpo.py's train_dpo steps."""
    tokenizer = get_tokenizer()
    pairs = dpo.load_preferences(dpo.DEFAULT_DATA)[:batch_size * (warmup + steps)]
    dataset = dpo.PreferenceDataset(pairs, tokenizer)
    batches = [dpo.collate_pairs([dataset[i] for i in range(b, b + batch_size)])
               for b in range(0, len(pairs), batch_size)]
    net, trainable = build(model, rank, targets, seed)
    reference = dpo.FrozenReference(net, lora if rank else None)
    device = torch.device("cpu")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16,
                       enabled=use_bf16(precision, device))
    optimizer = make_optimizer(net, 5e-6, 0.01, device)
    seconds = 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss, _, _ = dpo.compute_dpo_loss_batch(batch, net, reference, 0.1)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            seconds += time.perf_counter() - start
    return {"trainable": trainable, "s_per_step": seconds / steps, "peak_rss": peak_rss()}


def in_child(job: dict) -> dict:
    """One job in a fresh interpreter; `others_cpu` is the machine's CPU share others used."""
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed with exit code {out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if busy is not None:  # an upper bound on contention: includes the child's own CPU time
        result["busy_cpu"] = (busy_cpu_seconds() - busy) / (time.perf_counter() - wall)
    return result


def table(rows: list[tuple[str, dict, dict]]) -> str:
    full_sft, full_dpo = rows[0][1], rows[0][2]
    lines = ["| configuration | trainable parameters | SFT target tokens/s | SFT s/step "
             "| SFT peak RSS (GiB) | DPO s/step | DPO peak RSS (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, sft, dpo_r in rows:
        lines.append(
            f"| {label} | {sft['trainable']:,} | {sft['tokens_per_s']:.1f} "
            f"({sft['tokens_per_s'] / full_sft['tokens_per_s']:.2f}x) | {sft['s_per_step']:.2f} "
            f"| {sft['peak_rss'] / GIB:.2f} | {dpo_r['s_per_step']:.2f} "
            f"({full_dpo['s_per_step'] / dpo_r['s_per_step']:.2f}x) | {dpo_r['peak_rss'] / GIB:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="bench_lora.py")
    p.add_argument("--model", choices=MODEL_NAMES, default="gpt2-small",
                   help="preset, random weights")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="entries (or pairs) per step")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps first")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="as train.py's --precision")
    p.add_argument("--seed", type=non_negative_int, default=123, help="weights and batches")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one job, print JSON
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        run = run_dpo if job.pop("kind") == "dpo" else run_sft
        print(json.dumps(run(**job)))
        return
    common = dict(model=args.model, batch_size=args.batch_size, steps=args.steps,
                  warmup=args.warmup, seed=args.seed, precision=args.precision)
    rows = []
    for label, rank, targets in CONFIGS:
        sft = in_child(dict(common, kind="sft", rank=rank, targets=targets))
        dpo_r = in_child(dict(common, kind="dpo", rank=rank, targets=targets))
        print(f"{label}: {sft['trainable']:,} trainable, {sft['tokens_per_s']:.1f} target "
              f"tokens/s, {sft['peak_rss'] / GIB:.2f} GiB; DPO {dpo_r['s_per_step']:.2f} s/step, "
              f"{dpo_r['peak_rss'] / GIB:.2f} GiB (machine busy {sft.get('busy_cpu', 0):.1f} "
              f"and {dpo_r.get('busy_cpu', 0):.1f} cores)", file=sys.stderr, flush=True)
        rows.append((label, sft, dpo_r))
    print(table(rows))


if __name__ == "__main__":
    main()
