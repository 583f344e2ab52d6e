"""The GPT-2 model: architecture, presets, KV cache, and weight files.

Entry points: `model_config(name)`, `GPTModel(cfg)`, `KVCache`, `load_gpt2(model, path)` for
Hugging Face `model.safetensors` files, `save_model` / `load_model` for this project's own
checkpoints (`load_model` and `load_weights` also read the book's `GPTModel` state dicts). It
imports no other file of the project, so it can be copied alone. Names follow the book's chapter 4
(`tok_emb`, `trf_blocks`, `final_norm`, `out_head`); query/key/value are one fused matrix, as in
GPT-2's files. The head is tied to the token embedding unless the config says `tie_head: False`.
"""
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


MODEL_NAMES = ("tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
_SIZES = {  # emb_dim, n_layers, n_heads (GPT-2 paper, table 2)
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
HF_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium",
            "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl"}


def model_config(name: str) -> dict:
    """The book's config dict for a preset: GPT-2's four sizes, or `tiny` for the offline demo."""
    if name == "tiny":  # ~7M parameters, most of them the 50257 x 128 token embedding
        return {"vocab_size": 50257, "context_length": 256, "emb_dim": 128, "n_heads": 4,
                "n_layers": 4, "drop_rate": 0.0, "qkv_bias": True}
    if name not in _SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    emb_dim, n_layers, n_heads = _SIZES[name]
    return {"vocab_size": 50257, "context_length": 1024, "emb_dim": emb_dim, "n_heads": n_heads,
            "n_layers": n_layers, "drop_rate": 0.0, "qkv_bias": True}


class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_heads, T, head_dim) pair per layer.

    `pad_mask` (B, T) remembers which cached positions are real tokens, so left-padded rows
    never attend to their padding and count positions from their first real token.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pad_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.pad_mask is None else self.pad_mask.shape[1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences stop costing compute)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.pad_mask = self.pad_mask[rows]


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.n_heads = cfg["n_heads"]
        self.drop_rate = cfg["drop_rate"]
        self.qkv = nn.Linear(cfg["emb_dim"], 3 * cfg["emb_dim"], bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(cfg["emb_dim"], cfg["emb_dim"])

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if layer < len(cache.keys):
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        dropout = self.drop_rate if self.training else 0.0
        if attn_mask is None:  # no padding and no cache: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.out_proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.fc = nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"])
        self.proj = nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        x = x + self.drop_shortcut(self.att(self.norm1(x), attn_mask, cache, layer))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


def attention_mask(pad_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """(B, 1, n_new, T) bool: query i (the last n_new of T) sees real keys at or before it.

    A query always sees itself, so a padding position never has an all-masked row (NaN).
    """
    T = pad_mask.shape[1]
    query_pos = torch.arange(T - n_new, T, device=pad_mask.device)[:, None]
    key_pos = torch.arange(T, device=pad_mask.device)[None, :]
    causal = key_pos <= query_pos  # (n_new, T)
    return ((causal & pad_mask[:, None, :]) | (key_pos == query_pos))[:, None]


class GPTModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_head", True):  # weight tying, as in GPT-2; the book's head has its own
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for block in self.trf_blocks:  # GPT-2 scales residual projections by 1/sqrt(2 * n_layers)
            for proj in (block.att.out_proj, block.ff.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @property
    def tied_head(self) -> bool:
        return self.out_head.weight is self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, cache=None, pad_mask=None):
        """Final-LayerNorm output (B, T, emb_dim); `out_head` turns it into logits.

        pad_mask (B, T) bool marks real tokens (False = left padding). With a cache, idx holds
        only the new tokens and the cache supplies everything before them.
        """
        B, T = idx.shape
        past = len(cache) if cache is not None else 0
        if past + T > self.cfg["context_length"]:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context length "
                             f"{self.cfg['context_length']}")
        no_padding = pad_mask is None  # known without looking (a host sync a CUDA graph forbids)
        if no_padding:
            pad_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        full_mask = pad_mask if cache is None or cache.pad_mask is None \
            else torch.cat([cache.pad_mask, pad_mask], dim=1)
        if cache is not None:
            cache.pad_mask = full_mask
        # positions count real tokens only, so a left-padded row starts at position 0
        pos = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]
        attn_mask = None if past == 0 and (no_padding or bool(pad_mask.all())) \
            else attention_mask(full_mask, T)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, attn_mask, cache, layer)
        return self.final_norm(x)

    def forward(self, idx, cache=None, pad_mask=None):
        return self.out_head(self.hidden(idx, cache, pad_mask))


