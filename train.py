"""Instruction fine-tuning of GPT-2: the project's main job, `python train.py`.

The book's training functions (`calc_loss_batch`, `calc_loss_loader`, `evaluate_model`, one step
of zero_grad, forward, loss, backward, `optimizer.step()`), the loop that evaluates, stops early
and keeps the best weights, and `main`, which writes the model, the test-set responses, metrics
and the loss plot. The settings and what they build (model, loaders, precision) are in recipe.py;
checkpoints and Ctrl-C in checkpoint.py; the CPU's sliced head loss in head_loss.py; the step as
a CUDA graph in cuda_graphs.py; under torchrun, distributed.py.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import (Interrupted, RunState, StopRequested, copy_weights, load_checkpoint,
                        save_checkpoint, save_due, stop_reason)
from cuda_graphs import GraphedTraining
from data import cli_main, get_tokenizer, load_data, write_json
from generate import generate_responses, pick_device
from gpt import save_model
from head_loss import HEAD_CHUNK, HeadCrossEntropy
from outputs import check_out_dir, format_duration, plot_losses, sample_response, show_examples
from recipe import build_model, keep_freed_memory, make_autocast, parse_args, prepare_loaders, use_bf16


# ---- the book's training functions -----------------------------------------------------------
def calc_loss_batch(input_batch, target_batch, model, device, full_head=False,
                    sliced_head=None):
    """The book's loss: mean cross-entropy of the next-token predictions, -100 targets ignored.

    The book computes the 50257-wide logits at every position and then ignores the padding
    (and, with --mask-prompt, the prompt); here the output head runs only on the positions that
    have a target, which gives the same loss for less compute and memory. `full_head=True` (or
    a model without `hidden`, such as the book's own GPTModel) is the book's way. On CPU the same
    cross-entropy is computed a slice of the logits at a time (`HeadCrossEntropy`: 1.18x faster
    there; `sliced_head=False` turns it off). A batch with no targets gives 0.0 instead of NaN.
    """
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    if full_head or not hasattr(model, "hidden"):
        logits = model(input_batch)
        return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
    keep = target_batch != -100
    hidden, targets = model.hidden(input_batch)[keep], target_batch[keep]  # (targets, emb_dim)
    if torch.device(device).type == "cpu" if sliced_head is None else sliced_head:
        loss = HeadCrossEntropy.apply(hidden, model.out_head.weight, targets, HEAD_CHUNK,
                                      torch.is_grad_enabled())
    else:
        loss = F.cross_entropy(model.out_head(hidden), targets, reduction="sum")
    return loss / max(len(targets), 1)


def calc_loss_loader(data_loader, model, device, num_batches=None, autocast=nullcontext,
                     loss_fn=calc_loss_batch) -> float:
    """Average batch loss over the first `num_batches` batches (all when None), as the book."""
    total, count = 0.0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        with autocast():
            total += loss_fn(input_batch, target_batch, model, device).item()
        count += 1
    return total / count if count else float("nan")


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter, autocast=nullcontext,
                   loss_fn=calc_loss_batch) -> tuple[float, float]:
    """The book's evaluation: training and validation loss over `eval_iter` batches each."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, autocast, loss_fn)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, autocast, loss_fn)
    model.train()
    return train_loss, val_loss


def count_targets(target_batch) -> int:
    return int((target_batch != -100).sum())


def train_step(model, optimizer, input_batch, target_batch, device, autocast=nullcontext,
               loss_fn=calc_loss_batch, count=count_targets) -> tuple[float, int]:
    """One step of the book's loop; returns (loss, number of target tokens).

    Zero the gradients, forward pass and loss, backward pass, optimizer step. A loss that is
    not finite is returned before it can touch the weights (the caller stops the run).
    `count` counts the targets (under torchrun: those of all ranks, so all skip or step alike).
    """
    n_targets = count(target_batch)
    optimizer.zero_grad()
    with autocast(), attention_kernel(device, input_batch.shape[1]):
        loss = loss_fn(input_batch, target_batch, model, device)
    if not torch.isfinite(loss):
        return loss.item(), n_targets
    if n_targets:  # an all-masked batch (masking, a short --max-length) carries no signal
        loss.backward()
        optimizer.step()
    return loss.item(), n_targets


def lr_at(step: int, lr: float, total_steps: int, schedule: str = "constant",
          warmup_steps: int = 0) -> float:
    """The learning rate of step `step` (0-based): a linear warm-up over `warmup_steps`, then
    `lr` (constant) or a cosine decay from `lr` to lr/10 at `total_steps`. A pure function of
    the step, so a resumed run gets exactly the rates of an uninterrupted one."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a CUDA graph reads the rate from this tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """The book's AdamW over the weights that train; the fused kernel where there is one (one
    kernel for all weights instead of a loop: 1.18x faster steps on CPU, README, Performance)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda"))


