"""The run's machinery around train.py's loop: its settings, and what they build and write.

`parse_args` (the book's defaults, the tiny demo's, every flag), `Run` (device, data, the model
with its weights, loaders, optimizer; checkpoints, the sample after each epoch, the model at
the end; LoRA and torchrun through extras/) and `write_outputs` (model.pt, the test set's
responses, metrics.json, the plot). train.py's `main` calls these; they never import train.py.
"""
import argparse
import importlib.util
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from collate import make_loader
from data import (ArgumentParser, InstructionDataset, format_input, get_tokenizer, input_file,
                  load_data, non_negative_float, non_negative_int, positive_float, positive_int,
                  split_data, write_json)
from generate import generate_responses
from gpt import (DEVICE_HELP, MODEL_NAMES, GPTModel, load_weights, model_config, pick_device,
                 save_model, usable_device)
from training import checkpoint
from training.files import TINY_PRETRAINED, download_gpt2, fetch_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(ROOT / "data" / "instruction-data.json")
BOOK_DEFAULTS = dict(epochs=2, batch_size=8, lr=5e-5, weight_decay=0.1, eval_every=5,
                     eval_batches=5, patience=20, max_length=1024, lr_schedule="constant",
                     warmup_steps=0, mask_prompt=False, keep_last=False)
# `tiny` starts from data/tiny-pretrained.pt (data/pretrain_tiny.py) as the book starts from
# OpenAI's GPT-2, with fine-tuning settings chosen by measurement (docs/tiny-model.md). It keeps
# its last weights: the validation loss bottoms out early (steps 250-375 of 720) while later
# steps, at the cosine's low rates, still learn to copy numbers exactly. From scratch it keeps
# its earlier settings: more epochs, a higher constant rate, no masking.
TINY_DEFAULTS = dict(epochs=6, batch_size=8, lr=7e-4, weight_decay=0.1, eval_every=25,
                     eval_batches=5, patience=0, max_length=256, lr_schedule="cosine",
                     warmup_steps=20, mask_prompt=True, keep_last=True)
SCRATCH_DEFAULTS = dict(TINY_DEFAULTS, epochs=15, lr=1e-3, eval_every=50, patience=6,
                        lr_schedule="constant", warmup_steps=0, mask_prompt=False, keep_last=False)
PAD_MULTIPLE = 16  # batch lengths are padded to a multiple of it (collate.padded_length)


