"""Step 4 of the pipeline: instruction fine-tuning, `python train.py` (chapter 7's main job).

The book's functions with the book's names and arguments (`calc_loss_batch`, `calc_loss_loader`,
`evaluate_model`, `train_model_simple`, `plot_losses`); this project's loop `train_model` (the
book's, plus early stopping, best weights, checkpoints, Ctrl-C, resuming); then `main`, which
uses training/ (flags, model, data, outputs) and fast/ (the faster step). Copied beside gpt.py,
data.py, collate.py and generate.py alone, everything above `main` works.
"""
import io
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from data import atomic_write_bytes, cli_main
from generate import generate


# ---- the book's functions -------------------------------------------------------------------
def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of the next-token predictions; targets of -100 are ignored."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, vocab_size)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None, loss_fn=calc_loss_batch):
    """The average batch loss over the first `num_batches` batches (all when None)."""
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if num_batches == 0:
        return float("nan")
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i == num_batches:
            break
        total += loss_fn(input_batch, target_batch, model, device).item()
    return total / num_batches


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter, loss_fn=calc_loss_batch):
    """Training and validation loss, `eval_iter` batches each, with dropout off."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, loss_fn)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, loss_fn)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context):
    """The book's look at the model after each epoch: 50 greedy tokens after `start_context`."""
    model.eval()
    idx = torch.tensor([tokenizer.encode(start_context)], device=device)
    out = generate(model, idx, max_new_tokens=50, context_size=model.pos_emb.weight.shape[0])
    print(tokenizer.decode(out[0].tolist()).replace("\n", " "))  # one line
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer):
    """The book's training loop. Returns its (train_losses, val_losses, track_tokens_seen), one
    entry per evaluation (every `eval_freq` steps, from the first); tokens seen count every
    input position, padding included, as the book's do."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # the gradients of the last step are not this step's
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device,
                                                      eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss-plot.pdf") -> bool:
    """The book's plot: both losses against epochs, with tokens seen on a second x-axis. Written
    to `path` (its suffix gives the format) instead of shown; False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no window, any backend
    except ImportError:
        return False
    fig = Figure(figsize=(5, 3))
    ax1 = fig.subplots()
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set(xlabel="Epochs", ylabel="Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # the same x positions, labelled with the tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: it only sets the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:] or "png")
    atomic_write_bytes(path, buffer.getvalue())  # the old plot or the new one, never half of one
    return True


# ---- this project's loop: the book's, plus early stopping, best weights and checkpoints -------
@dataclass
class RunState:
    """Where a run is: what --resume needs besides the weights and the optimizer's state."""
    epoch: int = 0            # current epoch (0-based)
    batch: int = 0            # batches already done in the current epoch
    step: int = 0             # optimizer steps done
    tokens_seen: int = 0      # target tokens trained on
    best_val: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    history: list = field(default_factory=list)  # one dict per evaluation


def train_step(model, optimizer, input_batch, target_batch, device, loss_fn=calc_loss_batch,
               count=None) -> tuple[float, int]:
    """One step of the book's loop -> (loss, target tokens). A batch without targets (all masked)
    is skipped; a loss that is not finite is returned before it touches the weights. `count`
    counts targets (under torchrun: all ranks', so that all skip or step alike)."""
    n_targets = count(target_batch) if count else int((target_batch != -100).sum())
    if not n_targets:
        return 0.0, 0
    optimizer.zero_grad()
    loss = loss_fn(input_batch, target_batch, model, device)
    if torch.isfinite(loss):
        loss.backward()
        optimizer.step()
    return loss.item(), n_targets


def train_model(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq,
                eval_iter, *, state=None, step=None, loss_fn=calc_loss_batch, patience=0,
                max_steps=0, lr_schedule=None, best=None, save_every=(0, "steps"), save=None,
                on_epoch_end=None, log=print) -> tuple[str, dict | None]:
    """train_model_simple's loop, plus: `step(inputs, targets)` -> (loss, target tokens), the
    book's `train_step` unless a faster one is given (fast/); `loss_fn` for evaluation; an
    early stop after `patience` evaluations without a new best validation loss, or after
    `max_steps`; the rate `lr_schedule(step, total_steps)`; the best weights copied into
    `best` (None: not kept); `save(state, best)` every `save_every` (N, "steps" or "minutes")
    and `on_epoch_end(state, best)`; Ctrl-C raises Interrupted between two steps; `state`
    resumes a run. Returns (why it stopped, best)."""
    state = state or RunState()
    step = step or partial(train_step, model, optimizer, device=device, loss_fn=loss_fn)
    total_steps = min(num_epochs * len(train_loader), max_steps or math.inf)
    start, start_step, start_tokens, last_save = time.perf_counter(), state.step, \
        state.tokens_seen, time.perf_counter()

    def evaluate() -> bool:  # the book's evaluation, logged with speed and time left
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter,
                                              loss_fn)
        seconds, done = time.perf_counter() - start, state.step - start_step
        state.history.append({"step": state.step, "epoch": state.step / len(train_loader),
                              "tokens": state.tokens_seen, "train_loss": train_loss,
                              "val_loss": val_loss})
        if improved := val_loss < state.best_val:
            state.best_val, state.best_step, state.evals_since_best = val_loss, state.step, 0
        else:
            state.evals_since_best += 1
        log(f"ep {min(state.epoch + 1, num_epochs)} step {state.step:5d}/{total_steps} | tokens "
            f"{state.tokens_seen:,} | train {train_loss:.3f} val {val_loss:.3f}"
            f"{' *' if improved else ''} | {(state.tokens_seen - start_tokens) / seconds:,.0f} "
            f"tok/s | ETA {format_duration(seconds / done * (total_steps - state.step) if done else 0)}")
        return improved

    if not state.history:
        evaluate()
    reason = None
    with StopRequested() as stop:
        while state.epoch < num_epochs and reason is None:
            if hasattr(train_loader.batch_sampler, "set_epoch"):  # a new order each epoch
                train_loader.batch_sampler.set_epoch(state.epoch)
            for i, (input_batch, target_batch) in enumerate(train_loader):
                if i < state.batch:  # resuming: these batches were trained on already
                    continue
                for group in optimizer.param_groups if lr_schedule else ():
                    group["lr"] = lr_schedule(state.step, total_steps)
                loss, n_targets = step(input_batch, target_batch)
                if not math.isfinite(loss):
                    raise ValueError(f"loss became {loss} at step {state.step + 1}; "
                                     f"the last good checkpoint is kept (try a lower --lr)")
                state.step, state.batch = state.step + 1, i + 1
                state.tokens_seen += n_targets
                if state.step % eval_freq == 0 and evaluate() and best is not None:
                    best = copy_weights(model, into=best)
                if save and save_due(save_every, state.step, time.perf_counter() - last_save):
                    save(state, best)
                    last_save = time.perf_counter()
                if stop.requested:
                    raise Interrupted(f"interrupted at step {state.step}", best)
                if reason := stop_reason(state, patience, max_steps):
                    break
            else:
                state.epoch, state.batch = state.epoch + 1, 0
                if on_epoch_end:
                    on_epoch_end(state, best)
    if state.history[-1]["step"] != state.step and evaluate() and best is not None:
        best = copy_weights(model, into=best)
    return reason or f"completed {num_epochs} epochs", best


