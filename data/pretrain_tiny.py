"""Pretrain the `tiny` GPT-2 on data/tiny_corpus.py's text: the book's chapter 5 in miniature.

Next-token prediction on random windows of the tokenized corpus, AdamW with warm-up and cosine
decay, bf16 autocast on CUDA. Writes data/tiny-pretrained.pt with gpt.save_model (weights stored in
fp16, with their config); `gpt.load_model` reads it into an fp32 model. Seeded: the same seed on the
same device gives the same file.
"""
import argparse
import hashlib
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.deterministic  # noqa: F401  (the fill_uninitialized_memory switch)

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the core (gpt.py, data.py), tiny_corpus.py, tiny_rounds.py
from data import (ENDOFTEXT, ArgumentParser, atomic_write_bytes, cli_main, get_tokenizer,  # noqa: E402
                  input_file, load_data, non_negative_float, non_negative_int, number,
                  positive_float, positive_int)
from gpt import GPTModel, load_model, model_config, save_model, usable_device  # noqa: E402
import train  # noqa: E402  (the learning-rate schedule)
from tiny_corpus import check_held_out  # noqa: E402
from tiny_rounds import round_corpus  # noqa: E402

OUT = HERE / "tiny-pretrained.pt"
INSTRUCTIONS = HERE / "instruction-data.json"
SEED = 1234
STORE_DTYPE = torch.float16  # ~14.6 MB, not 29: cheap to ship; rounds each weight by <0.05 %


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The corpus as one long row of token ids, passages encoded in parallel threads and joined
    by the real <|endoftext|> token (the same ids as encoding the whole text at once)."""
    eot = tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})
    ids = []
    for i, passage in enumerate(tokenizer.encode_ordinary_batch(text.split(ENDOFTEXT), num_threads=16)):
        ids += (eot if i else []) + passage
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(tokens: torch.Tensor, held_out_frac: float, length: int):
    """The last `held_out_frac` of the tokens (passages the model never trains on) for held-out loss."""
    n_val = max(int(len(tokens) * held_out_frac), length + 1)
    if len(tokens) - n_val < length + 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens, too few for windows of {length + 1}; "
                         f"use more --passages")
    return tokens[:-n_val], tokens[-n_val:]


def get_batch(tokens: torch.Tensor, offsets: torch.Tensor, length: int):
    """Windows of length+1 tokens starting at `offsets`: inputs, and targets shifted by one (B, T)."""
    windows = tokens[offsets[:, None] + torch.arange(length + 1, device=tokens.device)]
    return windows[:, :-1], windows[:, 1:]


def calc_loss_batch(input_batch, target_batch, model):
    """The book's chapter 5 loss: cross-entropy of every next token."""
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it at the last step (the
    schedule train.py's --lr-schedule cosine uses for fine-tuning)."""
    return train.lr_at(step, peak, steps, "cosine", warmup)


@torch.no_grad()
def held_out_loss(model, val_tokens, offsets: torch.Tensor, length: int, batch_size: int, autocast) -> float:
    """Mean loss over fixed windows of the held-out tokens (the same windows at every evaluation)."""
    model.eval()
    losses = []
    for batch in offsets.split(batch_size):
        inputs, targets = get_batch(val_tokens, batch, length)
        with autocast():
            losses.append(calc_loss_batch(inputs, targets, model).item())
    model.train()
    return sum(losses) / len(losses)


def pretrain(model, train_tokens, val_tokens, args, device: torch.device, log=print) -> list[dict]:
    """The training loop: batch, forward, loss, backward, optimizer.step(); returns the log rows."""
    length = args.window
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    # every step's window offsets drawn up front on the CPU: the same order on any device, and
    # no host-to-device copy (which waits for the GPU) inside the loop
    order = torch.randint(len(train_tokens) - length, (args.steps, args.batch_size),
                          generator=torch.Generator().manual_seed(args.seed)).to(device)
    val_offsets = torch.randint(len(val_tokens) - length, (args.eval_batches * args.batch_size,),
                                generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    train_tokens, val_tokens = train_tokens.to(device), val_tokens.to(device)
    history, start, last_time, last_step = [], time.perf_counter(), time.perf_counter(), 0
    model.train()
    for step in range(args.steps):
        if args.time_limit and time.perf_counter() - start > args.time_limit:
            log(f"stopping at step {step}: --time-limit {args.time_limit:.0f}s reached")
            break
        if args.stop_after and step == args.stop_after:  # the shipped run, without a clock
            log(f"stopping at step {step} (--stop-after)")
            break
        inputs, targets = get_batch(train_tokens, order[step], length)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with autocast():
            loss = calc_loss_batch(inputs, targets, model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            row = {"step": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            now = time.perf_counter()
            row["tokens_per_s"] = (done - last_step) * args.batch_size * length / (now - last_time)
            if done % args.eval_every == 0 or done == args.steps:
                row["held_out"] = held_out_loss(model, val_tokens, val_offsets, length,
                                                args.batch_size, autocast)
            history.append(row)
            held = f"  held-out {row['held_out']:.3f}" if "held_out" in row else ""
            log(f"step {done}/{args.steps}  loss {row['loss']:.3f}{held}  lr {row['lr']:.2e}  "
                f"{row['tokens_per_s']:,.0f} tokens/s  {now - start:.0f}s, "
                f"about {(now - start) * (args.steps - done) / done:.0f}s to go")
            last_time, last_step = time.perf_counter(), done
    return history


def start_from(path: Path, cfg: dict) -> GPTModel:
    """The weights of an earlier run (in fp32), which must be a `tiny` model."""
    model, saved = load_model(path)
    if any(saved.get(k) != v for k, v in cfg.items() if k != "name"):
        raise ValueError(f"--init {path}: not a tiny model (its config is {saved})")
    return model.train()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="pretrain_tiny.py")
    p.add_argument("--seed", type=non_negative_int, default=SEED,
                   help="corpus, initial weights and data order")
    p.add_argument("--passages", type=positive_int, default=200_000,
                   help="passages in the corpus (about 64 tokens each)")
    p.add_argument("--steps", type=positive_int, default=20_000, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=64, help="windows per step")
    p.add_argument("--window", type=number(int, 1, model_config("tiny")["context_length"]),
                   default=256, help="tokens per window, at most the context length 256 "
                                     "(shorter for CPU trials)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=500, help="steps of linear warm-up")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                   help="AdamW's weight decay")
    p.add_argument("--held-out-frac", type=number(float, 0, 0.5, above=True), default=0.02,
                   help="share of the corpus kept out of training for the held-out loss")
    p.add_argument("--eval-every", type=positive_int, default=1000,
                   help="steps between held-out losses")
    p.add_argument("--eval-batches", type=positive_int, default=10,
                   help="batches in each held-out loss")
    p.add_argument("--log-every", type=positive_int, default=200,
                   help="steps between progress lines")
    p.add_argument("--time-limit", type=non_negative_float, default=0,
                   help="stop training after this many seconds and save, 0: no limit")
    p.add_argument("--stop-after", type=non_negative_int, default=0,
                   help="stop after this many steps, keeping the schedule of --steps, 0: never")
    p.add_argument("--device", type=usable_device, choices=("auto", "cpu", "cuda"),
                   default="auto", help="auto: CUDA when available, else the CPU")
    p.add_argument("--out", type=Path, default=OUT, help="where the weights go")
    p.add_argument("--corpus-only", type=Path, metavar="FILE",
                   help="write the corpus text to FILE and stop (for inspection)")
    p.add_argument("--init", type=input_file, metavar="FILE",
                   help="continue from these tiny weights instead of random ones (continued "
                        "pretraining)")
    p.add_argument("--drill", type=non_negative_int, default=0, metavar="ROUNDS",
                   help="shuffle in ROUNDS passes over every small sum, product and unit "
                        "conversion")
    p.add_argument("--compare", type=non_negative_int, default=0, metavar="N",
                   help="shuffle in N yes-or-no comparisons of two numbers 1..99 (the "
                        "comparison round)")
    p.add_argument("--forms", type=non_negative_int, default=0, metavar="N",
                   help="shuffle in N questions answered at a line's start (the answer-form "
                        "round)")
    p.add_argument("--instructions", type=input_file, default=str(INSTRUCTIONS),
                   help="the instruction set that must stay out of the corpus")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets CUDA's matmuls be deterministic
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    folder = (args.corpus_only or args.out).resolve().parent
    if not (folder.is_dir() and os.access(folder, os.W_OK)):  # fail now, not after the training
        raise OSError(f"cannot write {args.corpus_only or args.out}: {folder} is missing or read-only")
    started = time.perf_counter()
    cfg = dict(model_config("tiny"), name="tiny")
    init = start_from(args.init, cfg) if args.init else None  # a wrong file fails before the corpus
    corpus = round_corpus(args.seed, args.passages, args.drill, args.compare, args.forms)
    check_held_out(corpus, load_data(str(args.instructions)))
    if args.corpus_only:
        atomic_write_bytes(args.corpus_only, corpus.encode("utf-8"))
        log(f"wrote {len(corpus):,} characters ({args.passages:,} passages) to {args.corpus_only}")
        return
    tokens = tokenize(corpus, get_tokenizer())
    train_tokens, val_tokens = split_tokens(tokens, args.held_out_frac, args.window)
    drill = (f" + {args.drill} rounds of the number drill" if args.drill else "") + (
        f" + {args.compare:,} comparisons" if args.compare else "") + (
        f" + {args.forms:,} answer-form questions" if args.forms else "")
    start = f"; starting from {args.init}" if args.init else ""
    log(f"corpus: {args.passages:,} passages{drill}, {len(tokens):,} tokens ({len(train_tokens):,} to train on, "
        f"{len(val_tokens):,} held out); {args.steps:,} steps x {args.batch_size} x "
        f"{args.window} tokens on {device}{start}")
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of every new tensor
    model = (init or GPTModel(cfg)).to(device)
    pretrain(model, train_tokens, val_tokens, args, device, log)
    save_model(model.to("cpu", STORE_DTYPE), cfg, args.out)  # load_model copies it into fp32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    size = args.out.stat().st_size / 1e6
    log(f"wrote {args.out} ({size:.1f} MB, {STORE_DTYPE}), sha256 {sha256_of(args.out)}")
    log(f"wall time {time.perf_counter() - started:.0f}s on {device} ({name})")


if __name__ == "__main__":
    cli_main(main)
