"""The run's state and its safety: everything a checkpoint needs to continue exactly.

`RunState` (epoch, batch, step, best loss, history), `save_checkpoint` / `load_checkpoint`
(written to a temporary file and renamed, never half-written), `copy_weights` for the best
weights, Ctrl-C between two steps (`StopRequested`, `Interrupted`) and `--save-every`.
"""
import argparse
import math
import signal
import sys
from dataclasses import asdict, dataclass, field

import torch

from gpt import atomic_save, load_state, read_checkpoint


@dataclass
class RunState:
    epoch: int = 0            # current epoch (0-based)
    batch: int = 0            # batches already done in the current epoch
    step: int = 0             # optimizer steps done
    tokens_seen: int = 0      # target tokens trained on
    best_val: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    history: list = field(default_factory=list)  # one dict per evaluation


def save_checkpoint(path, model, optimizer, state: RunState, best_weights, cfg) -> None:
    """Everything --resume needs; the best weights only when they are not the current ones (and
    kept at all: None under --keep-last)."""
    same = state.best_step == state.step and bool(state.history)  # common: it just improved
    ckpt = {"format": "gpt2-instruct-checkpoint", "config": cfg, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "state": asdict(state),
            "best_weights": None if same else best_weights, "torch_rng": torch.get_rng_state()}
    atomic_save(ckpt, path)  # streamed to a temporary file: no second copy in memory


def load_checkpoint(path, model, optimizer, cfg) -> tuple[RunState, dict]:
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == "gpt2-instruct-checkpoint"):
        raise ValueError(f"{path}: not a training checkpoint of this project")
    saved = ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}
    model_keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    if any(saved.get(k) != cfg[k] for k in model_keys):
        raise ValueError(f"{path}: checkpoint is for another model ({saved.get('name')}, "
                         f"{saved.get('n_layers')} layers); this run is {cfg.get('name')}")
    try:
        load_state(model, ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in getattr(optimizer, "param_groups", []):  # a CUDA graph run's tensor rate
            group["lr"], group["capturable"] = float(group["lr"]), False
        torch.set_rng_state(ckpt["torch_rng"])
        best = ckpt["best_weights"]
        return RunState(**ckpt["state"]), copy_weights(model) if best is None else best
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: damaged training checkpoint ({type(e).__name__}: {e})") from None


def copy_weights(model, into: dict | None = None) -> dict:
    """The model's weights, copied: the best ones so far, to restore at the end.

    Frozen weights (a LoRA run's base) never change: shared, not copied. A weight under two
    names (GPT-2's head tied to its token embedding) is copied once. `into`, an earlier copy, is
    overwritten in place, so that two copies never exist at once (each is a model's worth).
    """
    copies, out = {}, {}  # id of a weight -> its copy
    for name, w in model.state_dict(keep_vars=True).items():
        if not w.requires_grad:
            out[name] = w.detach()
            continue
        if id(w) not in copies:
            copies[id(w)] = w.detach().clone() if into is None else into[name].copy_(w.detach())
        out[name] = copies[id(w)]
    return out


class StopRequested:
    """Ctrl-C sets a flag that the loop checks between steps, so a checkpoint is always consistent."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def parse_every(text: str) -> tuple[float, str]:
    """`--save-every`: "200" (steps) or "10m" (minutes); 0 never."""
    minutes = text.endswith("m")
    try:
        value = float(text[:-1]) if minutes else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N (steps) or Nm (minutes)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value, "minutes" if minutes else "steps"


def save_due(every: tuple[float, str], step: int, seconds_since_save: float) -> bool:
    value, unit = every
    if not value:
        return False
    return seconds_since_save >= 60 * value if unit == "minutes" else step % value == 0


class Interrupted(Exception):
    """Ctrl-C between two steps: the state is consistent and can be checkpointed with `best`."""

    def __init__(self, message: str, best: dict):
        super().__init__(message)
        self.best = best


def stop_reason(state: RunState, patience: int, max_steps: int) -> str | None:
    """Why a run stops after this step (early stopping, --max-steps), or None to go on."""
    if patience and state.evals_since_best >= patience:
        return (f"early stop at step {state.step}: no new best validation loss in {patience} "
                f"evaluations")
    if max_steps and state.step >= max_steps:
        return f"reached --max-steps {max_steps}"
    return None
