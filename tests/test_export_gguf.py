"""extras/export_gguf.py: read back with gguf's GGUFReader, the GGUF holds the model's tensors (f32
exactly, f16 to fp16 rounding, q8_0 within its block error), llama.cpp's gpt2 metadata and GPT-2's
tokenizer, byte for byte what llama.cpp's converter writes from the Hugging Face export (pinned);
the Modelfile renders the training prompt. With llama-cpp-python, a slow test runs the GGUF."""
import functools
import hashlib
import math
import re
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")
import numpy as np  # noqa: E402 (gguf's dependency)
import regex  # noqa: E402 (tiktoken's dependency)

from data import (ENDOFTEXT, GPT2_PATTERN, PROMPT_STYLES, bytes_to_unicode,  # noqa: E402
                  format_input, get_tokenizer, load_data, response_header)
from generate import generate  # noqa: E402
from extras.book_format import book_state_dict, load_any_model  # noqa: E402
from gpt import GPTModel, load_model, model_config  # noqa: E402
from script_loader import REPO, load_script  # noqa: E402

export_gguf = load_script("extras/export_gguf.py")
Q8_0 = gguf.GGMLQuantizationType.Q8_0

# ---- pinned: what llama.cpp's converter wrote for weyl_model() -------------------------------
# Made with llama.cpp 0c1e57098's converter and gguf-py 0.19.0, as vendored in the sdist of
# llama-cpp-python 0.3.36 (pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36;
# llama.cpp/ below is its vendor/llama.cpp), run with torch 2.13 and transformers 5.25:
#   python -c "import sys; sys.path[:0] = ['.', 'tests']; from extras import export; \
#       import test_export_gguf as t; export.export_hf(t.weyl_model(), '/tmp/pin')"
#   for d in f32 f16 q8_0; do python llama.cpp/convert_hf_to_gguf.py /tmp/pin --outtype $d \
#       --outfile /tmp/pin-$d.gguf; done
#   python -c "import sys; sys.path[:0] = ['.', 'extras', 'tests']; import test_export_gguf as t; \
#       [print(d, t.summary(f'/tmp/pin-{d}.gguf')) for d in ('f32', 'f16', 'q8_0')]"
# and the tensor table read from its log; check_as_converter(f"/tmp/pin-{d}.gguf", d, "Pin") passes
CONVERTER_METADATA = [  # (key, GGUF type, value): the keys in the file's order, lists as hashes
    ("general.architecture", "STRING", "gpt2"),
    ("general.type", "STRING", "model"),
    ("general.name", "STRING", "Pin"),  # the converter's folder name; ours the file's stem
    ("general.size_label", "STRING", "7.3M"),
    ("gpt2.block_count", "UINT32", 4),
    ("gpt2.context_length", "UINT32", 256),
    ("gpt2.embedding_length", "UINT32", 128),
    ("gpt2.feed_forward_length", "UINT32", 512),
    ("gpt2.attention.head_count", "UINT32", 4),
    ("gpt2.attention.layer_norm_epsilon", "FLOAT32", float(np.float32(1e-5))),
    ("general.file_type", "UINT32", "0 for f32, 1 for f16, 7 for q8_0"),
    ("general.quantization_version", "UINT32", 2),
    ("tokenizer.ggml.model", "STRING", "gpt2"),
    ("tokenizer.ggml.pre", "STRING", "gpt-2"),
    ("tokenizer.ggml.tokens", "ARRAY STRING", "50257 sha256 a02304c290fc91c2"),
    ("tokenizer.ggml.token_type", "ARRAY INT32", "50257 sha256 40d716af07e581ee"),
    ("tokenizer.ggml.merges", "ARRAY STRING", "50000 sha256 b380727d65b274f3"),
    ("tokenizer.ggml.bos_token_id", "UINT32", 50256),
    ("tokenizer.ggml.eos_token_id", "UINT32", 50256),
]
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
CONVERTER_TENSORS = {  # name (N: each of the 4 blocks) -> shape in GGUF's order, innermost first
    "token_embd.weight": (128, 50257), "position_embd.weight": (128, 256),
    "blk.N.attn_norm.weight": (128,), "blk.N.attn_norm.bias": (128,),
    "blk.N.attn_qkv.weight": (128, 384), "blk.N.attn_qkv.bias": (384,),
    "blk.N.attn_output.weight": (128, 128), "blk.N.attn_output.bias": (128,),
    "blk.N.ffn_norm.weight": (128,), "blk.N.ffn_norm.bias": (128,),
    "blk.N.ffn_up.weight": (128, 512), "blk.N.ffn_up.bias": (512,),
    "blk.N.ffn_down.weight": (512, 128), "blk.N.ffn_down.bias": (128,),
    "output_norm.weight": (128,), "output_norm.bias": (128,),
}
# the tensors the converter gave the --outtype; all others (1-D, position_embd) it kept F32
CONVERTER_CONVERTED = {"token_embd.weight", "blk.N.attn_qkv.weight", "blk.N.attn_output.weight",
                       "blk.N.ffn_up.weight", "blk.N.ffn_down.weight"}
