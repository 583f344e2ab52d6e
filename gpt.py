"""Step 3 of the pipeline: GPT-2, as the book's chapter 4 builds it, and its weight files.

`model_config(name)` and `GPTModel(cfg)` first: the book's model with the book's names (`tok_emb`,
`trf_blocks`, `final_norm`, `out_head`; query, key and value are one fused matrix, as in GPT-2's
files; the head is tied to the token embedding unless `cfg["tie_head"]` is False). Then the
weights: Hugging Face `model.safetensors` (`load_gpt2`) and this project's own files
(`save_model`, `load_model`, `load_weights`). Cached generation's KV cache and pad masks are in
generate.py; the book's .pth files in extras/book_format.py. Imports no other project file.
"""
import argparse
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
    "gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
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


# ---- the book's model -------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.n_heads, self.drop_rate = cfg["n_heads"], cfg["drop_rate"]
        self.qkv = nn.Linear(cfg["emb_dim"], 3 * cfg["emb_dim"], bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(cfg["emb_dim"], cfg["emb_dim"])

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # generation: the keys and values of the earlier tokens come first
            k, v = cache.extend(layer, k, v)
        dropout = self.drop_rate if self.training else 0.0
        if attn_mask is None:  # the book's causal mask, inside the fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # re-assemble the heads


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.fc = nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"])
        self.proj = nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's GELU


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

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tied_head(self) -> bool:
        return self.out_head.weight is self.tok_emb.weight

    def forward(self, idx, cache=None, pos=None, attn_mask=None):
        return self.out_head(self.hidden(idx, cache, pos, attn_mask))  # (B, T, vocab_size) logits

    def hidden(self, idx, cache=None, pos=None, attn_mask=None):
        """The final LayerNorm's output (B, T, emb_dim), which `out_head` turns into logits.

        Without the keywords, the book's forward pass. Cached generation (generate.py) passes a
        `cache` of the earlier tokens' keys and values (each layer's attention appends the new
        ones), the new tokens' positions `pos` and an `attn_mask` (True: may attend) that keep
        left padding out.
        """
        past = len(cache) if cache is not None else 0
        if past + idx.shape[1] > self.cfg["context_length"]:
            raise ValueError(f"sequence of {past + idx.shape[1]} tokens exceeds the context "
                             f"length {self.cfg['context_length']}")
        if past and attn_mask is None:  # the fused causal mask assumes no earlier tokens
            raise ValueError("a forward pass after cached tokens needs their attn_mask")
        if pos is None:
            pos = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, attn_mask, cache, layer)
        return self.final_norm(x)


