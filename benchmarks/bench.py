"""Benchmark: training and generation speed and memory, fast path against the book's plain path.

Each configuration runs in a child process of its own (`--one`, JSON out), so its peak resident
memory (ru_maxrss) is its alone. `run_training` times the real `train.train_step` on the real
loader's batches, with the loss that fast/step.py's `make_step` gives train.py (`bench_loss`, each
of its pieces switchable); `run_inference` times cached batched generation or the book's uncached
loop. Run: python benchmarks/bench.py --compare   (prints a Markdown table for docs/performance.md)
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from bench_generate import EOS  # noqa: E402
from book_model import from_gpt  # noqa: E402
from collate import make_loader  # noqa: E402
from data import (ArgumentParser, InstructionDataset, get_tokenizer, input_file,  # noqa: E402
                  load_data, non_negative_int, positive_int, split_data)
from generate import encode_prompts, generate, generate_batched  # noqa: E402
from gpt import MODEL_NAMES, GPTModel, model_config, pick_device, usable_device  # noqa: E402
from fast.step import attention_kernel, target_loss, use_bf16  # noqa: E402
from fast.tricks import AdamWInBackward, recast_saved_weights, release_free_memory  # noqa: E402
from train import calc_loss_batch, train_step  # noqa: E402
from training.run import DEFAULT_DATA, PAD_MULTIPLE, make_optimizer  # noqa: E402

GIB = 2**30
# train.py's default step, and each way to change it: the flags of this script (train.py has the
# ones marked so in docs/performance.md); fast/tricks.py's opt-in tricks come last.
DEFAULT = dict(precision="auto", group=True, full_head=False, tied=True, fused=True,
               pad_multiple=PAD_MULTIPLE, pick_attention=True, plain_head=False,
               in_backward=False, recast=False, trim=False)
PLAIN = dict(DEFAULT, precision="fp32", group=False, full_head=True, pad_multiple=1,
             pick_attention=False)
BOOK = dict(PLAIN, book_model=True, tied=False, fused=False)  # the book's modules and AdamW
OLD_DEFAULT = dict(DEFAULT, in_backward=True, recast=True, trim=True)
COMPARE = [  # (label, training settings): the references, the default, then one change each
    ("book: its modules, untied head, AdamW; fp32, shuffled, full head", BOOK),
    ("plain: this model, fp32, shuffled, full head", PLAIN),
    ("default (`python train.py`)", DEFAULT),
    ("default with fp32 (`--precision fp32`)", dict(DEFAULT, precision="fp32")),
    ("default with shuffled batches (`--no-length-grouping`)", dict(DEFAULT, group=False)),
    ("default with the book's padding (`--pad-multiple 1`)", dict(DEFAULT, pad_multiple=1)),
    ("default with the full head (`--full-head`)", dict(DEFAULT, full_head=True)),
    ("default with the fused attention kernel on short rows (bench `--fused-attention`)",
     dict(DEFAULT, pick_attention=False)),
    ("default with unfused AdamW (bench `--unfused-adamw`)", dict(DEFAULT, fused=False)),
    ("default with an untied head (bench `--untied-head`)", dict(DEFAULT, tied=False)),
    ("default with the head's loss in one piece on CPU (bench `--plain-head`)",
     dict(DEFAULT, plain_head=True)),
    ("+ AdamW in backward (bench `--adamw-in-backward`)", dict(DEFAULT, in_backward=True)),
    ("+ bf16 weights recast in backward (bench `--recast-weights`)", dict(DEFAULT, recast=True)),
    ("+ freed memory handed back each step (bench `--trim`)", dict(DEFAULT, trim=True)),
    ("the previous default: the three above (bench `--old-default`)", OLD_DEFAULT),
]


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


def bench_batches(dataset, batch_size: int, n: int, group: bool, seed: int, max_length: int,
                  pad_multiple: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of the real training loader's epoch 0, longest batch first.

    The grouped loader already puts the batch with the longest entry first; the same is done for
    shuffled batches, so every configuration meets its worst step during warm-up and a short run
    reaches the peak memory of a whole epoch. Same (seed, group): same batches, same order.
    """
    loader = make_loader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed,
                         allowed_max_length=max_length, group_by_length=group,
                         pad_to_multiple=pad_multiple)
    batches = list(loader)
    longest = max(range(len(batches)), key=lambda b: batches[b][0].shape[1])
    batches.insert(0, batches.pop(longest))
    return batches[:n]