CONVERTER_DATA_SHA256 = {  # over all tensors sorted by name: name, type, shape, data bytes
    "f32": "6243b4ff87652761765ffdb6217980e9eaee2c78322aededf1150963e934c3d7",
    "f16": "b32f69a574f283e9f20b32bc9886e64aa53dd4c9ea972d72e28a1a8d437455d4",
    "q8_0": "3d47c9c2e9e2af13e22d05b8bbf66f45d2d8a01456459722208cc001640f219f",
}


def weyl_model(cfg: dict | None = None) -> GPTModel:
    """A model whose weights are a fixed function of their position (a Weyl sequence in integer
    arithmetic), the same on every machine and torch version, which the pinned hashes need.
    LayerNorm weights lie around 1, everything else in [-1/8, 1/8): no zero bias hides a swap."""
    model = GPTModel(cfg or model_config("tiny")).eval()
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            i = torch.arange(p.numel(), dtype=torch.int64)
            u = ((i * 2654435761 + k * 40503) % 2**32).double() / 2**32 - 0.5  # in [-0.5, 0.5)
            centre = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            p.copy_((u * 0.25 + centre).float().view_as(p))
    return model


@functools.cache  # GGUFReader takes seconds over the 100,000 tokenizer strings
def read_gguf(path) -> tuple[dict, dict]:
    """({key: (type, value)} in the file's order, {tensor name: ReaderTensor}) via GGUFReader."""
    reader = gguf.GGUFReader(path)
    fields = {key: (" ".join(t.name for t in f.types), f.contents())
              for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def summary(path) -> tuple[list, str]:
    """The metadata as CONVERTER_METADATA writes it, and the hash of CONVERTER_DATA_SHA256."""
    fields, tensors = read_gguf(path)
    metadata = [(k, t, f"{len(v)} sha256 {hashlib.sha256(repr(v).encode()).hexdigest()[:16]}"
                 if isinstance(v, list) else v) for k, (t, v) in fields.items()]
    digest = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        digest.update(f"{name} {t.tensor_type.name} {list(map(int, t.shape))}".encode())
        digest.update(np.ascontiguousarray(t.data).tobytes())
    return metadata, digest.hexdigest()


def expected_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """llama.cpp's gpt2 name -> the model's tensor, written out here apart from the module's."""
    s, n_layers = model.state_dict(), model.cfg["n_layers"]
    parts = {"attn_norm": "norm1", "attn_qkv": "att.qkv", "attn_output": "att.out_proj",
             "ffn_norm": "norm2", "ffn_up": "ff.fc", "ffn_down": "ff.proj"}
    out = {"token_embd.weight": s["tok_emb.weight"], "position_embd.weight": s["pos_emb.weight"],
           "output_norm.weight": s["final_norm.weight"], "output_norm.bias": s["final_norm.bias"]}
    for i in range(n_layers):
        for theirs, ours in parts.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = s.get(f"trf_blocks.{i}.{ours}.{kind}",
                                                        torch.zeros(3 * model.cfg["emb_dim"]))
    if not model.tied_head:
        out["output.weight"] = s["out_head.weight"]
    return out


def check_q8_0(raw: np.ndarray, x: torch.Tensor) -> None:
    """Blocks of 32 values: an fp16 scale d = max|x| / 127, then 32 int8 q = round(x / d). Read
    by hand, they equal gguf's dequantize; each value is within d/2 of x, plus 127 times the scale's
    fp16 rounding (q was rounded against the unrounded scale)."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scale
    assert np.array_equal(values, gguf.quants.dequantize(raw, Q8_0).reshape(-1, 32))
    x = x.reshape(-1, 32).numpy()
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * np.abs(d - d.astype(np.float16).astype(np.float32))
    assert (np.abs(values - x) <= bound * (1 + 1e-5)).all()
    assert not np.array_equal(values, x)  # quantised, not copied


@pytest.fixture(scope="module")
def pin_model() -> GPTModel:
    return weyl_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pin_model) -> dict:
    """weyl_model() exported once in each dtype: {dtype: path}."""
    folder = tmp_path_factory.mktemp("gguf")
    return {d: export_gguf.export_gguf(pin_model, pin_model.cfg, folder / f"Pin-{d}.gguf", d)
            for d in export_gguf.DTYPES}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_tensors_are_the_models(exported, pin_model, dtype):
    _, tensors = read_gguf(exported[dtype])
    expected = expected_tensors(pin_model)
    assert sorted(tensors) == sorted(expected)
    for name, x in expected.items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(x.shape)), name  # GGUF lists the innermost first
        if x.dim() == 1 or name == "position_embd.weight" or dtype == "f32":
            assert t.tensor_type.name == "F32" and torch.equal(torch.from_numpy(t.data.copy()), x)
        elif dtype == "f16":
            assert t.tensor_type.name == "F16"
            assert torch.equal(torch.from_numpy(t.data.copy()), x.half()), name
        else:
            assert t.tensor_type.name == "Q8_0"
            check_q8_0(np.asarray(t.data), x)


def check_as_converter(path, dtype: str, name: str) -> None:
    """The GGUF at `path` is what the converter wrote for weyl_model() (named `name` there)."""
    metadata, digest = summary(path)
    assert metadata == [(k, t, name if k == "general.name" else
                         FILE_TYPES[dtype] if k == "general.file_type" else v)
                        for k, t, v in CONVERTER_METADATA]
    _, tensors = read_gguf(path)
    converted = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    for tensor_name, t in tensors.items():
        pattern = re.sub(r"^blk\.\d+\.", "blk.N.", tensor_name)
        assert tuple(map(int, t.shape)) == CONVERTER_TENSORS[pattern], tensor_name
        assert t.tensor_type.name == (converted if pattern in CONVERTER_CONVERTED else "F32")
    assert len(tensors) == 4 + 12 * 4
    assert digest == CONVERTER_DATA_SHA256[dtype]


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_matches_llama_cpps_converter(exported, dtype):
    check_as_converter(exported[dtype], dtype, name=f"Pin-{dtype}")


def bpe_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """GPT-2's BPE from a GGUF's tokens and merges alone: split the text by GPT-2's pattern, spell
    each piece's UTF-8 bytes in GPT-2's printable characters, then merge the best-ranked adjacent
    pair until no pair has a rank."""
    ids, char = {t: i for i, t in enumerate(tokens)}, bytes_to_unicode()
    rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    out = []
    for piece in regex.findall(GPT2_PATTERN, text):
        word = [char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = enumerate(zip(word, word[1:]))
            best, i = min((rank.get(pair, math.inf), i) for i, pair in pairs)
            if best == math.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [ids[w] for w in word]
    return out


def test_tokenizer_is_gpt2s(exported):
    fields, _ = read_gguf(exported["f16"])
    tokens, merges = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.merges"][1]
    text = ("Hello, world! It's 2024: naïve café ☕ costs $3.50 —\n\n  indented\tand 'quoted'\n"
            + format_input({"instruction": "Rewrite:", "input": "I can't  go."}, "phi3"))
    assert bpe_encode(text, tokens, merges) == get_tokenizer().encode(text)
    types = fields["tokenizer.ggml.token_type"][1]
    assert tokens[50256] == ENDOFTEXT and types[50256] == gguf.TokenType.CONTROL
    assert set(types[:50256]) == {gguf.TokenType.NORMAL}


def test_the_books_checkpoint_exports_with_its_own_head(tmp_path):
    # the book's GPTModel: no qkv bias, an output head of its own
    model = weyl_model(dict(model_config("tiny"), n_layers=2, qkv_bias=False, tie_head=False))
    torch.save(book_state_dict(model), tmp_path / "book.pth")  # the book's torch.save
    loaded, cfg = load_any_model(tmp_path / "book.pth")
    _, tensors = read_gguf(export_gguf.export_gguf(loaded, cfg, tmp_path / "book.gguf", "f32"))
    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected) and "output.weight" in tensors
    for name, x in expected.items():
        assert torch.equal(torch.from_numpy(tensors[name].data.copy()), x), name
    assert not tensors["blk.0.attn_qkv.bias"].data.any()  # zeros: llama.cpp requires the bias


# ---- the Modelfile, rendered as Ollama renders it ---------------------------------------------
def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, argument) as Ollama's parser reads the forms written here: comment lines, one-line
    commands, and a \"\"\"-quoted argument kept exactly, line breaks included."""
    commands, pos = [], 0
    line = re.compile(r'#[^\n]*\n|([A-Z]+) (?:"""(.*?)"""|([^\n]*))\n', re.DOTALL)
    while pos < len(text):
        m = line.match(text, pos)
        assert m, f"unparsed Modelfile text at {text[pos:pos + 40]!r}"
        if m[1]:
            commands.append((m[1], m[2] if m[2] is not None else m[3]))
        pos = m.end()
    return commands


def render(template: str, turns: list[tuple[str, str | None]]) -> str:
    """Ollama's rendering of a template without .Messages (its template/template.go): every
    earlier (prompt, response) turn whole, then the last prompt with what follows {{ .Response }}
    cut. Only {{ .Prompt }} and {{ .Response }} are understood; any other action fails."""
    parts = re.split(r"({{.*?}})", template)
    assert {p for p in parts if p.startswith("{{")} == {"{{ .Prompt }}", "{{ .Response }}"}

    def execute(prompt: str, response: str, cut: bool) -> str:
        out = ""
        for part in parts:
            out += {"{{ .Prompt }}": prompt, "{{ .Response }}": response}.get(part, part)
            if cut and part == "{{ .Response }}":
                break
        return out

    *earlier, (last, _) = turns
    return "".join(execute(p, r, False) for p, r in earlier) + execute(last, "", True)


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_modelfile_renders_the_training_prompt(tmp_path, style):
    path = export_gguf.write_modelfile(tmp_path / "model.gguf", style, 256)
    assert path == tmp_path / "model.Modelfile"
    commands = parse_modelfile(path.read_text())
    assert [c for c in commands if c[0] != "TEMPLATE"] == [
        ("FROM", "./model.gguf"), ("PARAMETER", f'stop "{ENDOFTEXT}"'),
        ("PARAMETER", "temperature 0"), ("PARAMETER", "repeat_penalty 1"),
        ("PARAMETER", "num_ctx 256")]
    template = dict(commands)["TEMPLATE"]
    data = load_data(str(REPO / "data" / "instruction-data.json"))
    with_input, without = (next(e for e in data if bool(e.get("input")) is has)
                           for has in (True, False))
    for entry in (with_input, without):
        typed = export_gguf.ollama_prompt(entry, style)
        assert render(template, [(typed, None)]) == format_input(entry, style) + \
            response_header(style)
    first, second = (export_gguf.ollama_prompt(e, style) for e in (with_input, without))
    assert render(template, [(first, "Cities."), (second, None)]) == (  # a chat's history
        format_input(with_input, style) + response_header(style) + "Cities." + ENDOFTEXT
        + format_input(without, style) + response_header(style))


def test_ollama_prompt_is_the_instruction_then_the_input():
    entry = {"instruction": "Make this noun plural.", "input": "city"}
    typed = {style: export_gguf.ollama_prompt(entry, style) for style in PROMPT_STYLES}
    assert typed == {"alpaca": "Make this noun plural.\n\n### Input:\ncity",
                     "phi3": "Make this noun plural.\ncity"}


# ---- bad input: one-line ValueError / OSError, and never a half-written file --------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    assert str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_unknown_dtype_is_a_value_error(tmp_path, pin_model):
    with pytest.raises(ValueError) as e:
        export_gguf.export_gguf(pin_model, pin_model.cfg, tmp_path / "m.gguf", "q4_0")
    assert "f32, f16, q8_0" in one_line(e) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["missing/m.gguf", "folder"])