class Run:
    """Everything train.py's loop runs on, built from the flags in the book's order, and what the
    run does around the loop. Under torchrun (extras/distributed.py) rank 0 writes the files;
    with --lora-rank (extras/lora.py) checkpoints hold the adapters and model.pt merges them."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out_dir = args, Path(args.out_dir)
        self.log = (lambda *a, **k: None) if args.quiet else partial(print, flush=True)
        self.device, self.dist, self.lora = torch.device(pick_device(args.device)), None, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: an extra (docs/several-gpus.md)
            from extras import distributed
            self.dist = distributed.Run(self.device.type, args, self.log)
            self.device, self.log = self.dist.device, self.dist.log  # rank 0's log; others: none
        elif args.fsdp:
            raise ValueError("--fsdp needs several processes: torchrun --nproc_per_node N train.py ...")
        if not self.dist or self.dist.is_main:  # only rank 0 writes (two probes would collide)
            check_out_dir(self.out_dir)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        source = fetch_data(args.data) if "://" in args.data else args.data  # a URL: cached
        data = load_data(source, fields=args.fields, log=self.log)
        self.tokenizer = get_tokenizer()
        self.model, self.cfg = build_model(args, self.log)
        if args.lora_rank:  # an extra: frozen weights, adapters trained (docs/lora-dpo.md)
            from extras import lora
            self.lora = lora.LoRARun(self.model, args, self.ckpt_path, self.log)
        self.model.to(self.device)
        if self.dist:
            self.model = self.dist.wrap(self.model)
        self.train_loader, self.val_loader, self.splits = prepare_loaders(
            args, data, self.tokenizer, self.device, self.log)
        if source != DEFAULT_DATA:  # the embedded data has none (tests/test_near_duplicates.py)
            warn_of_leaks(source, self.splits, self.log)
        if self.dist:
            self.train_loader, self.val_loader = self.dist.shard_loaders(self.train_loader,
                                                                         self.val_loader)
        self.optimizer = make_optimizer(self.model, args.lr, args.weight_decay, self.device)
        self.log(f"settings: model {args.model}, epochs {args.epochs}, batch {args.batch_size}, "
                 f"lr {args.lr} ({args.lr_schedule}, warm-up {args.warmup_steps} steps), weight "
                 f"decay {args.weight_decay}, eval every {args.eval_every} steps over "
                 f"{args.eval_batches or 'all'} batches, patience {args.patience}, max length "
                 f"{args.max_length}, {'prompt masked, ' if args.mask_prompt else ''}"
                 f"on {self.device}, seed {args.seed}")

    # ---- checkpoints: --resume, --save-every, epoch ends, Ctrl-C ---------------------------------
    def resume(self, state_class) -> tuple:
        """(the loop's state, made by `state_class`, and the best weights) of the checkpoint in
        --out-dir."""
        read = self.lora.load_checkpoint if self.lora else checkpoint.load_checkpoint
        if self.dist:  # every rank reads it (FSDP: whole, then sharded)
            read = partial(self.dist.load, read)
        state, best = read(self.ckpt_path, self.model, self.optimizer, self.cfg, state_class)
        self.log(f"resumed from {self.ckpt_path} at epoch {state.epoch + 1}, step {state.step}")
        return state, best

    def save(self, state, best) -> None:
        write = self.lora.save_checkpoint if self.lora else checkpoint.save_checkpoint
        if self.dist:  # rank 0 writes while the others wait
            write = partial(self.dist.save, write)
        write(self.ckpt_path, self.model, self.optimizer, asdict(state), best, self.cfg)

    def epoch_end(self, state, best) -> None:
        """The book's look at a validation answer after each epoch, then a checkpoint."""
        answer = generate_responses(self.model, self.splits[1][:1], self.tokenizer,
                                    self.args.prompt_style, max_new_tokens=35, batch_size=1)[0]
        self.log(f"epoch {state.epoch} sample: {answer!r}")
        if not self.args.no_checkpoint:
            self.save(state, best)

    # ---- after the loop ----------------------------------------------------------------------------
    def final_model(self, best, state, how_it_ended: str):
        """The model to write: the best weights unless --keep-last, whole (torchrun: on rank 0;
        the other ranks end here), with LoRA's adapters merged in (a plain GPTModel)."""
        if best is None:
            self.log(f"{how_it_ended}; kept the last weights (--keep-last)")
        else:
            self.model.load_state_dict(best)
            self.log(f"{how_it_ended}; restored the best weights (step {state.best_step}, val "
                     f"loss {state.best_val:.3f})")
        model = self.model
        if self.dist:
            model = self.dist.full_model(model, self.cfg)
            if model is None:
                self.dist.finish()  # ends the process
        if self.lora:
            from extras.lora import merge_lora
            model = merge_lora(model)
        return model

    def finish(self) -> None:
        self.log(f"outputs written to {self.out_dir}/")
        if self.dist:
            self.dist.finish()  # ends the process


def write_outputs(run: Run, model, state, reason: str, seconds: float, plot_losses) -> None:
    """model.pt, the test set's responses (unless --no-generate), metrics.json, and
    loss-plot.png through train.py's `plot_losses`."""
    args, out = run.args, run.out_dir
    save_model(model, run.cfg, out / "model.pt")
    generate_seconds = 0.0 if args.no_generate else write_responses(run, model)
    write_json(out / "metrics.json", {
        "settings": vars(args), "model_config": run.cfg, "history": state.history,
        "best_step": state.best_step, "best_val_loss": state.best_val, "stop_reason": reason,
        "steps": state.step, "target_tokens_seen": state.tokens_seen, "train_seconds": seconds,
        "generate_seconds": generate_seconds,
        "target_tokens_per_second": state.tokens_seen / seconds if seconds else 0.0})
    history = state.history
    if not plot_losses(*([h[k] for h in history] for k in ("epoch", "tokens", "train_loss",
                                                           "val_loss")), out / "loss-plot.png"):
        run.log("loss-plot.png skipped: pip install matplotlib to get the plot")


def write_responses(run: Run, model) -> float:
    """The test set with each `model_response` (the book's instruction-data-with-response.json),
    three of them shown beside the expected answers; returns the seconds it took."""
    args, test_data = run.args, run.splits[2]
    run.log(f"generating responses for {len(test_data)} test entries")
    start = time.perf_counter()
    responses = generate_responses(model.eval(), test_data, run.tokenizer, args.prompt_style,
                                   args.max_new_tokens, progress=not args.quiet)
    seconds = time.perf_counter() - start
    write_json(run.out_dir / "instruction-data-with-response.json",
               [dict(e, model_response=r) for e, r in zip(test_data, responses)])
    for entry, response in list(zip(test_data, responses))[:3]:  # the book's check by eye
        run.log(f"\n{format_input(entry, args.prompt_style)}\n\nCorrect response:\n>> "
                f"{entry['output']}\n\nModel response:\n>> {response.strip()}\n" + "-" * 40)
    return seconds


# ---- what the settings build -------------------------------------------------------------------
def check_out_dir(out_dir: Path) -> None:
    """Fail before training, not after it, when results could not be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None


def build_model(args, log=print) -> tuple[GPTModel, dict]:
    """The preset's GPTModel (seeded) with its starting weights: --weights, the tiny model's
    pretrained file, or OpenAI's GPT-2 (downloaded once); none when resuming or from scratch."""
    cfg = dict(model_config(args.model), name=args.model, prompt_style=args.prompt_style)
    if args.untied_head:  # the book's: the head starts as a copy of the embedding, then differs
        cfg["tie_head"] = False
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    if args.resume or (args.from_scratch and not args.weights):
        return model, cfg  # weights come from the checkpoint, or stay random
    if args.weights:  # any file a user has, the book's .pth included
        from extras.book_format import load_any_weights
        log(f"loading weights from {args.weights}")
        return load_any_weights(model, args.weights), cfg
    path = TINY_PRETRAINED if args.model == "tiny" else download_gpt2(args.model)
    log(f"loading weights from {path}")
    return load_weights(model, path), cfg


def prepare_loaders(args, data, tokenizer, device, log=print):
    """(train loader, validation loader, (train, validation, test) entries): the book's split."""
    splits = split_data(data)
    log(f"data: {len(splits[0])} train / {len(splits[1])} validation / {len(splits[2])} test")
    loaders = []
    for part, is_train in ((splits[0], True), (splits[1], False)):
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
    return loaders[0], loaders[1], splits


def warn_of_leaks(source, splits, log=print) -> None:
    """One warning line when test entries near-copy a training entry (their scores would say
    more than the model knows), by the book's near-duplicate measure in data/near_duplicates.py;
    skipped, saying so, where its numpy is missing."""
    spec = importlib.util.spec_from_file_location("near_duplicates",
                                                  ROOT / "data" / "near_duplicates.py")
    near_duplicates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(near_duplicates)  # data/ is no package (data.py is the chapter's)
    try:
        leaks = near_duplicates.find_leaks(splits[0], splits[2])
    except OSError as e:
        log(f"leak check skipped: {e}")
        return
    if leaks:
        log(f"warning: {len(leaks)} of {len(splits[2])} test entries near-copy a training entry "
            f"(scores on them flatter the model); to see them: python data/near_duplicates.py "
            f"{source} --split")


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """The book's AdamW over the weights that train; the fused kernel where there is one (one
    kernel for all weights instead of a loop: 1.18x faster steps on CPU, docs/performance.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda"))


# ---- command line --------------------------------------------------------------------------
PRESETS = {"gpt2-*": BOOK_DEFAULTS, "tiny": TINY_DEFAULTS, "tiny --from-scratch": SCRATCH_DEFAULTS}


def preset_default(key: str) -> str:
    """The help's words for a default that differs by preset, read from the presets themselves:
    "default: gpt2-* 2, tiny 6, tiny --from-scratch 15"."""
    shown = {}  # the value as the help shows it -> the presets that have it
    for name, value in ((name, defaults[key]) for name, defaults in PRESETS.items()):
        shown.setdefault({True: "on", False: "off"}[value] if isinstance(value, bool)
                         else str(value), []).append(name)
    return "default: " + ", ".join(f"{' and '.join(names)} {v}" if len(shown) > 1 else v
                                   for v, names in shown.items())


def data_file_or_url(text: str) -> str:
    """--data's type: an http(s) URL (fetch_data downloads it), else a file to read."""
    return text if "://" in text else input_file(text)


def add_run_flags(p: argparse.ArgumentParser, out_dir: str) -> None:
    """The flags train.py and dpo.py share: precision, device, seed, where outputs and
    checkpoints go, resuming, and the test-set responses."""
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the hardware does it fast; or force one")
    p.add_argument("--device", type=usable_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=non_negative_int, default=123,
                   help="seed for the weights drawn at random (if any) and for shuffling")
    p.add_argument("--out-dir", default=out_dir, help="where outputs and checkpoints go")
    p.add_argument("--save-every", type=checkpoint.parse_every, default=(0, "steps"), metavar="N|Nm",
                   help="also write a checkpoint every N steps or N minutes, 0: only at epoch "
                        "ends and Ctrl-C")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from {out_dir.upper()}/checkpoint.pt")
    p.add_argument("--no-generate", action="store_true", help="skip the test-set responses")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="response length limit for the test set")


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags; those left unset take their preset's value (fill_defaults)."""
    p = ArgumentParser("Fine-tune GPT-2 (or train the tiny preset from scratch) to follow "
                       "instructions.", prog="train.py")
    p.add_argument("--model", choices=MODEL_NAMES, default="gpt2-small",
                   help="preset; 'tiny' is offline: the 7M model pretrained by "
                        "data/pretrain_tiny.py; others load OpenAI's GPT-2 weights")
    p.add_argument("--weights", type=input_file,
                   help="local model.safetensors (or .pt state dict); no download")
    p.add_argument("--from-scratch", action="store_true",
                   help="random initial weights instead of pretrained ones")
    p.add_argument("--data", type=data_file_or_url, default=DEFAULT_DATA,
                   help="instruction data: a JSON list or JSON Lines file, or an http(s) URL; "
                        "Alpaca, Dolly and chat (messages) layouts are recognised")
    p.add_argument("--fields", type=parse_fields, metavar="OURS=THEIRS,...",
                   help="the data's names for instruction, input and output, e.g. "
                        "instruction=prompt,input=context,output=response")
    p.add_argument("--prompt-style", choices=("alpaca", "phi3"), default="alpaca",
                   help="prompt format")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction,
                   help=f"learn only the response: prompt targets become -100 "
                        f"({preset_default('mask_prompt')})")
    p.add_argument("--epochs", type=positive_int,
                   help=f"passes over the training split ({preset_default('epochs')})")
    p.add_argument("--max-steps", type=non_negative_int, default=0,
                   help="stop after this many steps, 0: no limit")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"entries per step ({preset_default('batch_size')})")
    p.add_argument("--lr", type=non_negative_float,
                   help=f"AdamW learning rate, 0: the weights stay as they are "
                        f"({preset_default('lr')})")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help=f"AdamW weight decay ({preset_default('weight_decay')})")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"),
                   help=f"constant, or cosine decay to lr/10 by the last step "
                        f"({preset_default('lr_schedule')})")
    p.add_argument("--warmup-steps", type=non_negative_int,
                   help=f"raise the learning rate linearly from 0 over N steps "
                        f"({preset_default('warmup_steps')})")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"evaluate every N steps, and before the first and after the last; more "
                        f"than the run's steps: only then ({preset_default('eval_every')})")
    p.add_argument("--eval-batches", type=non_negative_int,
                   help=f"batches per loss estimate, 0: all of them "
                        f"({preset_default('eval_batches')})")
    p.add_argument("--patience", type=non_negative_int,
                   help=f"stop after N evaluations without a new best validation loss, 0: never "
                        f"({preset_default('patience')})")
    p.add_argument("--max-length", type=positive_int,
                   help=f"cut training rows to N tokens, at most the model's context length "
                        f"({preset_default('max_length')})")
    add_run_flags(p, "out")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="no checkpoint at epoch ends (each is the size of the model and AdamW's "
                        "state: 2.1 GB for gpt2-small); Ctrl-C still writes one")
    p.add_argument("--untied-head", action="store_true",
                   help="an output head of its own, as the book's GPTModel (GPT-2 ties it to the "
                        "token embedding); costs one more 50257-row matrix and its AdamW state")
    p.add_argument("--keep-memory", action="store_true",
                   help="on CPU with glibc, reuse freed memory instead of returning it at once: "
                        "6-9 %% faster steps, up to 7 %% more peak memory (docs/performance.md)")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction,
                   help=f"keep the last weights, as the book, not those of the best validation "
                        f"loss, and no copy of those (a model's worth of memory less; "
                        f"{preset_default('keep_last')})")
    p.add_argument("--full-head", action="store_true",
                   help="run the output head on every position, as the book (slower)")
    p.add_argument("--no-length-grouping", action="store_true",
                   help="plain shuffled batches instead of length-grouped ones (slower)")
    p.add_argument("--pad-multiple", type=positive_int, default=PAD_MULTIPLE,
                   help="pad each batch's length to a multiple of N, 1: the book's longest-entry "
                        "padding")
    p.add_argument("--lora-rank", type=non_negative_int, default=0,
                   help="train LoRA adapters of this rank instead of every weight, 0: full "
                        "fine-tuning; model.pt gets them merged in (extras/lora.py)")
    p.add_argument("--lora-alpha", type=positive_float, default=16.0,
                   help="LoRA scale: the update is alpha * x @ A @ B, as the book")
    p.add_argument("--lora-targets", nargs="+", metavar="LAYER",
                   help="layers that get adapters: qkv out_proj fc proj out_head (default: all)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch each step's kernels from Python instead of replaying "
                        "the step recorded as a CUDA graph (slower; docs/performance.md)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the loss (model and head) with BACKEND (inductor)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and AdamW's state over the "
                        "processes (FSDP2, one group per transformer block) instead of DDP")
    p.add_argument("--timeout", type=positive_float, default=30.0, metavar="MINUTES",
                   help="under torchrun: a rank waiting this long for the others fails")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked as it is read, unset ones from the preset, then the rules between
    them: any error is one line and exit 2, before any work."""
    p = build_parser()
    args = fill_defaults(p.parse_args(argv))
    context = model_config(args.model)["context_length"]
    if args.max_length > context:
        p.error(f"argument --max-length: {args.max_length} is more than {args.model}'s context "
                f"length {context}")
    return args


def fill_defaults(args) -> argparse.Namespace:
    """Unset flags take the book's values, or the tiny demo's own."""
    defaults = BOOK_DEFAULTS if args.model != "tiny" else \
        SCRATCH_DEFAULTS if args.from_scratch else TINY_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_fields(text: str) -> dict[str, str]:
    """--fields "instruction=prompt,output=response" -> {"instruction": "prompt", ...}."""
    fields = {}
    for pair in text.split(","):
        ours, _, theirs = pair.partition("=")
        if ours.strip() not in ("instruction", "input", "output") or not theirs.strip():
            raise argparse.ArgumentTypeError(f"{pair!r} is not instruction=NAME, input=NAME or "
                                             f"output=NAME")
        fields[ours.strip()] = theirs.strip()
    return fields