def bench_loss(device: torch.device, bf16: bool, full_head: bool = False, plain_head: bool = False,
               pick_attention: bool = True, recast: bool = False, torch_compile: bool = False):
    """train_step's loss as fast/step.py's `make_step` builds it for train.py on CPU (head on
    targets, sliced on CPU; bf16 autocast; plain attention on short CPU rows), each piece
    switchable: the book's `calc_loss_batch`, the head in one piece, the fused kernel everywhere,
    no autocast weight cache (`recast`), torch.compile."""
    loss = calc_loss_batch if full_head else \
        partial(target_loss, sliced=device.type == "cpu" and not plain_head)
    if torch_compile:  # as train.py --compile; compiles during the warm-up steps
        loss = torch.compile(loss)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16,
                       cache_enabled=False if recast else None)
    kernel = attention_kernel if pick_attention else (lambda dev, seq_len: nullcontext())

    def loss_fn(input_batch, target_batch, model, device):
        with autocast(), kernel(device, input_batch.shape[1]):
            return loss(input_batch, target_batch, model, device)
    return loss_fn


def make_bench_optimizer(net, device, fused: bool, in_backward: bool):
    if in_backward:
        return AdamWInBackward(net.parameters(), lr=5e-5, weight_decay=0.1, fused=fused)
    if fused:
        return make_optimizer(net, 5e-5, 0.1, device)
    return torch.optim.AdamW(net.parameters(), lr=5e-5, weight_decay=0.1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_training(model: str, precision: str, group: bool, full_head: bool, batch_size: int,
                 steps: int, warmup: int, seed: int, data: str, device: str = "cpu",
                 tied: bool = True, fused: bool = True, in_backward: bool = False,
                 book_model: bool = False, torch_compile: bool = False, pad_multiple: int = 1,
                 pick_attention: bool = False, plain_head: bool = False, recast: bool = False,
                 trim: bool = False) -> dict:
    """Time `steps` real training steps after `warmup` ones; throughput counts target tokens.

    tied=False, fused=False and book_model=True are the book's ways, which train.py does not
    offer: an output head that is a copy of the token embedding (chapter 5 loads GPT-2's wte
    into both), AdamW's default per-tensor update, and the chapter 4 modules (book_model.py),
    which start from the same weights. The book's model has no `hidden`, so it needs full_head.
    """
    if book_model and (tied or not full_head):
        raise ValueError("the book's model has an untied head and computes logits everywhere")
    cfg = model_config(model)
    dev = torch.device(device)
    dataset = InstructionDataset(split_data(load_data(data))[0], get_tokenizer())
    batches = bench_batches(dataset, batch_size, warmup + steps, group, seed,
                            cfg["context_length"], pad_multiple)
    torch.manual_seed(seed)  # same initial weights in every configuration
    net = GPTModel(cfg).train()
    if book_model:
        net = from_gpt(net).train()
    elif not tied:
        net.out_head.weight = torch.nn.Parameter(net.tok_emb.weight.detach().clone())
    net.to(dev)
    bf16 = use_bf16(precision, dev)
    optimizer = make_bench_optimizer(net, dev, fused, in_backward)
    loss_fn = bench_loss(dev, bf16, full_head, plain_head, pick_attention, recast, torch_compile)
    setup_rss = peak_rss()
    losses, tokens, positions, seconds = [], 0, 0, 0.0
    for i, (inputs, targets) in enumerate(batches[:warmup + steps]):
        sync(dev)
        start = time.perf_counter()
        with recast_saved_weights() if recast else nullcontext():  # fast/tricks.py's, when asked
            loss, n_targets = train_step(net, optimizer, inputs, targets, dev, loss_fn)
        if trim:
            release_free_memory()
        sync(dev)
        elapsed = time.perf_counter() - start
        losses.append(loss)
        if i >= warmup:
            tokens, positions, seconds = tokens + n_targets, positions + inputs.numel(), \
                seconds + elapsed
    return {"kind": "training", "model": model, "device": device, "bf16": bf16, "group": group,
            "full_head": full_head, "tied": tied, "fused": fused, "in_backward": in_backward,
            "book_model": book_model, "compile": torch_compile, "pad_multiple": pad_multiple,
            "pick_attention": pick_attention, "plain_head": plain_head, "recast": recast,
            "trim": trim, "batch_size": batch_size, "steps": steps, "warmup": warmup,
            "target_tokens": tokens, "positions": positions, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "s_per_step": seconds / steps,
            "losses": losses, "setup_rss": setup_rss, "peak_rss": peak_rss(),
            "peak_gpu": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}


def run_inference(model: str, prompts: int, max_new_tokens: int, batch_size: int, cache: bool,
                  seed: int, data: str, device: str = "cpu") -> dict:
    """Greedy tokens/s on the first test prompts: cached batches, or the book's one-by-one loop."""
    torch.manual_seed(seed)
    net = GPTModel(model_config(model)).eval().to(device)
    ids = encode_prompts(split_data(load_data(data))[2][:prompts], get_tokenizer())
    start = time.perf_counter()
    if cache:
        new = generate_batched(net, ids, max_new_tokens, batch_size, eos_id=EOS)
    else:
        new = [generate(net, [p], max_new_tokens, eos_id=EOS, use_cache=False)[0][len(p):]
               for p in ids]
    sync(torch.device(device))
    seconds = time.perf_counter() - start
    tokens = sum(len(t) for t in new)
    return {"kind": "inference", "model": model, "cache": cache, "prompts": len(ids),
            "max_new_tokens": max_new_tokens,
            "batch_size": min(batch_size, len(ids)) if cache else 1,
            "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss": peak_rss()}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def in_child(job: dict) -> dict:
    """Run one job in a fresh interpreter (`--one`) and return its JSON result, with `others_cpu`:
    the share of the machine's CPU time that other processes used meanwhile (with 2 threads on 2
    cores every op waits for a descheduled thread: a busy neighbour can slow a step severalfold)."""
    busy, wall = busy_cpu_seconds(), time.perf_counter()
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                         stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed with exit code {out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if busy is not None:
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        child = now.ru_utime + now.ru_stime - own.ru_utime - own.ru_stime
        total = (time.perf_counter() - wall) * (os.cpu_count() or 1)
        result["others_cpu"] = max(busy_cpu_seconds() - busy - child, 0.0) / total
    return result


def describe(r: dict) -> str:
    return describe_result(r) + (f"\n  warning: other processes used {r['others_cpu']:.0%} of the "
                                 f"CPU meanwhile; these figures are not reliable"
                                 if r.get("others_cpu", 0) > 0.1 else "")


def describe_result(r: dict) -> str:
    if r["kind"] == "inference":
        how = f"KV cache, batches of {r['batch_size']}" if r["cache"] else "no cache, one by one"
        return (f"inference ({how}): {r['new_tokens']} new tokens for {r['prompts']} prompts "
                f"in {r['seconds']:.1f} s "
                f"= {r['tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss'] / GIB:.2f} GiB")
    padding = f" padded to a multiple of {r['pad_multiple']}" if r.get("pad_multiple", 1) > 1 else ""
    attention = "the book's" if r.get("book_model") else \
        "the per-batch kernel's" if r.get("pick_attention") else "the fused kernel's"
    settings = (f"{'the book' if r.get('book_model') else 'this project'}'s modules, "
                f"{'bf16 autocast' if r['bf16'] else 'fp32'}, "
                f"{'length-grouped' if r['group'] else 'shuffled'} batches"
                f"{padding}, {attention} attention, "
                f"{'the head loss in one piece, ' if r.get('plain_head') else ''}"
                f"{'weights recast in backward, ' if r.get('recast') else ''}"
                f"{'freed memory returned each step, ' if r.get('trim') else ''}"
                f"{'full head' if r['full_head'] else 'head on targets only'}, "
                f"{'tied' if r['tied'] else 'untied'} head, "
                f"{'fused' if r['fused'] else 'unfused'} AdamW"
                f"{' in backward' if r.get('in_backward') else ''}"
                f"{', torch.compile' if r.get('compile') else ''}")
    return (f"training ({settings}): {r['tokens_per_s']:.1f} target tokens/s, "
            f"{r['s_per_step']:.2f} s/step, {r['target_tokens'] / r['positions']:.0%} of positions "
            f"are targets, peak RSS {r['peak_rss'] / GIB:.2f} GiB (after setup "
            f"{r['setup_rss'] / GIB:.2f} GiB)")


def markdown_table(rows: list[tuple[str, dict]], baselines: dict[str, dict]) -> str:
    """Training rows as a Markdown table, with speed and memory ratios against each baseline."""
    ratio_heads = "".join(f" speed vs {name} | memory vs {name} |" for name in baselines)
    lines = ["| configuration | target tokens/s | s/step | peak RSS (GiB) |" + ratio_heads,
             "|---|---:|---:|---:|" + "---:|---:|" * len(baselines)]
    for label, r in rows:
        ratios = "".join(f" {r['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                         f"| {r['peak_rss'] / b['peak_rss']:.2f}x |" for b in baselines.values())
        lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} "
                     f"| {r['peak_rss'] / GIB:.2f} |" + ratios)
    return "\n".join(lines)


def inference_table(cached: dict, plain: dict) -> str:
    lines = ["| generation | tokens/s | peak RSS (GiB) | speed vs no cache |",
             "|---|---:|---:|---:|"]
    for label, r in (("no cache, one prompt at a time (`--no-cache`)", plain),
                     (f"KV cache, batches of {cached['batch_size']}", cached)):
        lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {r['peak_rss'] / GIB:.2f} "
                     f"| {r['tokens_per_s'] / plain['tokens_per_s']:.1f}x |")
    return "\n".join(lines)