PLAIN_ATTENTION_MAX = 128  # longest rows for which the plain kernel trains faster on CPU


def attention_kernel(device, seq_len: int):
    """On CPU, the plain softmax(QK^T)V attention kernel for rows up to 128 tokens.

    The fused (flash) kernel's backward is slow on short rows on CPU (9.5 ms against 5.5 ms
    for a GPT-2-small layer at 64 tokens); from 256 tokens, and on GPUs, it wins, and it never
    holds the (T, T) weights, so it is kept there.
    """
    if torch.device(device).type == "cpu" and seq_len <= PLAIN_ATTENTION_MAX:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


# ---- the training loop ---------------------------------------------------------------------
def train_model(model, optimizer, train_loader, val_loader, device, args, state: RunState,
                best: dict, autocast, loss_fn, on_epoch_end, on_save,
                log=print, count=count_targets, step=None) -> tuple[str, dict]:
    """Train until the epochs, --max-steps or patience run out; returns (stop reason, best weights).

    Evaluates every `args.eval_every` steps (before the first step and after the last too),
    keeps a copy of the weights of the best validation loss (none when `best` is None: with
    --keep-last they are never restored, and the copy is a model's worth of memory), and calls
    `on_save(state, best)` every `args.save_every` steps and `on_epoch_end(state, best)` after
    each epoch. `step(inputs, targets)` -> (loss, targets) replaces `train_step` (CUDA graphs).
    """
    if step is None:
        step = partial(train_step, model, optimizer, device=device, autocast=autocast,
                       loss_fn=loss_fn, count=count)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    # callers that set no schedule (older scripts, tests) train at the optimizer's constant rate
    lr_of_step = partial(lr_at, lr=optimizer.defaults["lr"], total_steps=total_steps,
                         schedule=getattr(args, "lr_schedule", "constant"),
                         warmup_steps=getattr(args, "warmup_steps", 0))
    model.train()
    start, start_step = time.perf_counter(), state.step
    last_save = start
    start_tokens = state.tokens_seen

    def evaluate():
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device,
                                              args.eval_batches, autocast, loss_fn)
        elapsed = time.perf_counter() - start
        done = state.step - start_step
        rate = (state.tokens_seen - start_tokens) / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (total_steps - state.step) if done else 0.0
        state.history.append({"step": state.step, "epoch": state.step / steps_per_epoch,
                              "tokens": state.tokens_seen, "train_loss": train_loss,
                              "val_loss": val_loss})
        improved = val_loss < state.best_val
        if improved:
            state.best_val, state.best_step, state.evals_since_best = val_loss, state.step, 0
        else:
            state.evals_since_best += 1
        log(f"ep {min(state.epoch + 1, args.epochs)} step {state.step:5d}/{total_steps} | tokens {state.tokens_seen:,} "
            f"| train {train_loss:.3f} val {val_loss:.3f}{' *' if improved else ''} "
            f"| {rate:,.0f} tok/s | ETA {format_duration(eta)}")
        return improved

    if not state.history:
        evaluate()
    reason = None
    with StopRequested() as stop:
        while state.epoch < args.epochs and reason is None:
            train_loader.batch_sampler.set_epoch(state.epoch)
            for i, (inputs, targets) in enumerate(train_loader):
                if i < state.batch:  # resuming: these batches were trained on already
                    continue
                set_lr(optimizer, lr_of_step(state.step))
                loss, n_targets = step(inputs, targets)
                if not math.isfinite(loss):
                    raise ValueError(f"loss became {loss} at step {state.step + 1}; "
                                     f"the last good checkpoint is kept (try a lower --lr)")
                state.step, state.batch = state.step + 1, i + 1
                state.tokens_seen += n_targets
                if state.step % args.eval_every == 0 and evaluate() and best is not None:
                    best = copy_weights(model, into=best)
                if save_due(args.save_every, state.step, time.perf_counter() - last_save):
                    on_save(state, best)
                    last_save = time.perf_counter()
                if stop.requested:
                    raise Interrupted(f"interrupted at step {state.step}", best)
                reason = stop_reason(state, args.patience, args.max_steps)
                if reason:
                    break
            else:
                state.epoch, state.batch = state.epoch + 1, 0
                on_epoch_end(state, best)
    if state.history[-1]["step"] != state.step and evaluate() and best is not None:
        best = copy_weights(model, into=best)
    return reason or f"completed {args.epochs} epochs", best


