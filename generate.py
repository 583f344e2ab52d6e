"""Text generation: the book's `generate`, made fast with a KV cache, and a command line.

Entry points: `generate(model, idx, max_new_tokens, ...)` (greedy, temperature, top-k, top-p; each
row stops at its own EOS; `use_cache=False` is the book's plain loop, the reference the cache is
tested against) and `generate_responses(model, entries, tokenizer)` for whole data sets.
The command line answers one `--prompt`, a JSON `--input-file`, or instructions typed on stdin.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from data import (PROMPT_STYLES, ArgumentParser, cli_main, format_input, get_tokenizer, input_file,
                  load_data, non_negative_float, non_negative_int, positive_int, probability,
                  response_header, write_json)
from gpt import DEVICE_HELP, GPTModel, pick_device, usable_device


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature is 0, else a (seedable) draw."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:  # keep the k best tokens (the book's top-k)
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:  # nucleus: fewest best tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        covered_before = sorted_p.cumsum(dim=-1) - sorted_p  # the best token always stays
        sorted_p = sorted_p.masked_fill(covered_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_plain(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int,
                   eos_id: int | None = None, **sampling) -> torch.Tensor:
    """The book's loop: run the whole (cropped) sequence again for every new token.

    Rows that emit `eos_id` are padded with it; the loop ends when every row is done.
    """
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # past the context, crop from the left
        logits = model(idx_cond)[:, -1, :]  # only the last position predicts the next token
        idx_next = sample_next(logits, **sampling)
        if eos_id is not None:
            idx_next[done] = eos_id
            done |= idx_next == eos_id
            if done.all():
                break
        idx = torch.cat((idx, idx_next[:, None]), dim=1)
    return idx


# ---- the KV cache: each new token attends to the cached keys and values of those before it ------
class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_heads, T, head_dim) pair per layer
    (GPTModel's attention appends to them), and `pad_mask` (B, T): which of those positions are
    real tokens, not left padding."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pad_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append the new tokens' keys and values of `layer`; returns all of that layer's."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences stop costing compute)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.pad_mask = self.pad_mask[rows]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and (B, T) pad_mask (True = real token), padding on the left."""
    T = max(len(s) for s in seqs)
    idx = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[False] * (T - len(s)) + [True] * len(s) for s in seqs], device=device)
    return idx, mask


def positions_and_mask(pad_mask: torch.Tensor, cache: KVCache | None = None):
    """For new tokens whose real ones `pad_mask` marks (the cache remembers the earlier ones):
    their positions, counting real tokens only (a left-padded row starts at 0), and the
    attention mask, None where the fused causal kernel needs none."""
    past = cache.pad_mask if cache is not None and cache.pad_mask is not None else None
    full = pad_mask if past is None else torch.cat([past, pad_mask], dim=1)
    if cache is not None:
        cache.pad_mask = full
    pos = (full.long().cumsum(dim=1) - 1).clamp(min=0)[:, full.shape[1] - pad_mask.shape[1]:]
    no_mask = past is None and bool(pad_mask.all())
    return pos, None if no_mask else attention_mask(full, pad_mask.shape[1])


