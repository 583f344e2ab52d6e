"""The book's own files: `torch.save(model.state_dict(), ...)` of its chapter 4 GPTModel.

Read (`from_book`, `load_book_model`, and `load_any_weights` for `train.py --weights`) and
written (`book_state_dict`, through `python extras/export.py MODEL --to book FILE.pth`). The
book's model names its LayerNorm weights `scale` and `shift`, its feed-forward layers
`ff.layers.0` and `ff.layers.2`, and keeps query, key and value as three matrices
(`W_query`, `W_key`, `W_value`) where gpt.py has one fused `qkv`.
"""
import re

import torch

from gpt import MODEL_NAMES, GPTModel, check_state, load_model, load_state, load_weights, \
    model_config, read_checkpoint, valid_config

BOOK_RENAMES = {f"{norm}.{book}": f"{norm}.{ours}" for norm in ("norm1", "norm2", "final_norm")
                for book, ours in (("scale", "weight"), ("shift", "bias"))}
BOOK_RENAMES |= {"ff.layers.0.": "ff.fc.", "ff.layers.2.": "ff.proj."}


def rename(name: str, renames: dict[str, str]) -> str:
    """`name` with its first part found in `renames` replaced (no two parts overlap)."""
    old = next((old for old in renames if old in name), None)
    return name if old is None else name.replace(old, renames[old])


def from_book(ckpt, source) -> dict | None:
    """This model's state dict from the book's (chapter 5 also saves {"model_state_dict": ...}),
    or None if `ckpt` is not one: att.mask buffers dropped, W_query, W_key and W_value stacked
    into the fused qkv, in that order."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict):
        ckpt = ckpt["model_state_dict"]
    if not (isinstance(ckpt, dict) and "final_norm.scale" in ckpt):
        return None
    state, qkv = {}, {}
    for name, tensor in ckpt.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            raise ValueError(f"{source}: entry {name!r} is not a named tensor")
        if m := re.fullmatch(r"(trf_blocks\.\d+\.att\.)W_(query|key|value)(\.weight|\.bias)", name):
            qkv.setdefault(f"{m[1]}qkv{m[3]}", {})[m[2]] = tensor
        elif not re.fullmatch(r"trf_blocks\.\d+\.att\.mask", name):  # the causal mask: not needed
            state[rename(name, BOOK_RENAMES)] = tensor
    for name, parts in qkv.items():
        if len(parts) != 3 or len({p.shape for p in parts.values()}) != 1:
            raise ValueError(f"{source}: {name.replace('qkv', 'W_query/W_key/W_value')} are "
                             f"not three tensors of one shape")
        state[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return state


def config_from_state(state: dict, source) -> dict:
    """The config of a state dict in this model's names, read from its shapes; the heads (which
    shapes cannot tell) are those of the preset of that width."""
    try:
        (vocab_size, width), context_length = state["tok_emb.weight"].shape, \
            state["pos_emb.weight"].shape[0]
    except (KeyError, AttributeError, ValueError, IndexError):
        raise ValueError(f"{source}: no token and position embeddings of a GPT model") from None
    name = next((n for n in MODEL_NAMES if model_config(n)["emb_dim"] == width), None)
    if name is None:
        raise ValueError(f"{source}: embedding width {width} is none of {', '.join(MODEL_NAMES)}")
    emb, head = state["tok_emb.weight"], state.get("out_head.weight", state["tok_emb.weight"])
    return dict(model_config(name), name=name, vocab_size=vocab_size, context_length=context_length,
                n_layers=len({k.split(".")[1] for k in state if k.startswith("trf_blocks.")}),
                qkv_bias="trf_blocks.0.att.qkv.bias" in state,
                tie_head=head is emb or (isinstance(head, torch.Tensor) and torch.equal(head, emb)))


def load_book_model(path, device="cpu") -> tuple[GPTModel, dict]:
    """A model from the book's state dict (its size read from the shapes), in eval mode."""
    state = from_book(read_checkpoint(path), path)
    if state is None:
        raise ValueError(f"{path}: not a state dict of the book's GPTModel")
    cfg = config_from_state(state, path)
    if not valid_config(cfg):
        raise ValueError(f"{path}: its shapes make no GPT model")
    with torch.device("meta"):  # shapes only: a wrong file must not allocate a huge model
        check_state(GPTModel(cfg).state_dict(), state, path)
    model = GPTModel(cfg)
    load_state(model, state, path)
    return model.to(device).eval(), cfg


def load_any_model(path, device="cpu") -> tuple[GPTModel, dict]:
    """A model saved by this project (gpt.load_model), or the book's state dict: what every
    command that takes a model file reads."""
    ckpt = read_checkpoint(path)
    if from_book(ckpt, path) is not None:
        return load_book_model(path, device)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == "gpt2-instruct"):
        raise ValueError(f"{path}: neither a model saved by this project (no gpt2-instruct "
                         f"header) nor a state dict of the book's GPTModel")
    return load_model(path, device)


def load_any_weights(model: GPTModel, path) -> GPTModel:
    """`train.py --weights PATH`: gpt.load_weights's files, or the book's state dict (its own
    head unties `model`'s; no qkv bias is a zero one)."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save's format is a zip archive
    state = from_book(read_checkpoint(path), path) if is_zip else None
    if state is None:
        return load_weights(model, path)
    got, cfg = config_from_state(state, path), model.cfg
    if any(got[k] != cfg[k] for k in ("vocab_size", "context_length", "emb_dim", "n_layers")):
        raise ValueError(f"{path}: a {got['name']}-sized model ({got['n_layers']} layers, "
                         f"width {got['emb_dim']}, context {got['context_length']}), not the "
                         f"one built here ({cfg['n_layers']}, {cfg['emb_dim']}, "
                         f"{cfg['context_length']}); train.py: pass --model {got['name']}")
    for i in range(cfg["n_layers"] if cfg["qkv_bias"] else 0):
        state.setdefault(f"trf_blocks.{i}.att.qkv.bias", torch.zeros(3 * cfg["emb_dim"]))
    load_state(model, state, path, untie=True)
    return model


def book_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights in the book's GPTModel names, att.mask buffers included, so that the
    book's strict `load_state_dict` accepts them: the fused qkv splits into W_query, W_key,
    W_value."""
    to_book = {ours: book for book, ours in BOOK_RENAMES.items()}
    n = model.cfg["context_length"]
    mask = torch.triu(torch.ones(n, n), diagonal=1)  # the book's buffer; one tensor saved once
    state = {}
    for name, tensor in model.state_dict().items():
        if ".att.qkv." in name:  # rows: query, then key, then value (from_book's order)
            for part, rows in zip(("W_query", "W_key", "W_value"), tensor.chunk(3)):
                state[name.replace("qkv", part)] = rows
        else:
            state[rename(name, to_book)] = tensor
        if name.endswith(".att.out_proj.bias"):
            state[name.replace("out_proj.bias", "mask")] = mask
    return state


def book_config(cfg: dict) -> dict:
    """The book's config dict for this model: the book uses the same key names."""
    return {k: cfg[k] for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                "drop_rate", "qkv_bias")}