def main(argv=None) -> None:
    args = parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else partial(print, flush=True)  # seen as it happens
    out_dir, device = Path(args.out_dir), torch.device(pick_device(args.device))
    run = None  # one process; under torchrun the extra distributed.py (README, Several GPUs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import distributed
        run = distributed.Run(device.type, args, log)
        device = run.device
        log = run.log  # rank 0's; the others are silent
    elif args.fsdp:
        raise ValueError("--fsdp needs several processes: torchrun --nproc_per_node N train.py ...")
    if not run or run.is_main:  # only rank 0 writes there (and two probes would collide)
        check_out_dir(out_dir)
    # CUDA has its own caching allocator; macOS and musl have no glibc malloc to tell
    if args.keep_memory and not (device.type == "cpu" and keep_freed_memory()):
        log("warning: --keep-memory changes nothing here (it needs the CPU and glibc's malloc)")
    data = load_data(args.data)
    tokenizer = get_tokenizer()
    model, cfg = build_model(args, log)
    ckpt_path = out_dir / "checkpoint.pt"
    lora_run = None
    if args.lora_rank:  # an extra: imported only for a LoRA run
        import lora
        lora_run = lora.LoRARun(model, args, ckpt_path, log)
    model.to(device)
    if run:
        model = run.wrap(model)
    bf16 = use_bf16(args.precision, device)
    autocast = make_autocast(device, bf16)
    (train_loader, val_loader), (_, val_data, test_data) = prepare_loaders(args, data, tokenizer,
                                                                           device, log)
    if run:
        train_loader, val_loader = run.shard_loaders(train_loader, val_loader)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    state, best = RunState(), None
    if args.resume:
        load = lora_run.load_checkpoint if lora_run else load_checkpoint
        if run:
            load = partial(run.load, load)
        state, best = load(ckpt_path, model, optimizer, cfg)
        log(f"resumed from {ckpt_path} at epoch {state.epoch + 1}, step {state.step}")
    log(f"settings: model {args.model}, epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, "
        f"weight decay {args.weight_decay}, eval every {args.eval_every} steps over "
        f"{args.eval_batches} batches, patience {args.patience}, max length {args.max_length}, "
        f"lr schedule {args.lr_schedule} (warm-up {args.warmup_steps} steps), "
        f"{'prompt masked, ' if args.mask_prompt else ''}"
        f"{'bf16 autocast' if bf16 else 'fp32'} on {device}, seed {args.seed}")
    loss_fn = partial(calc_loss_batch, full_head=True) if args.full_head else calc_loss_batch
    graphs = None  # on CUDA, each batch shape's step recorded once and replayed (cuda_graphs.py)
    if device.type == "cuda" and not (args.no_cuda_graphs or args.compile or run or lora_run):
        graphs = GraphedTraining(model, optimizer, partial(calc_loss_batch, full_head=True), bf16)
        loss_fn = graphs.loss
    log(f"training step: {'CUDA graphs, ' if graphs else ''}"
        f"{'compiled, ' if args.compile else ''}output head on "
        f"{'every position' if graphs or args.full_head else 'target positions'}")
    if args.compile:  # the loss function, so the model's forward pass and the head compile
        loss_fn = torch.compile(loss_fn, backend=args.compile)
    if run:
        loss_fn = run.global_loss(loss_fn)

    def save(state, best):
        write = lora_run.save_checkpoint if lora_run else save_checkpoint
        if run:
            run.save(write, ckpt_path, model, optimizer, state, best, cfg)
        else:
            write(ckpt_path, model, optimizer, state, best, cfg)

    def epoch_end(state, best):
        log(f"epoch {state.epoch} sample: "
            f"{sample_response(model, val_data[0], tokenizer, args.prompt_style)!r}")
        model.train()
        if not args.no_checkpoint:
            save(state, best)

    start = time.perf_counter()
    try:
        reason, best = train_model(model, optimizer, train_loader, val_loader, device, args,
                                   state, None if args.keep_last else best or copy_weights(model),
                                   autocast, loss_fn,
                                   epoch_end, save, log,
                                   run.count_targets if run else count_targets,
                                   graphs.step if graphs else None)
    except Interrupted as stop:
        save(state, stop.best)
        print(f"{stop}; checkpoint written to {ckpt_path}; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    train_seconds = time.perf_counter() - start
    graphs = loss_fn = None  # the graphs' memory goes back to the allocator before generation
    if args.keep_last:
        log(f"{reason}; kept the last weights (--keep-last); training took "
            f"{format_duration(train_seconds)}")
    else:
        model.load_state_dict(best)
        log(f"{reason}; restored the best weights (step {state.best_step}, val loss "
            f"{state.best_val:.3f}); training took {format_duration(train_seconds)}")
    if run:  # the whole model on rank 0, which writes the outputs; the other ranks are done
        model = run.full_model(model, cfg)
        if model is None:
            run.finish()  # ends the process
    if lora_run:  # a plain model: generate.py, evaluate.py and export load it as any other
        model = lora.merge_lora(model)
    save_model(model, cfg, out_dir / "model.pt")

    generate_seconds = 0.0
    if not args.no_generate:
        start = time.perf_counter()
        log(f"generating responses for {len(test_data)} test entries")
        responses = generate_responses(model.eval(), test_data, tokenizer, style=args.prompt_style,
                                       max_new_tokens=args.max_new_tokens, progress=not args.quiet)
        generate_seconds = time.perf_counter() - start
        write_json(out_dir / "instruction-data-with-response.json",
                   [dict(e, model_response=r) for e, r in zip(test_data, responses)])
        show_examples(test_data, responses, args.prompt_style, log=log)
    write_json(out_dir / "metrics.json", {
        "settings": {k: v for k, v in vars(args).items()}, "model_config": cfg,
        "history": state.history, "best_step": state.best_step, "best_val_loss": state.best_val,
        "stop_reason": reason, "steps": state.step, "target_tokens_seen": state.tokens_seen,
        "train_seconds": train_seconds, "generate_seconds": generate_seconds,
        "target_tokens_per_second": state.tokens_seen / train_seconds if train_seconds else 0.0})
    if not plot_losses(state.history, out_dir / "loss-plot.png"):
        log("loss-plot.png skipped: pip install matplotlib to get the plot")
    log(f"outputs written to {out_dir}/")
    if run:
        run.finish()  # ends the process


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