def max_relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="bench.py")
    p.add_argument("--model", choices=MODEL_NAMES, default="gpt2-small", help="random weights")
    p.add_argument("--data", type=input_file, default=DEFAULT_DATA,
                   help="its training split gives the batches, its test split the prompts")
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=positive_int, default=8, help="entries per step")
    p.add_argument("--seed", type=non_negative_int, default=123, help="weights and batches")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="as train.py's")
    p.add_argument("--no-length-grouping", action="store_true", help="as train.py's")
    p.add_argument("--full-head", action="store_true", help="as train.py's")
    p.add_argument("--pad-multiple", type=positive_int, default=PAD_MULTIPLE,
                   help="pad batch lengths to a multiple of N, 1: the book's")
    p.add_argument("--fused-attention", action="store_true",
                   help="keep the fused attention kernel on short CPU rows too")
    p.add_argument("--untied-head", action="store_true", help="the book's separate output head")
    p.add_argument("--unfused-adamw", action="store_true", help="the book's AdamW update")
    p.add_argument("--plain-head", action="store_true",
                   help="on CPU too, F.cross_entropy on the head's logits in one piece")
    p.add_argument("--adamw-in-backward", action="store_true",
                   help="fast/tricks.py's AdamWInBackward: each weight updated during backward")
    p.add_argument("--recast-weights", action="store_true",
                   help="fast/tricks.py's recast_saved_weights: bf16 copies cast again in backward")
    p.add_argument("--trim", action="store_true",
                   help="fast/tricks.py's release_free_memory after each step (glibc malloc_trim)")
    p.add_argument("--old-default", action="store_true",
                   help="the three fast/tricks.py tricks together (with the sliced head on CPU: "
                        "train.py's default before the book's step came back)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss, as train.py")
    p.add_argument("--book-model", action="store_true",
                   help="the book's chapter 4 modules (needs --full-head and --untied-head)")
    p.add_argument("--device", type=usable_device, default="cpu", choices=("auto", "cpu", "cuda"),
                   help="where to run; auto: cuda if there is one")
    p.add_argument("--prompts", type=positive_int, default=8, help="test prompts for inference")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per prompt")
    p.add_argument("--gen-batch-size", type=positive_int, default=16,
                   help="prompts per cached batch")
    p.add_argument("--no-cache", action="store_true", help="inference: the book's uncached loop")
    p.add_argument("--skip-inference", action="store_true", help="time training only")
    p.add_argument("--skip-training", action="store_true", help="time inference only")
    p.add_argument("--compare", action="store_true",
                   help="plain path, fast path and each single ablation; Markdown tables")
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: one job as JSON
    return p