def test_unwritable_path_is_an_os_error_naming_it(tmp_path, pin_model, where):
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError) as e:
        export_gguf.export_gguf(pin_model, pin_model.cfg, tmp_path / where, "f16")
    assert str(tmp_path / where) in one_line(e)
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary left behind


def test_a_failed_export_leaves_the_old_file(tmp_path, pin_model, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"the old file")
    real, calls = gguf.quants.quantize, []

    def full_disk_at_the_third_tensor(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", full_disk_at_the_third_tensor)
    with pytest.raises(OSError) as e:
        export_gguf.export_gguf(pin_model, pin_model.cfg, path, "q8_0")
    assert one_line(e) == f"cannot write {path}: No space left on device"
    assert path.read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind


def test_other_vocabularies_and_a_missing_gguf_package_are_refused(tmp_path, pin_model,
                                                                    monkeypatch):
    cfg = dict(model_config("tiny"), vocab_size=97, n_layers=1)
    with pytest.raises(ValueError) as e:
        export_gguf.export_gguf(GPTModel(cfg), cfg, tmp_path / "m.gguf")
    assert "50257" in one_line(e)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(OSError) as e:
        export_gguf.export_gguf(pin_model, pin_model.cfg, tmp_path / "m.gguf")
    assert one_line(e) == "GGUF export needs the gguf package (llama.cpp's): pip install gguf"


# ---- llama.cpp itself (pip install llama-cpp-python; not in CI) ------------------------------
@pytest.mark.slow
def test_llama_cpp_continues_as_generate_does(tmp_path):
    """The f32 GGUF in llama.cpp: GPT-2's tokens, logits within 0.05 of the model's (llama.cpp's
    fp16 KV cache and GELU table: ~0.015 on logits to ~18), generate()'s 60 greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, cfg = load_model(REPO / "data" / "tiny-pretrained.pt")
    path = export_gguf.export_gguf(model, cfg, tmp_path / "tiny.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=cfg["context_length"], n_threads=2, logits_all=True,
                          verbose=False)
    tokenizer = get_tokenizer()
    entry = {"instruction": "Name the capital of Peru.", "input": ""}
    for prompt in ("The capital of Peru is", format_input(entry) + response_header()):
        ids = tokenizer.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        assert torch.allclose(torch.tensor(np.array(llm.scores[:len(ids)])), logits, atol=0.05)
        ours = generate(model, [ids], 60)[0][len(ids):]  # no EOS stop: 60 tokens to compare
        theirs = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == 60:
                break
        assert theirs == ours, tokenizer.decode(theirs) + " | " + tokenizer.decode(ours)
