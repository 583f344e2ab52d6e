"""Checkpoints of a training run: everything `train.py --resume` needs to continue exactly.

`save_checkpoint` (the weights, AdamW's state, the loop's RunState fields, the best weights, the
random state; streamed to a temporary file and renamed, never half-written) and
`load_checkpoint`; `parse_every` reads `--save-every`. The LoRA run's own (adapters only) are in
extras/lora.py, torchrun's wrapping in extras/distributed.py.
"""
import argparse

import torch

from gpt import atomic_save, load_state, read_checkpoint

FORMAT = "gpt2-instruct-checkpoint"


def save_checkpoint(path, model, optimizer, state: dict, best_weights, cfg) -> None:
    """Everything --resume needs; the best weights only when they are not the current ones (and
    kept at all: None under --keep-last). `state`: train.RunState's fields."""
    same = state["best_step"] == state["step"] and bool(state["history"])  # it just improved
    atomic_save({"format": FORMAT, "config": cfg, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "state": state,
                 "best_weights": None if same else best_weights,
                 "torch_rng": torch.get_rng_state()}, path)


def load_checkpoint(path, model, optimizer, cfg, state_class=dict) -> tuple:
    """Restore the model, the optimizer and the random state; returns (the loop's state, made by
    `state_class` (train.RunState) from its fields, and the best weights: None when the current
    ones are the best)."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
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
        return state_class(**ckpt["state"]), ckpt["best_weights"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: damaged training checkpoint ({type(e).__name__}: {e})") from None


def parse_every(text: str) -> tuple[float, str]:
    """`--save-every`: "200" (steps) or "10m" (minutes); 0 never."""
    minutes = text.endswith("m")
    try:
        value = float(text[:-1]) if minutes else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N (steps) or Nm (minutes)") from None
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not N or Nm with N >= 0")
    return value, "minutes" if minutes else "steps"
