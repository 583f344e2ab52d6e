"""Every setting of a training run and what it builds: the recipe before the loop.

The book's defaults and the tiny demo's (`fill_defaults`), the command-line flags
(`parse_args`), and what they set up: the model with its weights (`build_model`, downloading
GPT-2's with `download_gpt2`), the data loaders (`prepare_loaders`) and the precision
(`use_bf16`, `make_autocast`). train.py runs the loop on what these return.
"""
import argparse
import ctypes
import os
import sys
from pathlib import Path

import torch

from checkpoint import parse_every
from collate import make_loader
from data import InstructionDataset, cache_root, download, split_data
from gpt import HF_NAMES, MODEL_NAMES, GPTModel, check_safetensors_complete, load_weights, \
    model_config

DEFAULT_DATA = str(Path(__file__).parent / "data" / "instruction-data.json")
BOOK_DEFAULTS = dict(epochs=2, batch_size=8, lr=5e-5, weight_decay=0.1, eval_every=5,
                     eval_batches=5, patience=20, max_length=1024, lr_schedule="constant",
                     warmup_steps=0, mask_prompt=False, keep_last=False)
# `tiny` starts from data/tiny-pretrained.pt (data/pretrain_tiny.py), as the book starts from
# OpenAI's GPT-2; its fine-tuning defaults were chosen by measurement (README, The offline demo).
# From scratch it keeps its earlier defaults: more epochs, a higher constant rate, no masking.
TINY_PRETRAINED = Path(__file__).parent / "data" / "tiny-pretrained.pt"
# It keeps its last weights: the validation loss bottoms out early (steps 250-375 of 720) while
# later steps, at the cosine's low rates, still learn to copy numbers exactly (README).
TINY_DEFAULTS = dict(epochs=6, batch_size=8, lr=7e-4, weight_decay=0.1, eval_every=25,
                     eval_batches=5, patience=0, max_length=256, lr_schedule="cosine",
                     warmup_steps=20, mask_prompt=True, keep_last=True)
SCRATCH_DEFAULTS = dict(epochs=15, batch_size=8, lr=1e-3, weight_decay=0.1, eval_every=50,
                        eval_batches=5, patience=6, max_length=256, lr_schedule="constant",
                        warmup_steps=0, mask_prompt=False, keep_last=False)
PAD_MULTIPLE = 16  # batch lengths are padded to a multiple of it (collate.padded_length)


def gpt2_url(name: str) -> str:
    return f"https://huggingface.co/openai-community/{HF_NAMES[name]}/resolve/main/model.safetensors"