def attention_mask(pad_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """(B, 1, n_new, T) bool: query i (the last n_new of T) sees real keys at or before it.
    A query always sees itself, so a padding position never has an all-masked row (NaN)."""
    T = pad_mask.shape[1]
    query_pos = torch.arange(T - n_new, T, device=pad_mask.device)[:, None]
    key_pos = torch.arange(T, device=pad_mask.device)[None, :]
    causal = key_pos <= query_pos  # (n_new, T)
    return ((causal & pad_mask[:, None, :]) | (key_pos == query_pos))[:, None]


def last_logits(model: GPTModel, idx, cache: KVCache, pad_mask=None) -> torch.Tensor:
    """(B, V) logits of the last position only: the 50257-wide head is skipped elsewhere.
    pad_mask None: every token of `idx` is real."""
    if pad_mask is None:
        pad_mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    pos, attn_mask = positions_and_mask(pad_mask, cache)
    return model.out_head(model.hidden(idx, cache, pos, attn_mask)[:, -1])


def generate_cached(model: GPTModel, prompts: list[list[int]], max_new_tokens: int,
                    context_size: int, eos_id: int | None = None, **sampling) -> list[list[int]]:
    """New tokens for each prompt: prefill the left-padded batch once, then one token a step.

    Finished rows leave the batch (`KVCache.select`). When a row would pass `context_size`, the
    book crops from the left, which shifts every position; the cache is then rebuilt from the
    cropped windows, so the tokens stay exactly the book's (each such step costs a full window).
    """
    device = next(model.parameters()).device
    new: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the prompts still generating, in cache order

    def prefill() -> tuple[KVCache, torch.Tensor]:
        cache = KVCache()
        windows = [(prompts[r] + new[r])[-context_size:] for r in rows]
        idx, pad_mask = left_pad(windows, eos_id if eos_id is not None else 0, device)
        return cache, last_logits(model, idx, cache, pad_mask)

    cache, logits = prefill()
    for step in range(max_new_tokens):
        tokens = sample_next(logits, **sampling)
        keep = []
        for i, token in enumerate(tokens.tolist()):
            if token != eos_id:
                new[rows[i]].append(token)
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows so they stop costing compute
            keep_idx = torch.tensor(keep, device=device)
            cache.select(keep_idx)
            tokens, rows = tokens[keep_idx], [rows[i] for i in keep]
        if len(cache) + 1 > context_size:
            cache, logits = prefill()
        else:
            real = torch.ones(len(rows), 1, dtype=torch.bool, device=device)
            logits = last_logits(model, tokens[:, None], cache, real)
    return new


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate(model, idx, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None, *,
             top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None):
    """The book's `generate`: continue each prompt by up to `max_new_tokens` tokens.

    Positional arguments as in the book; each row stops at its own `eos_id`. Works with any
    module that maps (B, T) token ids to (B, T, vocab) logits, the book's GPTModel included;
    models without this project's KV cache (no `hidden`) take the book's plain loop.
    idx: a (B, T) LongTensor (the book's form; returns (B, T + n), rows that stopped early padded
    with eos_id), or a list of token-id lists of any lengths (returns prompt + new tokens per row,
    EOS not included). Greedy when temperature is 0. An empty prompt is a ValueError (pass
    [eos_id] to generate from nothing). Sampling is reproducible with `generator` (or
    torch.manual_seed).
    """
    limit = getattr(model, "cfg", {}).get("context_length")
    context_size = context_size or limit
    if context_size is None:
        raise ValueError("context_size is needed for a model without a `cfg` (the book's: "
                         "model.pos_emb.weight.shape[0])")
    if limit is not None and context_size > limit:
        raise ValueError(f"context_size {context_size} exceeds the model's context length {limit}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    as_tensor = isinstance(idx, torch.Tensor)
    if as_tensor and idx.dim() != 2:
        raise ValueError(f"idx must be a (batch, tokens) tensor, got shape {tuple(idx.shape)}")
    prompts = idx.tolist() if as_tensor else [[int(t) for t in p] for p in idx]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. [eos_id])")
    if not as_tensor and not prompts:
        return []
    if not use_cache or not hasattr(model, "hidden"):
        if as_tensor:
            return generate_plain(model, idx, max_new_tokens, context_size, eos_id, **sampling)
        device = next(model.parameters()).device
        return [generate_plain(model, torch.tensor([p], device=device), max_new_tokens,
                               context_size, eos_id, **sampling)[0].tolist() for p in prompts]
    new = generate_cached(model, prompts, max_new_tokens, context_size, eos_id, **sampling) \
        if max_new_tokens > 0 and prompts else [[] for _ in prompts]
    if not as_tensor:
        return [p + n for p, n in zip(prompts, new)]
    width = max((len(n) for n in new), default=0)  # rows without EOS all have the same length
    pad = eos_id if eos_id is not None else 0
    tail = torch.tensor([n + [pad] * (width - len(n)) for n in new], dtype=idx.dtype)
    return torch.cat([idx, tail.view(len(new), width).to(idx.device)], dim=1)


def encode_prompts(entries: list[dict], tokenizer, style: str = "alpaca") -> list[list[int]]:
    """Token ids of each entry's prompt, ending with the response header the model continues."""
    return [tokenizer.encode(format_input(e, style) + response_header(style)) for e in entries]


def default_batch_size(model: GPTModel, longest: int) -> int:
    """Prompts decoded together: 16 on CPU, where every row costs its arithmetic. On a GPU a
    decoding step is bound by kernel launches, not rows (110 test prompts of gpt2-medium on an
    H100: 2,003 tokens/s in batches of 16, 4,811 all at once), so up to 128, as many as a quarter
    of the free GPU memory holds the key-value cache for (`longest` tokens a row, twice:
    torch.cat copies it)."""
    weight, cfg = next(model.parameters()), getattr(model, "cfg", None)
    if weight.device.type != "cuda" or cfg is None:
        return 16
    longest = min(longest, cfg["context_length"])
    row_bytes = 2 * 2 * cfg["n_layers"] * cfg["emb_dim"] * longest * weight.element_size()
    return max(16, min(128, torch.cuda.mem_get_info(weight.device)[0] // 4 // row_bytes))


def generate_batched(model: GPTModel, prompts: list[list[int]], max_new_tokens: int = 256,
                     batch_size: int | None = None, eos_id: int | None = 50256,
                     progress: bool = False, **options) -> list[list[int]]:
    """New tokens for many prompts, in original order; batches are length-sorted (less padding).
    batch_size None: `default_batch_size` (16 on CPU, more on a GPU)."""
    if batch_size is None:
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        batch_size = default_batch_size(model, longest)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    new: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        rows = generate(model, [prompts[i] for i in batch], max_new_tokens, eos_id=eos_id,
                        **options)
        for i, row in zip(batch, rows):
            new[i] = row[len(prompts[i]):]
        if progress:
            print(f"generated {first + len(batch)}/{len(prompts)} responses "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return new


def generate_responses(model: GPTModel, entries: list[dict], tokenizer, style: str = "alpaca",
                       max_new_tokens: int = 256, batch_size: int | None = None, device=None,
                       eos_id: int = 50256, progress: bool = False, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None,
                       generator: torch.Generator | None = None) -> list[str]:
    """The model's response to each entry (header and EOS stripped), in the entries' order.

    `device` moves the model there first (None: leave it where it is). Dropout is off while
    generating; the model's train/eval mode is restored afterwards.
    """
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        new = generate_batched(model, encode_prompts(entries, tokenizer, style), max_new_tokens,
                               batch_size, eos_id, progress, temperature=temperature,
                               top_k=top_k, top_p=top_p, generator=generator)
    finally:
        model.train(was_training)
    return [tokenizer.decode(tokens).strip() for tokens in new]


# ---- command line -------------------------------------------------------------------------------
def check_writable(path, flag: str = "--output") -> None:
    """Fail before generating, not after, when the output (given as `flag`) could not be written."""
    folder = Path(path).resolve().parent
    if Path(path).is_dir():
        problem = "it is a folder"
    elif any(p.is_file() for p in (folder, *folder.parents)):
        problem = "a file stands where its folder should be"
    elif not folder.is_dir():
        problem = f"{folder} does not exist"
    elif not os.access(folder, os.W_OK):
        problem = f"{folder} is read-only"
    else:
        return
    raise OSError(f"cannot write {flag} {path}: {problem}")


def answer_file(answer, entries: list[dict], tokenizer, style: str, output: str) -> None:
    """Add `model_response` to every entry; the output file appears only when all are done."""
    start = time.perf_counter()
    new = answer(encode_prompts(entries, tokenizer, style))
    seconds = time.perf_counter() - start
    write_json(output, [dict(e, model_response=tokenizer.decode(t).strip())
                        for e, t in zip(entries, new)])
    n_tokens = sum(len(t) for t in new)
    print(f"{len(entries)} responses written to {output}: {n_tokens} tokens in {seconds:.1f} s "
          f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s)")


def interactive(answer_one) -> None:
    """Answer each instruction line read from stdin until end of input (Ctrl-D)."""
    tty = sys.stdin.isatty()
    if tty:
        print("Type an instruction and press Enter; Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if line.strip():
            print(answer_one(line.strip()), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Answer instructions with a fine-tuned GPT-2 model: one --prompt, a JSON "
                       "--input-file, or lines typed on stdin.", prog="generate.py")
    p.add_argument("--model-path", type=input_file, required=True,
                   help="model.pt written by train.py (or the book's .pth)")
    p.add_argument("--prompt", help="one instruction; prints the response")
    p.add_argument("--input", help="the entry's optional input text, with --prompt")
    p.add_argument("--input-file", type=input_file,
                   help="JSON list of entries to answer (needs --output)")
    p.add_argument("--output", help="where to write the entries with `model_response` added")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES,
                   help="default: the style the model was trained with (else alpaca)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="longest response in tokens (it may stop earlier, at <|endoftext|>)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0: greedy (the likeliest token each time); above 0: sampled")
    p.add_argument("--top-k", type=positive_int, help="sample from the K likeliest tokens only")
    p.add_argument("--top-p", type=probability, help="sample from the likeliest tokens whose "
                                                     "probabilities add up to P only")
    p.add_argument("--seed", type=non_negative_int, default=123, help="seed of the sampling")
    p.add_argument("--device", type=usable_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=positive_int, help="prompts decoded together (default: "
                   "16 on CPU; on a GPU up to 128, as memory allows)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.prompt is not None and args.input_file:
        p.error("give either --prompt or --input-file, not both")
    if bool(args.input_file) != bool(args.output):
        p.error("--input-file and --output go together")
    if args.input is not None and args.prompt is None:
        p.error("--input needs --prompt")
    if args.output:
        check_writable(args.output)
    entries = load_data(args.input_file, require_output=False) if args.input_file else None
    device = pick_device(args.device)
    from extras.book_format import load_any_model  # the book's .pth files too (a wing)
    model, cfg = load_any_model(args.model_path, device=device)
    style = args.prompt_style or cfg.get("prompt_style", "alpaca")
    tokenizer = get_tokenizer()
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eot_token,
                   generator=torch.Generator(device=device).manual_seed(args.seed))

    def answer(prompts):  # new tokens for each prompt
        return generate_batched(model, prompts, batch_size=args.batch_size,
                                progress=args.input_file is not None, **options)

    def answer_one(instruction: str, input_text: str = "") -> str:
        entry = {"instruction": instruction, "input": input_text}
        return tokenizer.decode(answer(encode_prompts([entry], tokenizer, style))[0]).strip()

    if args.prompt is not None:
        print(answer_one(args.prompt, args.input or ""))
    elif args.input_file:
        answer_file(answer, entries, tokenizer, style, args.output)
    else:
        interactive(answer_one)


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