def pick_device(name: str = "auto") -> str:
    """`--device`: "auto" is cuda, else mps, else cpu; one torch cannot use is a ValueError."""
    usable = {"cpu": True, "cuda": torch.cuda.is_available(),
              "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if usable[d])
    if not usable.get(name.split(":")[0]):
        raise ValueError(f"--device {name}: not usable here (usable: "
                         f"{', '.join(d for d in usable if usable[d])})")
    return name


DEVICE_HELP = "where to run: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def usable_device(name: str) -> str:
    """The argparse type of --device: `name`, if pick_device can use it; else refused as the
    flags are read, with the devices that are usable here."""
    try:
        pick_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None
    return name


# ---- GPT-2's weights: Hugging Face `model.safetensors` -----------------------------------------
# The format: an 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape,
# data_offsets}}, then the raw little-endian tensor bytes; offsets count from the header's end.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 * 2**20  # real GPT-2 headers are ~15 KB; refuse to allocate absurd sizes


def _header_entry(name: str, info, data_size: int) -> tuple[torch.dtype, list, int, int]:
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: header entry is not an object")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
    dtype, shape, offsets = SAFETENSORS_DTYPES[info["dtype"]], info.get("shape"), \
        info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"tensor {name!r}: data offsets {offsets!r} lie outside the "
                         f"{data_size}-byte data section (truncated file?)")
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: shape {shape} needs {math.prod(shape) * dtype.itemsize}"
                         f" bytes, offsets give {offsets[1] - offsets[0]}")
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors_header(f, path: Path) -> tuple[int, dict]:
    """Header checks on an open file: (data start, {name: (dtype, shape, begin, end)})."""
    size, head = path.stat().st_size, f.read(8)
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
        entries = {name: _header_entry(name, info, size - 8 - n) for name, info in header.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap")
    return 8 + n, entries


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, its header checked against the file first."""
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
    """A Hugging Face GPT-2 tensor's name in this model (None: not a weight, skip it)."""
    name = name.removeprefix("transformer.")  # save_pretrained's layout; the hub's has none
    if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", name):
        return None  # causal-mask buffers
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
    """Hugging Face GPT-2 tensors renamed (and transposed) into `model`'s state dict."""
    expected, state = model.state_dict(), {}
    for hf_name, tensor in tensors.items():
        if (name := hf_to_gpt_name(hf_name)) is None:
            continue
        if tensor.dim() == 2 and re.search(r"\.(qkv|out_proj|fc|proj)\.weight$", name):
            tensor = tensor.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
        if name in state:
            raise ValueError(f"tensor {hf_name!r} appears twice (with and without 'transformer.')")
        if name not in expected:
            raise ValueError(f"unexpected tensor {hf_name!r} for a {model.cfg['n_layers']}-layer model")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model wants "
                             f"{tuple(expected[name].shape)} (weights of another GPT-2 size?)")
        state[name] = tensor
    missing = [name for name in expected if name != "out_head.weight" and name not in state]
    if missing:
        raise ValueError(f"missing tensor for {missing[0]!r} in the GPT-2 checkpoint")
    state.setdefault("out_head.weight", state["tok_emb.weight"])  # tied: the file has no lm_head
    return state


def load_gpt2(model: GPTModel, path) -> GPTModel:
    """The book's `load_weights_into_gpt` for a `model.safetensors` of the matching size (an
    `lm_head.weight` unlike `wte.weight` unties the model's head)."""
    tensors = read_safetensors(path)
    try:
        state = gpt2_state_dict(tensors, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    load_state(model, state, path, untie=True)
    return model


# ---- this project's files: the weights with their config --------------------------------------
def atomic_save(obj, path) -> None:
    """torch.save streamed to a temporary file beside `path`, flushed, then renamed over it: the
    file is the old one or the complete new one, never half-written."""
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
    """The weights and the config that rebuilds their model, written atomically."""
    config = dict(cfg)
    if not model.tied_head or "tie_head" in config:  # files without the key load tied
        config["tie_head"] = model.tied_head
    atomic_save({"format": "gpt2-instruct", "config": config, "state_dict": model.state_dict()},
                path)


def read_checkpoint(path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects.
    Any other file (empty, text, safetensors, truncated, foreign) is a one-line ValueError."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.startswith((b"PK", b"\x80")):  # torch.save's zip archive, or its older pickle
        raise ValueError(f"{path}: not a PyTorch checkpoint: " + (
            "the file is empty (0 bytes)" if not head else "a safetensors file" if
            head[8:10] == b'{"' else "a text file" if head.isascii() else "unknown bytes"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many classes; all mean "not our file"
        first = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a PyTorch checkpoint this project can load safely: "
                         + ("it holds objects other than tensors" if "Weights only" in first
                            else f"truncated or damaged ({first})")) from None


def load_model(path, device="cpu") -> tuple[GPTModel, dict]:
    """A model written by `save_model`, in eval mode, with its config."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == "gpt2-instruct"):
        raise ValueError(f"{path}: not a model saved by this project (no gpt2-instruct header; "
                         f"the book's .pth: `python extras/export.py FILE --to model OUT.pt`)")
    cfg, state = ckpt.get("config"), ckpt.get("state_dict")
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


def load_weights(model: GPTModel, path) -> GPTModel:
    """Pretrained weights into `model`: a Hugging Face .safetensors file, or a .pt written by this
    project (a head of its own unties `model`'s); the book's .pth: extras/book_format.py."""
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save's format is a zip archive
    if not is_zip:
        return load_gpt2(model, path)
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds no state dict")
    load_state(model, state, path, untie=True)
    return model