def lr_at(step: int, lr: float, total_steps: int, schedule: str = "constant",
          warmup_steps: int = 0) -> float:
    """The rate of step `step` (0-based): a linear warm-up over `warmup_steps`, then `lr`
    (constant) or a cosine decay from `lr` to lr/10 at `total_steps`. A function of the step
    alone, so a resumed run gets exactly the rates of an uninterrupted one."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_due(every: tuple[float, str], step: int, seconds_since_save: float) -> bool:
    """--save-every: (N, "steps") or (N, "minutes") since the last save; N = 0: never."""
    value, unit = every
    if not value:
        return False
    return seconds_since_save >= 60 * value if unit == "minutes" else step % value == 0


def stop_reason(state: RunState, patience: int, max_steps: int) -> str | None:
    """Why a run stops after this step (early stopping, --max-steps), or None to go on."""
    if patience and state.evals_since_best >= patience:
        return (f"early stop at step {state.step}: no new best validation loss in {patience} "
                f"evaluations")
    if max_steps and state.step >= max_steps:
        return f"reached --max-steps {max_steps}"
    return None


def copy_weights(model, into: dict | None = None) -> dict:
    """A copy of the weights that train (frozen ones are shared), each tied weight once; `into`,
    an earlier copy, is overwritten in place, so that two copies never exist at once."""
    copies, out = {}, {}  # id of a weight -> its copy
    for name, w in model.state_dict(keep_vars=True).items():
        if w.requires_grad and id(w) not in copies:
            copies[id(w)] = w.detach().clone() if into is None else into[name].copy_(w.detach())
        out[name] = copies[id(w)] if w.requires_grad else w.detach()
    return out


class StopRequested:
    """Ctrl-C sets a flag the loop reads between steps, so that a checkpoint is consistent."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class Interrupted(Exception):
    """Ctrl-C between two steps: the state is consistent, to be checkpointed with `best`."""

    def __init__(self, message: str, best: dict | None):
        super().__init__(message)
        self.best = best


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# ---- the run -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    # the two wings train.py uses: the run's machinery (training/) and the faster step (fast/)
    from training.run import Run, parse_args, write_outputs
    from fast.step import make_step
    args = parse_args(argv)
    run = Run(args)  # device, data, model with weights, loaders, optimizer; LoRA, torchrun
    state, best = run.resume(RunState) if args.resume else (RunState(), None)
    best = None if args.keep_last else best or copy_weights(run.model)  # a model's worth
    # the faster step where it is faster (--full-head --precision fp32: the book's step)
    step, loss_fn = make_step(run.model, run.optimizer, run.device, args, calc_loss_batch,
                              train_step, run.dist, run.log)
    start = time.perf_counter()
    try:
        reason, best = train_model(
            run.model, run.train_loader, run.val_loader, run.optimizer, run.device, args.epochs,
            args.eval_every, args.eval_batches or None, state=state, step=step, loss_fn=loss_fn,
            patience=args.patience, max_steps=args.max_steps, best=best,
            lr_schedule=lambda s, total: lr_at(s, args.lr, total, args.lr_schedule,
                                               args.warmup_steps),
            save_every=args.save_every, save=run.save, on_epoch_end=run.epoch_end, log=run.log)
    except Interrupted as stop:
        run.save(state, stop.best)
        print(f"{stop}; checkpoint written to {run.ckpt_path}; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    seconds = time.perf_counter() - start
    step = loss_fn = None  # a CUDA graph's memory goes back before generation
    # the best weights restored (unless --keep-last), LoRA's merged in
    model = run.final_model(best, state, f"{reason}; training took {format_duration(seconds)}")
    # model.pt, the test set's responses, metrics.json and the book's loss plot
    write_outputs(run, model, state, reason, seconds, plot_losses)
    run.finish()


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