# ---- Hugging Face safetensors files ---------------------------------------------------------
# Format: 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes; offsets count from the end of the header.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 * 2**20  # real GPT-2 headers are ~15 KB; refuse to allocate absurd sizes


def _check_header_entry(name: str, info, data_size: int) -> tuple[torch.dtype, list, int, int]:
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: header entry is not an object")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"tensor {name!r}: data offsets {offsets!r} lie outside the "
                         f"{data_size}-byte data section (truncated file?)")
    n_bytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != n_bytes:
        raise ValueError(f"tensor {name!r}: shape {shape} needs {n_bytes} bytes, "
                         f"offsets give {offsets[1] - offsets[0]}")
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors_header(f, path: Path) -> tuple[int, dict]:
    """Header checks on an open file: (data start, {name: (dtype, shape, begin, end)})."""
    size = path.stat().st_size
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (truncated, {size} bytes)")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ValueError(f"{path}: header of {n} bytes does not fit in a {size}-byte "
                         f"file (not safetensors, or truncated)")
    try:  # ValueError covers bad UTF-8, bad JSON and integers too long to convert
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        entries = {name: _check_header_entry(name, info, size - 8 - n)
                   for name, info in header.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap")
    return 8 + n, entries


def check_safetensors_complete(path) -> None:
    """ValueError unless the header is sound and its tensors end exactly where the file does."""
    path = Path(path)
    with open(path, "rb") as f:
        start, entries = read_safetensors_header(f, path)
    end = max((e for _, _, _, e in entries.values()), default=0)
    if start + end != path.stat().st_size:
        raise ValueError(f"{path}: tensors end at byte {start + end} of {path.stat().st_size}")


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Read every tensor of a .safetensors file, checking the header against the file first."""
    path = Path(path)
    with open(path, "rb") as f:
        start, entries = read_safetensors_header(f, path)
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(start + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: file ends inside tensor {name!r}")
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
        return tensors


def hf_to_gpt_name(name: str) -> str | None:
    """Map a Hugging Face GPT-2 tensor name to this model's parameter name (None = skip it)."""
    name = name.removeprefix("transformer.")
    if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", name):
        return None  # causal-mask buffers, not parameters
    fixed = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
             "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias",
             "lm_head.weight": "out_head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"h\.(\d+)\.(ln_1|attn\.c_attn|attn\.c_proj|ln_2|mlp\.c_fc|mlp\.c_proj)"
                     r"\.(weight|bias)", name)
    if m is None:
        raise ValueError(f"unexpected tensor {name!r} in a GPT-2 checkpoint")
    part = {"ln_1": "norm1", "attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj",
            "ln_2": "norm2", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj"}[m[2]]
    return f"trf_blocks.{m[1]}.{part}.{m[3]}"


def gpt2_state_dict(tensors: dict[str, torch.Tensor], model: GPTModel) -> dict[str, torch.Tensor]:
    """Rename and transpose Hugging Face GPT-2 tensors into `model`'s state dict, checking shapes."""
    expected = model.state_dict()
    state = {}
    for hf_name, tensor in tensors.items():
        name = hf_to_gpt_name(hf_name)
        if name is None:
            continue
        if tensor.dim() == 2 and re.search(r"\.(qkv|out_proj|fc|proj)\.weight$", name):
            tensor = tensor.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
        if name in state:
            raise ValueError(f"tensor {hf_name!r} appears twice (with and without 'transformer.')")
        if name not in expected:
            raise ValueError(f"unexpected tensor {hf_name!r} for a {model.cfg['n_layers']}-layer model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model wants "
                             f"{tuple(expected[name].shape)} (weights of another GPT-2 size?)")
        state[name] = tensor
    for name in expected:
        if name != "out_head.weight" and name not in state:
            raise ValueError(f"missing tensor for {name!r} in the GPT-2 checkpoint")
    state.setdefault("out_head.weight", state["tok_emb.weight"])  # tied: the file has no lm_head
    return state


def load_gpt2(model: GPTModel, path) -> GPTModel:
    """Load a Hugging Face GPT-2 `model.safetensors` into a model built from the matching preset
    (an `lm_head.weight` unlike `wte.weight` unties the model's head)."""
    tensors = read_safetensors(path)
    try:
        state = gpt2_state_dict(tensors, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    load_state(model, state, path, untie=True)
    return model


# ---- the book's checkpoints: torch.save(model.state_dict()) of its chapter 4 GPTModel --------
# the book's name -> this model's, for the parts named differently (W_query, W_key, W_value aside)
BOOK_RENAMES = {f"{norm}.{book}": f"{norm}.{ours}" for norm in ("norm1", "norm2", "final_norm")
                for book, ours in (("scale", "weight"), ("shift", "bias"))}
BOOK_RENAMES |= {"ff.layers.0.": "ff.fc.", "ff.layers.2.": "ff.proj."}


def rename(name: str, renames: dict[str, str]) -> str:
    """`name` with its first part found in `renames` replaced (no two parts overlap)."""
    old = next((old for old in renames if old in name), None)
    return name if old is None else name.replace(old, renames[old])


def from_book(ckpt, source) -> dict | None:
    """This model's state dict from the book's (chapter 5 also saves {"model_state_dict": ...,
    "optimizer_state_dict": ...}), or None if `ckpt` is not one. The att.mask buffers are dropped;
    W_query, W_key and W_value are stacked into the fused qkv, in that order."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict):
        ckpt = ckpt["model_state_dict"]
    if not (isinstance(ckpt, dict) and "final_norm.scale" in ckpt):
        return None
    state, qkv = {}, {}
    for name, tensor in ckpt.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            raise ValueError(f"{source}: entry {name!r} is not a named tensor")
        if re.fullmatch(r"trf_blocks\.\d+\.att\.mask", name):
            continue  # the book's causal mask; the attention kernel here needs none
        if m := re.fullmatch(r"(trf_blocks\.\d+\.att\.)W_(query|key|value)(\.weight|\.bias)", name):
            qkv.setdefault(f"{m[1]}qkv{m[3]}", {})[m[2]] = tensor
        else:
            state[rename(name, BOOK_RENAMES)] = tensor
    for name, parts in qkv.items():
        if len(parts) != 3 or len({p.shape for p in parts.values()}) != 1:
            raise ValueError(f"{source}: {name.replace('qkv', 'W_query/W_key/W_value')} are "
                             f"not three tensors of one shape")
        state[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return state


def config_from_state(state: dict, source) -> dict:
    """The config of a state dict in this model's names, from its shapes; the heads (which shapes
    cannot tell) are those of the preset of that width."""
    try:
        emb = state["tok_emb.weight"]
        (vocab_size, width), context_length = emb.shape, state["pos_emb.weight"].shape[0]
    except (KeyError, AttributeError, ValueError, IndexError):
        raise ValueError(f"{source}: no token and position embeddings of a GPT model") from None
    name = next((n for n in MODEL_NAMES if model_config(n)["emb_dim"] == width), None)
    if name is None:
        raise ValueError(f"{source}: embedding width {width} is none of {', '.join(MODEL_NAMES)}")
    head = state.get("out_head.weight", emb)
    return dict(model_config(name), name=name, vocab_size=vocab_size, context_length=context_length,
                n_layers=len({k.split(".")[1] for k in state if k.startswith("trf_blocks.")}),
                qkv_bias="trf_blocks.0.att.qkv.bias" in state,
                tie_head=head is emb or (isinstance(head, torch.Tensor) and torch.equal(head, emb)))


# ---- this project's own checkpoints ---------------------------------------------------------
def atomic_save(obj, path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it: the
    file is the old one or the complete new one, and it is streamed (never a copy in memory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.exists():  # (unlink under a missing folder would raise ENOTDIR, not ENOENT)
            tmp.unlink()
        if isinstance(e, OSError):  # name the file asked for, not the temporary one
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def save_model(model: GPTModel, cfg: dict, path) -> None:
    """Write the weights and the config they need to `path` atomically (temp file + rename)."""
    config = dict(cfg)
    if not model.tied_head or "tie_head" in config:  # files without the key load tied, as before
        config["tie_head"] = model.tied_head
    atomic_save({"format": "gpt2-instruct", "config": config, "state_dict": model.state_dict()},
                path)


def read_checkpoint(path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle errors come in many classes; all mean "not our file"
        raise ValueError(f"{path}: not a PyTorch checkpoint this project can load safely "
                         f"({str(e).splitlines()[0][:200]})") from None


def load_model(path, device="cpu") -> tuple[GPTModel, dict]:
    """Load a model written by `save_model`, or the book's GPTModel state dict (its size read from
    the shapes); returns it in eval mode with its config."""
    ckpt = read_checkpoint(path)
    if (state := from_book(ckpt, path)) is not None:
        cfg = config_from_state(state, path)
    elif isinstance(ckpt, dict) and ckpt.get("format") == "gpt2-instruct":
        cfg, state = ckpt.get("config"), ckpt.get("state_dict")
    else:
        raise ValueError(f"{path}: neither a model saved by this project (no gpt2-instruct header) "
                         f"nor a state dict of the book's GPTModel")
    if not (isinstance(state, dict) and valid_config(cfg) and cfg["n_layers"] <= len(state)):
        raise ValueError(f"{path}: its config or state dict is missing or malformed")
    with torch.device("meta"):  # shapes only: a wrong config must not allocate a huge model
        check_state(GPTModel(cfg).state_dict(), state, path)
    model = GPTModel(cfg)
    load_state(model, state, path)
    return model.to(device).eval(), cfg


def valid_config(cfg) -> bool:
    """True if GPTModel can build `cfg`: positive int sizes, heads that divide the width."""
    sizes = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    return (isinstance(cfg, dict) and all(type(cfg.get(k)) is int and cfg[k] > 0 for k in sizes)
            and cfg["emb_dim"] % cfg["n_heads"] == 0 and type(cfg.get("qkv_bias")) is bool
            and type(cfg.get("drop_rate")) in (int, float) and 0 <= cfg["drop_rate"] < 1
            and type(cfg.get("tie_head", True)) is bool)


def load_state(model: GPTModel, state: dict, source, untie: bool = False) -> None:
    """Load a state dict in this model's names. A head unlike the embedding would be lost on a
    tied model: `untie` gives the head its own weight first (before any optimizer sees it)."""
    check_state(model.state_dict(), state, source)
    if model.tied_head and not torch.equal(state["out_head.weight"], state["tok_emb.weight"]):
        if not untie:
            raise ValueError(f"{source}: its output head differs from its token embedding, but "
                             f"this model ties the two (train.py: resume with the run's --weights)")
        model.out_head.weight = nn.Parameter(torch.empty_like(model.tok_emb.weight))
        model.cfg["tie_head"] = False
    model.load_state_dict(state)


def check_state(expected: dict, state: dict, source) -> None:
    """A one-line ValueError naming the first missing, mismatched or unexpected tensor."""
    for name, tensor in expected.items():
        if not isinstance(state.get(name), torch.Tensor):
            raise ValueError(f"{source}: missing tensor {name!r}")
        if state[name].shape != tensor.shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model wants {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected), key=str)  # keys of a foreign file may not be str
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r}")


def load_weights(model: GPTModel, path) -> GPTModel:
    """`--weights PATH`: a Hugging Face .safetensors file, a .pt written by this project, or the
    book's GPTModel state dict (its own head unties `model`'s; no qkv bias is a zero one)."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save's format is a zip archive
    if not is_zip:
        return load_gpt2(model, path)
    ckpt = read_checkpoint(path)
    if (state := from_book(ckpt, path)) is not None:
        got, cfg = config_from_state(state, path), model.cfg
        if any(got[k] != cfg[k] for k in ("vocab_size", "context_length", "emb_dim", "n_layers")):
            raise ValueError(f"{path}: a {got['name']}-sized model ({got['n_layers']} layers, "
                             f"width {got['emb_dim']}, context {got['context_length']}), not the "
                             f"one built here ({cfg['n_layers']}, {cfg['emb_dim']}, "
                             f"{cfg['context_length']}); train.py: pass --model {got['name']}")
        for i in range(cfg["n_layers"] if cfg["qkv_bias"] else 0):
            state.setdefault(f"trf_blocks.{i}.att.qkv.bias", torch.zeros(3 * cfg["emb_dim"]))
    elif isinstance(ckpt, dict):
        state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds no state dict")
    load_state(model, state, path, untie=True)
    return model