def download_gpt2(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a preset's `model.safetensors`, downloaded into the cache if not there yet."""
    if name not in HF_NAMES:
        raise ValueError(f"no pretrained weights for {name!r}; choose one of {', '.join(HF_NAMES)}")
    dest = Path(cache_dir or cache_root()) / HF_NAMES[name] / "model.safetensors"
    if dest.exists():
        try:
            check_safetensors_complete(dest)
            return dest
        except ValueError as e:  # damaged after it was downloaded: never used, fetched again
            print(f"warning: {e}; downloading it again", file=sys.stderr)
            dest.unlink()
    try:
        return download(gpt2_url(name), dest)
    except OSError as e:
        raise FileNotFoundError(
            f"{name} weights not found at {dest} and the download failed ({e}); pass "
            f"--weights PATH to a local model.safetensors, or use --model tiny to train offline") from None


def keep_freed_memory() -> bool:
    """Ask the C library (glibc's malloc) to keep the memory of freed tensors for the next ones.

    By default each tensor over 32 MB (gpt2-small's embedding gradient is 154 MB, a bf16 copy of
    its weights 77 MB) gets fresh pages from the kernel and returns them when freed, so the next
    one of its size faults them in again, a page at a time: about 170,000 page faults a training
    step on CPU. Without mmap and trimming, freed memory is reused: 6-9 % faster steps for up to
    7 % more peak memory (README, Performance), so it is `train.py --keep-memory`, not a default.
    Process wide; False where there is no glibc `mallopt` (macOS, musl: nothing changes there).
    """
    try:
        libc = ctypes.CDLL(None)  # the running process's own C library
    except (OSError, TypeError):  # Windows has no such handle
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def make_autocast(device: torch.device, bf16: bool):
    """A factory of bf16 autocast contexts (no-ops when bf16 is False)."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware multiplies bf16 natively; master weights stay fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fill_defaults(args) -> argparse.Namespace:
    """Unset flags take the book's values, or the tiny demo's own."""
    defaults = BOOK_DEFAULTS if args.model != "tiny" else \
        SCRATCH_DEFAULTS if args.from_scratch else TINY_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_model(args, log=print) -> tuple[GPTModel, dict]:
    cfg = dict(model_config(args.model), name=args.model, prompt_style=args.prompt_style)
    if args.untied_head:  # the book's: the head starts as a copy of the embedding, then differs
        cfg["tie_head"] = False
    if args.max_length > cfg["context_length"]:
        raise ValueError(f"--max-length {args.max_length} is larger than {args.model}'s context "
                         f"length {cfg['context_length']}")
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    if args.resume or (args.from_scratch and not args.weights):
        return model, cfg  # weights come from the checkpoint, or stay random
    path = args.weights or (TINY_PRETRAINED if args.model == "tiny" else download_gpt2(args.model))
    log(f"loading weights from {path}")
    load_weights(model, path)
    return model, cfg


def prepare_loaders(args, data, tokenizer, device, log=print):
    train_data, val_data, test_data = split_data(data)
    log(f"data: {len(train_data)} train / {len(val_data)} validation / {len(test_data)} test")
    loaders = []
    for part, is_train in ((train_data, True), (val_data, False)):
        dataset = InstructionDataset(part, tokenizer, style=args.prompt_style)
        too_long = sum(n > args.max_length for n in dataset.lengths)
        if too_long:
            log(f"warning: {too_long} {'training' if is_train else 'validation'} entries are longer "
                f"than --max-length {args.max_length} tokens and are cut to it")
        loaders.append(make_loader(dataset, args.batch_size, shuffle=is_train, drop_last=is_train,
                                   seed=args.seed, mask_prompt=args.mask_prompt,
                                   allowed_max_length=args.max_length,
                                   group_by_length=not args.no_length_grouping,
                                   pad_to_multiple=args.pad_multiple,
                                   pin_memory=device.type == "cuda"))
    return loaders, (train_data, val_data, test_data)


# ---- command line --------------------------------------------------------------------------
def add_run_flags(p: argparse.ArgumentParser, out_dir: str) -> None:
    """The flags train.py and dpo.py share: precision, device, seed, where outputs and
    checkpoints go, resuming, and the test-set responses."""
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the hardware does it fast; or force one")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to train (auto: cuda, then mps, then cpu)")
    p.add_argument("--seed", type=int, default=123,
                   help="seed for the weights drawn at random (if any) and for shuffling (123)")
    p.add_argument("--out-dir", default=out_dir, help=f"where outputs and checkpoints go ({out_dir})")
    p.add_argument("--save-every", type=parse_every, default=(0, "steps"), metavar="N|Nm",
                   help="also write a checkpoint every N steps or N minutes (0: only at epoch "
                        "ends and Ctrl-C)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from {out_dir.upper()}/checkpoint.pt")
    p.add_argument("--no-generate", action="store_true", help="skip the test-set responses")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="response length limit for the test set (256)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 (or train the tiny preset from scratch) "
                                "to follow instructions.")
    p.add_argument("--model", choices=MODEL_NAMES, default="gpt2-small",
                   help="preset (gpt2-small); 'tiny' is offline: the 7M model pretrained by "
                        "data/pretrain_tiny.py; others load OpenAI's GPT-2 weights")
    p.add_argument("--weights", help="local model.safetensors (or .pt state dict); no download")
    p.add_argument("--from-scratch", action="store_true",
                   help="random initial weights instead of pretrained ones (tiny: 15 epochs)")
    p.add_argument("--data", default=DEFAULT_DATA, help="instruction data: JSON file or http(s) URL")
    p.add_argument("--prompt-style", choices=("alpaca", "phi3"), default="alpaca",
                   help="prompt format (alpaca)")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction,
                   help="learn only the response: prompt targets become -100 "
                        "(book: off; tiny: on)")
    p.add_argument("--epochs", type=int, help="passes over the training split (book: 2; tiny: 6)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=int, help="entries per step (8)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (book: 5e-5; tiny: 7e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.1)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help="constant, or cosine decay to lr/10 by the last step "
                        "(book: constant; tiny: cosine)")
    p.add_argument("--warmup-steps", type=int,
                   help="raise the learning rate linearly from 0 over N steps (book: 0; tiny: 20)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (book: 5; tiny: 25)")
    p.add_argument("--eval-batches", type=int, help="batches per loss estimate (5)")
    p.add_argument("--patience", type=int,
                   help="stop after N evaluations without a new best validation loss (0: never)")
    p.add_argument("--max-length", type=int,
                   help="cut training rows to N tokens (default: the model's context length)")
    add_run_flags(p, "out")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="no checkpoint at epoch ends (each is the size of the model and AdamW's "
                        "state: 2.1 GB for gpt2-small); Ctrl-C still writes one")
    p.add_argument("--untied-head", action="store_true",
                   help="an output head of its own, as the book's GPTModel (GPT-2 ties it to the "
                        "token embedding); costs one more 50257-row matrix and its AdamW state")
    p.add_argument("--keep-memory", action="store_true",
                   help="on CPU with glibc, reuse freed memory instead of returning it at once: "
                        "6-9 %% faster steps, up to 7 %% more peak memory (README, Performance)")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction,
                   help="keep the last weights, as the book, not those of the best validation "
                        "loss, and no copy of those (a model's worth of memory less; default: "
                        "off; tiny: on)")
    p.add_argument("--full-head", action="store_true",
                   help="run the output head on every position, as the book (slower)")
    p.add_argument("--no-length-grouping", action="store_true",
                   help="plain shuffled batches instead of length-grouped ones (slower)")
    p.add_argument("--pad-multiple", type=int, default=PAD_MULTIPLE,
                   help=f"pad each batch's length to a multiple of N ({PAD_MULTIPLE}; 1: the book's "
                        f"longest-entry padding)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank instead of every weight (0: full "
                        "fine-tuning); model.pt gets them merged in (see lora.py)")
    p.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA scale: the update is alpha * x @ A @ B, as the book (16)")
    p.add_argument("--lora-targets", nargs="+", metavar="LAYER",
                   help="layers that get adapters: qkv out_proj fc proj out_head (default: all)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch each step's kernels from Python instead of replaying "
                        "the step recorded as a CUDA graph (slower; README, Performance)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the loss (model and head) with BACKEND (inductor)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and AdamW's state over the "
                        "processes (FSDP2, one group per transformer block) instead of DDP")
    p.add_argument("--timeout", type=float, default=30.0, metavar="MINUTES",
                   help="under torchrun: a rank waiting this long for the others fails (30)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return fill_defaults(p.parse_args(argv))
