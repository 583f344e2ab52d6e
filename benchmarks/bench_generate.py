"""Benchmark: batched KV-cache generation against the book's plain recompute-everything loop.

`bench_generation(model, entries, tokenizer)` times the cached, length-sorted batches over all
entries and the plain single-prompt loop over the first few (its rate extrapolates), checks that
their greedy tokens are identical, and returns the figures. Run: python benchmarks/bench_generate.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import (ArgumentParser, cli_main, get_tokenizer, input_file, load_data,  # noqa: E402
                  non_negative_int, positive_int, split_data)
from generate import encode_prompts, generate, generate_batched  # noqa: E402
from gpt import MODEL_NAMES, GPTModel, model_config  # noqa: E402

EOS = 50256
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "instruction-data.json"
MADE_UP = [  # used when data/instruction-data.json is not there
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse."},
    {"instruction": "Name three primary colors.", "input": ""},
    {"instruction": "Translate to French.", "input": "Good morning, how are you today?"},
    {"instruction": "What is the boiling point of water in Fahrenheit?", "input": ""},
    {"instruction": "Summarize the text in one sentence.",
     "input": "The committee met on Tuesday to discuss the new budget, which increases spending "
              "on schools and roads while cutting administrative costs across departments."},
]


def bench_generation(model: GPTModel, entries: list[dict], tokenizer, max_new_tokens: int = 256,
                     batch_size: int = 16, baseline_prompts: int = 3) -> dict:
    """Tokens/s of cached batched generation vs the plain uncached loop, greedy, same prompts."""
    prompts = encode_prompts(entries, tokenizer)
    start, cpu_start = time.perf_counter(), time.process_time()
    cached = generate_batched(model, prompts, max_new_tokens, batch_size, eos_id=EOS, progress=True)
    cached_s, cached_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    cached_tokens = sum(len(t) for t in cached)

    plain, plain_s, plain_cpu = [], 0.0, 0.0
    for i, prompt in enumerate(prompts[:baseline_prompts]):
        start, cpu_start = time.perf_counter(), time.process_time()
        row = generate(model, [prompt], max_new_tokens, eos_id=EOS, use_cache=False)[0]
        plain_s += time.perf_counter() - start
        plain_cpu += time.process_time() - cpu_start
        plain.append(row[len(prompt):])
        print(f"plain loop {i + 1}/{baseline_prompts}: {len(plain[-1])} tokens, {plain_s:.0f} s",
              file=sys.stderr, flush=True)
    plain_tokens = sum(len(t) for t in plain)
    cached_rate, plain_rate = cached_tokens / cached_s, plain_tokens / plain_s
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "cached_tokens": cached_tokens, "cached_seconds": cached_s,
            "cached_tokens_per_s": cached_rate,
            "baseline_prompts": len(plain), "baseline_tokens": plain_tokens,
            "baseline_seconds": plain_s, "baseline_tokens_per_s": plain_rate,
            "baseline_estimated_seconds_all": cached_tokens / plain_rate,
            "identical": plain == cached[:len(plain)], "speedup": cached_rate / plain_rate,
            # CPU seconds: a cross-check on a shared machine (meaningful with --threads 1)
            "cached_cpu_seconds": cached_cpu, "baseline_cpu_seconds": plain_cpu,
            "cpu_speedup": (cached_tokens / cached_cpu) / (plain_tokens / plain_cpu)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="bench_generate.py")
    p.add_argument("--model", choices=MODEL_NAMES, default="gpt2-small", help="random weights")
    p.add_argument("--data", type=input_file,
                   help="its test split supplies the prompts (default: data/instruction-data.json "
                        "where it is, else made-up prompts)")
    p.add_argument("--prompts", type=positive_int, default=110, help="prompts answered")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per prompt")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per cached batch")
    p.add_argument("--baseline-prompts", type=positive_int, default=3,
                   help="prompts timed with the book's plain loop")
    p.add_argument("--seed", type=non_negative_int, default=123, help="the random weights")
    p.add_argument("--threads", type=positive_int,
                   help="torch.set_num_threads (default: torch's own)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or DEFAULT_DATA
    if Path(data).exists():
        entries = split_data(load_data(data))[2][:args.prompts]
    else:
        print(f"{data} not found; using made-up prompts", file=sys.stderr)
        entries = [dict(e, instruction=f"{e['instruction']} (#{i})")
                   for i, e in zip(range(args.prompts), MADE_UP * args.prompts)]
    torch.manual_seed(args.seed)
    model = GPTModel(model_config(args.model)).eval()
    r = bench_generation(model, entries, get_tokenizer(), args.max_new_tokens, args.batch_size,
                         args.baseline_prompts)
    print(f"{args.model}, {r['prompts']} prompts, up to {r['max_new_tokens']} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"cached, batches of {r['batch_size']}: {r['cached_tokens']} tokens in "
          f"{r['cached_seconds']:.1f} s = {r['cached_tokens_per_s']:.1f} tokens/s")
    print(f"plain loop, first {r['baseline_prompts']} prompts: {r['baseline_tokens']} tokens in "
          f"{r['baseline_seconds']:.1f} s = {r['baseline_tokens_per_s']:.2f} tokens/s "
          f"(all prompts: ~{r['baseline_estimated_seconds_all'] / 60:.0f} min)")
    print(f"greedy tokens identical on those prompts: {r['identical']}")
    print(f"speedup: {r['speedup']:.1f}x (by CPU seconds: {r['cpu_speedup']:.1f}x)")
    if not r["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    cli_main(main)
