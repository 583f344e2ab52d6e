"""LoRA, as in the book's appendix E: frozen weights plus a trainable low-rank update alpha * A @ B.

`LoRALayer`, `LinearWithLoRA` and `replace_linear_with_lora(model, rank, alpha)` are the book's;
`add_lora` freezes the model and wraps the chosen layers, `merge_lora` folds the updates back in
(a plain GPTModel again), `adapters_disabled` gives the base model back for DPO's reference, and
`LoRARun` is what train.py's `--lora-rank` uses for checkpoints that hold only the adapters.
"""
import hashlib
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import GPTModel, atomic_save, load_weights, read_checkpoint

TARGETS = ("qkv", "out_proj", "fc", "proj", "out_head")  # every Linear of GPTModel, by name


class LoRALayer(nn.Module):
    """The book's update: x -> alpha * (x @ A @ B); B starts at zero, so the model is unchanged."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)

    def delta(self) -> torch.Tensor:
        """The update as a Linear weight would hold it: (out_dim, in_dim)."""
        return self.alpha * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """The book's wrapper: the frozen Linear's output plus its LoRA update.

    `parts` > 1 splits the output into equal parts with one LoRALayer each: the fused
    query/key/value Linear then gets the three adapters of the book's separate W_query, W_key
    and W_value (same parameter count, same function).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, parts: int = 1):
        super().__init__()
        self.linear = linear
        out = linear.out_features // parts
        self.lora = nn.ModuleList(LoRALayer(linear.in_features, out, rank, alpha)
                                  for _ in range(parts))
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.linear(x)
        return self.linear(x) + torch.cat([part(x) for part in self.lora], dim=-1)

    def delta(self) -> torch.Tensor:
        return torch.cat([part.delta() for part in self.lora], dim=0)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: train.py's loss runs the output head from `out_head.weight`."""
        return self.linear.weight + self.delta() if self.enabled else self.linear.weight