def machine(device: str = "cpu") -> str:
    """One line naming the CPU, its cores and torch, for docs/performance.md's table captions."""
    try:
        name = next(line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    bf16 = use_bf16("auto", torch.device("cpu"))
    text = (f"{name} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"native bf16: {'yes' if bf16 else 'no'}")
    return text + (f"; GPU: {torch.cuda.get_device_name()}" if device == "cuda" else "")


def print_comparison(rows: list[tuple[str, dict]], inference: dict) -> None:
    if rows:
        print("\n" + markdown_table(rows, {"book": rows[0][1], "default": rows[2][1]}))
        fast, fast_fp32 = rows[2][1], rows[3][1]
        if fast["bf16"]:
            gap = max_relative_gap(fast["losses"], fast_fp32["losses"])
            print(f"\nloss with bf16 autocast vs fp32 (same start, same batches): largest gap "
                  f"over {len(fast['losses'])} steps {gap:.2%}")
    if len(inference) == 2:
        print("\n" + inference_table(inference[True], inference[False]))
    busy = [r for _, r in rows] + list(inference.values())
    busy = [r for r in busy if r.get("others_cpu", 0) > 0.1]
    if busy:
        print(f"\nwarning: {len(busy)} measurements ran while other processes used over 10 % of "
              f"the CPU; measure again on a quiet machine")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.one:  # a child process: one job in, one JSON line out
        job = json.loads(args.one)
        run = run_training if job.pop("kind") == "training" else run_inference
        print(json.dumps(run(**job)))
        return
    device = pick_device(args.device) if args.device == "auto" else args.device
    common = dict(model=args.model, seed=args.seed, data=args.data)
    train_job = dict(common, kind="training", batch_size=args.batch_size, steps=args.steps,
                     warmup=args.warmup, device=device)
    infer_job = dict(common, kind="inference", prompts=args.prompts, device=device,
                     max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)
    old = args.old_default
    settings = [] if args.skip_training else COMPARE if args.compare else [
        ("this run", dict(precision=args.precision, group=not args.no_length_grouping,
                          full_head=args.full_head, tied=not args.untied_head,
                          fused=not args.unfused_adamw, book_model=args.book_model,
                          torch_compile=args.compile, pad_multiple=args.pad_multiple,
                          pick_attention=not args.fused_attention,
                          plain_head=args.plain_head,
                          in_backward=args.adamw_in_backward or old,
                          recast=args.recast_weights or old, trim=args.trim or old))]
    caches = [] if args.skip_inference else [True, False] if args.compare else [not args.no_cache]
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps after {args.warmup} "
          f"warm-up; {machine(device)}", flush=True)
    rows, inference = [], {}
    for label, s in settings:
        rows.append((label, in_child(dict(train_job, **s))))
        print(describe(rows[-1][1]), flush=True)
    for cache in caches:
        inference[cache] = in_child(dict(infer_job, cache=cache))
        print(describe(inference[cache]), flush=True)
    if args.compare:
        print_comparison(rows, inference)
    if args.json:
        Path(args.json).write_text(json.dumps([r for _, r in rows] + list(inference.values()),
                                              indent=1))


if __name__ == "__main__":
    main()