class EmbeddingWithLoRA(nn.Module):
    """The token embedding when its weight is tied to a LoRA-wrapped output head.

    GPTModel ties `out_head.weight` to `tok_emb.weight`, so LoRA on the head adapts that one
    matrix: the lookup reads the same updated rows the head multiplies with, and the merged
    model stays tied and gives exactly the logits of the adapted one.
    """

    def __init__(self, embedding: nn.Embedding, head: LinearWithLoRA):
        super().__init__()
        self.embedding = embedding
        self.head = [head]  # a list: not registered twice as a submodule

    def forward(self, idx):
        head = self.head[0]
        if not head.enabled:
            return self.embedding(idx)
        lora = head.lora[0]
        # rows idx of delta = alpha * (A @ B).T, without building the (vocab, emb) matrix
        return self.embedding(idx) + lora.alpha * F.embedding(idx, lora.B.T) @ lora.A.T

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float,
                             targets=TARGETS) -> None:
    """The book's function: every Linear named in `targets` becomes a LinearWithLoRA."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear) and name in targets:
            parts = 3 if name == "qkv" else 1  # query, key and value: one adapter each
            setattr(model, name, LinearWithLoRA(module, rank, alpha, parts))
        else:
            replace_linear_with_lora(module, rank, alpha, targets)


def add_lora(model: GPTModel, rank: int, alpha: float, targets=TARGETS) -> int:
    """Freeze every weight, wrap the `targets` layers, and return the trainable parameter count."""
    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target {unknown[0] if unknown else ''!r}; "
                         f"choose from {', '.join(TARGETS)}")
    for param in model.parameters():
        param.requires_grad = False
    tied = model.out_head.weight is model.tok_emb.weight
    replace_linear_with_lora(model, rank, alpha, targets)
    if tied and isinstance(model.out_head, LinearWithLoRA):
        model.tok_emb = EmbeddingWithLoRA(model.tok_emb, model.out_head)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model: nn.Module) -> list[LinearWithLoRA]:
    return [m for m in model.modules() if isinstance(m, LinearWithLoRA)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside it the model computes with its frozen base weights only (DPO's reference)."""
    modules = lora_modules(model)
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each update into its frozen weight and unwrap it: a plain model, weights trainable again.

    The tied head/embedding matrix is one tensor, updated once (by the head's wrapper).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LinearWithLoRA):
                child.linear.weight += child.delta()
                setattr(parent, name, child.linear)
            elif isinstance(child, EmbeddingWithLoRA):
                setattr(parent, name, child.embedding)
    for param in model.parameters():
        param.requires_grad = True
    return model


def lora_state(model: nn.Module) -> dict:
    """The adapters' weights alone (what a LoRA checkpoint holds), detached copies."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_lora_state(model: nn.Module, state: dict, source) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, p in params.items():
        if not isinstance(state.get(name), torch.Tensor) or state[name].shape != p.shape:
            raise ValueError(f"{source}: LoRA weight {name!r} is missing or has another shape "
                             f"(another --lora-rank or --lora-targets?)")
    extra = sorted(set(state) - set(params), key=str)
    if extra:
        raise ValueError(f"{source}: unexpected LoRA weight {extra[0]!r}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the weights: which base the adapters belong to."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LoRARun:
    """train.py's `--lora-rank`: wraps the model and writes checkpoints of the adapters alone.

    A checkpoint names its base weights (path, or the seeded start of `--from-scratch`) and their
    fingerprint; resuming loads that base again and refuses one whose fingerprint differs.
    """

    FORMAT = "gpt2-instruct-lora-checkpoint"

    def __init__(self, model: GPTModel, args, ckpt_path: Path, log=print):
        self.base_path = args.weights or None
        if args.resume:  # build_model skipped the pretrained weights: the checkpoint names them
            ckpt = self._read(ckpt_path)
            self.base_path = ckpt["base"]["path"]
            if self.base_path:
                load_weights(model, self.base_path)
        elif self.base_path is None and not args.from_scratch:
            from training.files import TINY_PRETRAINED, download_gpt2  # what build_model loaded
            self.base_path = str(TINY_PRETRAINED if args.model == "tiny"
                                 else download_gpt2(args.model))
        self.base_sha256 = fingerprint(model)
        if args.resume and ckpt["base"]["sha256"] != self.base_sha256:
            raise ValueError(f"{ckpt_path}: its base weights ({self.base_path or 'tiny, seeded'}) "
                             f"have changed since the checkpoint was written")
        targets = args.lora_targets or TARGETS
        n = add_lora(model, args.lora_rank, args.lora_alpha, targets)
        log(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha} on {', '.join(targets)}: "
            f"{n:,} trainable parameters")

    def _read(self, path) -> dict:
        ckpt = read_checkpoint(path)
        if not (isinstance(ckpt, dict) and ckpt.get("format") == self.FORMAT
                and isinstance(ckpt.get("base"), dict)):
            raise ValueError(f"{path}: not a LoRA training checkpoint of this project")
        return ckpt

    def save_checkpoint(self, path, model, optimizer, state, best_weights, cfg) -> None:
        trainable = set(lora_state(model))
        ckpt = {"format": self.FORMAT, "config": cfg, "lora": lora_state(model),
                "base": {"path": self.base_path, "sha256": self.base_sha256},
                "optimizer": optimizer.state_dict(), "state": state,
                "best_lora": best_weights and {k: v for k, v in best_weights.items() if k in trainable},
                "torch_rng": torch.get_rng_state()}
        atomic_save(ckpt, path)

    def load_checkpoint(self, path, model, optimizer, cfg, state_class=dict) -> tuple:
        """(the loop's state, made by `state_class`; the best weights: the base shared, the best
        adapters copied), as training/checkpoint.py's load_checkpoint."""
        ckpt = self._read(path)
        try:
            # None: the run kept no best weights (--keep-last); the current ones stand in
            load_lora_state(model, ckpt["best_lora"] or ckpt["lora"], path)
            best = {name: w.detach().clone() if w.requires_grad else w.detach()
                    for name, w in model.state_dict(keep_vars=True).items()}
            load_lora_state(model, ckpt["lora"], path)
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"])
            return state_class(**ckpt["state"]), best
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path}: damaged LoRA checkpoint ({type(e).__name__}: {e})") from None
