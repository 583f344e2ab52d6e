"""Model interchange: the book's checkpoints load with the book's logits; exports to Hugging Face,
the book's format and safetensors load back bit for bit. The book's model is the project's rewrite
in benchmarks/book_model.py, with the book's FeedForward nesting (ff.layers) put back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from extras import export
import gpt
from data import cli_main, get_tokenizer
from extras import book_format
from extras.book_format import load_any_model as load_model
from extras.book_format import load_any_weights as load_weights
from gpt import GPTModel, model_config, read_safetensors, save_model
from safetensors_io import hf_gpt2_tensors, safetensors_bytes
from test_gpt import reference_gpt2_logits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from book_model import BookGPTModel  # noqa: E402

# width 128 is the `tiny` preset's, so the heads (4) can be inferred; the rest is kept small
BOOK = {"vocab_size": 97, "context_length": 16, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
IDX = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 7]])


class BookFeedForward(nn.Module):
    """The book's FeedForward keeps its Linear-GELU-Linear in `self.layers`: ff.layers.0.weight."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


def book_gpt(cfg: dict) -> BookGPTModel:
    """The book's GPTModel, state dict names and all."""
    model = BookGPTModel(cfg).eval()
    for block in model.trf_blocks:
        block.ff = BookFeedForward(block.ff)
    return model


def book_model(cfg: dict = BOOK, seed: int = 0) -> BookGPTModel:
    """The book's GPTModel with random weights everywhere: LayerNorm scale/shift away from 1/0
    (so a swap would show) and an output head unlike the token embedding."""
    torch.manual_seed(seed)
    model = book_gpt(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("scale") else 0.0))
    return model


def save_book(model, path, drop_masks: bool = False) -> Path:
    state = model.state_dict()
    if drop_masks:
        state = {k: v for k, v in state.items() if not k.endswith(".att.mask")}
    torch.save(state, path)  # exactly what the book does: torch.save(model.state_dict(), ...)
    return path


def test_book_layout_is_the_books():  # guards the fixture: the book's state dict, key for key
    block = ["att.W_query.weight", "att.W_query.bias", "att.W_key.weight", "att.W_key.bias",
             "att.W_value.weight", "att.W_value.bias", "att.out_proj.weight", "att.out_proj.bias",
             "att.mask", "ff.layers.0.weight", "ff.layers.0.bias", "ff.layers.2.weight",
             "ff.layers.2.bias", "norm1.scale", "norm1.shift", "norm2.scale", "norm2.shift"]
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.scale", "final_norm.shift",
                "out_head.weight"} | {f"trf_blocks.{i}.{k}" for i in range(2) for k in block}
    assert set(book_model().state_dict()) == expected


# ---- loading the book's checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("qkv_bias,drop_masks", [(True, False), (True, True), (False, False)])
def test_book_checkpoint_gives_the_books_logits(tmp_path, qkv_bias, drop_masks):
    book = book_model(dict(BOOK, qkv_bias=qkv_bias))
    path = save_book(book, tmp_path / "gpt2-sft.pth", drop_masks)
    model, cfg = load_model(path)
    got = [cfg[k] for k in ("emb_dim", "n_heads", "n_layers", "context_length", "vocab_size",
                            "qkv_bias", "tie_head")]
    assert got == [128, 4, 2, 16, 97, qkv_bias, False]
    with torch.no_grad():
        expected = book(IDX)
        torch.testing.assert_close(model(IDX), expected, atol=1e-5, rtol=1e-5)
        # the embedding in place of the head would be far off: the head really is the book's
        tied = model.hidden(IDX) @ book.tok_emb.weight.T
    assert (tied - expected).abs().max() > 1.0


def test_chapter_5_checkpoint_with_optimizer_state_loads(tmp_path):
    book = book_model()
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": book.state_dict(),
                "optimizer_state_dict": torch.optim.AdamW(book.parameters()).state_dict()}, path)
    model, _ = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), book(IDX), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_size_is_inferred_from_the_shapes_for_each_gpt2_size(name):
    with torch.device("meta"):  # shapes only, no memory
        state = BookGPTModel(model_config(name)).state_dict()
    del state["out_head.weight"]  # (meta tensors cannot be compared; tying is tested above)
    cfg = book_format.config_from_state(book_format.from_book(state, name), name)
    assert {k: cfg[k] for k in model_config(name)} == model_config(name)


def test_train_weights_flag_unties_the_head_before_the_optimizer_sees_it(tmp_path):
    book = book_model(dict(BOOK, qkv_bias=False))  # no qkv bias: the model's becomes zeros
    path = save_book(book, tmp_path / "book.pth")
    model = GPTModel(BOOK).eval()
    assert model.tied_head
    load_weights(model, path)
    assert not model.tied_head and model.cfg["tie_head"] is False
    assert any(p is model.out_head.weight for p in model.parameters())  # so AdamW trains it
    assert torch.equal(model.trf_blocks[0].att.qkv.bias, torch.zeros(3 * 128))
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), book(IDX), atol=1e-5, rtol=1e-5)


def test_weights_of_another_size_name_the_size_to_use(tmp_path):
    path = save_book(book_model(), tmp_path / "book.pth")
    with pytest.raises(ValueError, match=r"tiny-sized model \(2 layers, width 128, context 16\), "
                       r"not the one built here \(2, 16, 32\); train.py: pass --model tiny"):
        load_weights(GPTModel(SMALL), path)


def test_untied_model_saves_and_loads_untied_and_old_files_load_tied(tmp_path):
    model, cfg = load_model(save_book(book_model(), tmp_path / "book.pth"))
    save_model(model, cfg, tmp_path / "model.pt")
    again, again_cfg = load_model(tmp_path / "model.pt")
    assert not again.tied_head and again_cfg["tie_head"] is False
    assert torch.equal(again.out_head.weight, model.out_head.weight)
    old = GPTModel(SMALL)  # a model.pt from before the switch: its config has no tie_head
    torch.save({"format": "gpt2-instruct", "config": SMALL, "state_dict": old.state_dict()},
               tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[0].tied_head


def test_a_tied_model_refuses_a_separate_head_unless_asked_to_untie():
    model, other = GPTModel(SMALL), GPTModel(dict(SMALL, tie_head=False))
    with pytest.raises(ValueError, match="output head differs from its token embedding"):
        gpt.load_state(model, other.state_dict(), "ckpt")
    assert model.tied_head  # nothing changed


# ---- exporting to the book's format ---------------------------------------------------------
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_book_to_project_to_book_is_bit_for_bit(tmp_path, qkv_bias):
    original = book_model(dict(BOOK, qkv_bias=qkv_bias)).state_dict()
    torch.save(original, tmp_path / "in.pth")
    model, cfg = load_model(tmp_path / "in.pth")
    export.export_book(model, tmp_path / "out.pth")
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    book_gpt(book_format.book_config(cfg)).load_state_dict(written)  # strict: the book's GPTModel takes it as it is


def test_project_model_exports_to_the_books_model_with_the_same_logits(tmp_path):
    torch.manual_seed(1)
    model = GPTModel(SMALL).eval()  # tied: the book gets two equal copies
    export.export_book(model, tmp_path / "book.pth")
    book = book_gpt(book_format.book_config(model.cfg))
    book.load_state_dict(torch.load(tmp_path / "book.pth", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(book(IDX), model(IDX), atol=1e-5, rtol=1e-5)


# ---- exporting to Hugging Face --------------------------------------------------------------
def test_gpt2_small_export_has_gpt2s_published_layout():
    # GPT-2 small as published (openai-community/gpt2): per block these 12 tensors, Conv1D
    # weights stored (in, out); 2 + 12 * 12 + 2 = 148 tensors, 124,439,808 numbers. The names carry
    # the "transformer." prefix that save_pretrained writes; the published file's causal-mask
    # buffers (h.N.attn.bias) are not weights and are left out, as save_pretrained leaves them.
    block = {"ln_1.weight": (768,), "ln_1.bias": (768,), "attn.c_attn.weight": (768, 2304),
             "attn.c_attn.bias": (2304,), "attn.c_proj.weight": (768, 768),
             "attn.c_proj.bias": (768,),
             "ln_2.weight": (768,), "ln_2.bias": (768,), "mlp.c_fc.weight": (768, 3072),
             "mlp.c_fc.bias": (3072,), "mlp.c_proj.weight": (3072, 768), "mlp.c_proj.bias": (768,)}
    published = {"transformer.wte.weight": (50257, 768), "transformer.wpe.weight": (1024, 768),
                 "transformer.ln_f.weight": (768,), "transformer.ln_f.bias": (768,)}
    published |= {f"transformer.h.{i}.{k}": v for i in range(12) for k, v in block.items()}
    with torch.device("meta"):
        tensors = export.hf_tensors(GPTModel(model_config("gpt2-small")))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == published
    # per block 1,536 + 1,771,776 + 590,592 + 1,536 + 2,362,368 + 2,360,064 = 7,087,872;
    # wte 38,597,376 + wpe 786,432 + 12 * 7,087,872 + ln_f 1,536 = 124,439,808
    assert len(tensors) == 148 and sum(t.numel() for t in tensors.values()) == 124_439_808


def test_hf_export_of_a_tied_model_computes_the_models_logits(tmp_path):
    torch.manual_seed(2)
    model = GPTModel(SMALL).eval()
    (tmp_path / "hf").mkdir()  # an empty folder is as good as a new one
    names = export.export_hf(model, tmp_path / "hf")
    assert names == ["config.json", "model.safetensors"]  # vocabulary 97: no GPT-2 tokenizer
    tensors = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert list(tensors) == export.gpt2_names(2)  # no lm_head: transformers ties it
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    with torch.no_grad():  # the oracle of test_gpt, written directly on GPT-2's tensors
        torch.testing.assert_close(reference_gpt2_logits(bare, IDX, 4), model(IDX),
                                   atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"],
            config["vocab_size"], config["tie_word_embeddings"]) == (16, 2, 4, 32, 97, True)


def test_hf_export_of_a_book_checkpoint_maps_each_tensor_and_keeps_the_head(tmp_path):
    book = book_model(dict(BOOK, vocab_size=50257))
    model, _ = load_model(save_book(book, tmp_path / "book.pth"))
    names = export.export_hf(model, tmp_path / "hf")
    assert names == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
                     "vocab.json"]
    t = read_safetensors(tmp_path / "hf" / "model.safetensors")
    b = book.state_dict()
    assert torch.equal(t["lm_head.weight"], b["out_head.weight"])  # the book's head, not wte
    assert torch.equal(t["transformer.wte.weight"], b["tok_emb.weight"])
    assert torch.equal(t["transformer.h.1.ln_2.bias"], b["trf_blocks.1.norm2.shift"])
    qkv = torch.cat([b[f"trf_blocks.1.att.W_{p}.weight"] for p in ("query", "key", "value")])
    assert torch.equal(t["transformer.h.1.attn.c_attn.weight"], qkv.T)  # Conv1D: (in, out)
    assert torch.equal(t["transformer.h.1.mlp.c_proj.weight"],
                       b["trf_blocks.1.ff.layers.2.weight"].T)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == 50256
    assert (tmp_path / "hf" / "merges.txt").read_text().startswith("#version: 0.2\nĠ t\n")
    assert json.loads((tmp_path / "hf" / "vocab.json").read_text())["<|endoftext|>"] == 50256


@pytest.mark.parametrize("prefix,head", [("", False), ("transformer.", True)])
def test_hf_to_project_to_hf_is_bit_for_bit(tmp_path, prefix, head):
    original = hf_gpt2_tensors(SMALL, prefix=prefix, mask_buffers=True, seed=3)
    if head:  # an untied GPT-2 file, as this project's export of a book model writes
        original["lm_head.weight"] = torch.randn(97, 16)
    (tmp_path / "in.safetensors").write_bytes(safetensors_bytes(original, {"format": "pt"}))
    model = load_weights(GPTModel(SMALL), tmp_path / "in.safetensors")
    export.export_safetensors(model, tmp_path / "out.safetensors")
    written = read_safetensors(tmp_path / "out.safetensors")
    weights = {k.removeprefix("transformer."): v for k, v in original.items()
               if not k.endswith(".attn.bias")}  # causal-mask buffers, not weights
    assert {k.removeprefix("transformer."): v.shape for k, v in written.items()} == \
        {k: v.shape for k, v in weights.items()}
    assert all(torch.equal(written[k if k == "lm_head.weight" else "transformer." + k], v)
               for k, v in weights.items())
    again = load_weights(GPTModel(SMALL).eval(), tmp_path / "out.safetensors")  # train.py --weights
    assert again.tied_head == (not head)
    with torch.no_grad():
        torch.testing.assert_close(again(IDX), model.eval()(IDX))


def test_safetensors_writer_bytes_by_hand(tmp_path):
    export.write_safetensors(tmp_path / "x.safetensors", {"a": torch.tensor([1.0, -2.0])})
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'  # 54 bytes, padded to 56
    # 1.0 is 0x3f800000 and -2.0 is 0xc0000000 in float32, stored little-endian
    assert (tmp_path / "x.safetensors").read_bytes() == (
        (56).to_bytes(8, "little") + header + b"  " + bytes.fromhex("0000803f000000c0"))


def test_written_safetensors_match_the_test_writers_bytes(tmp_path):
    # two writers, one format: the same tensors give the same file byte for byte
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),  # non-contiguous
               "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "c": torch.zeros(0, 4)}
    export.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    expected = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"})

    def split(raw: bytes):  # (header as JSON, where the data starts, the data)
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8:8 + n]), (8 + n) % 8, raw[8 + n:]

    # same header (JSON spacing aside), tensor bytes 8-byte aligned, same data
    assert split((tmp_path / "x.safetensors").read_bytes()) == split(expected)
    assert torch.equal(read_safetensors(tmp_path / "x.safetensors")["a"], tensors["a"])


def test_hf_export_loads_in_transformers_without_warnings(tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    for tied in (True, False):
        torch.manual_seed(4)
        model = GPTModel(dict(SMALL, vocab_size=50257, tie_head=tied)).eval()
        out = tmp_path / f"hf-{tied}"
        export.export_hf(model, out)
        hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                            "error_msgs")), info
        err = capfd.readouterr().err  # transformers 5 prints a LOAD REPORT; 4 "Some weights ..."
        assert not any(w in err for w in ("LOAD REPORT", "MISSING", "UNEXPECTED", "Some weights",
                                          "newly initialized", "not used")), err
        ids = torch.tensor([get_tokenizer().encode("Hello, world! How are you?")])
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        text = "Rewrite the sentence: ünïcode  spaces\n<|endoftext|>"
        assert tokenizer(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")


# ---- the command line and bad input ---------------------------------------------------------
def run_main(capsys, *argv) -> tuple[int, str]:
    """export.main through cli_main, as `python export.py` runs it: (exit code, stderr)."""
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: (export.main([str(a) for a in argv]), sys.exit(0)))
    return stop.value.code, capsys.readouterr().err


def test_cli_exports_a_book_checkpoint_to_hugging_face(tmp_path):
    path = save_book(book_model(), tmp_path / "book.pth")
    result = subprocess.run([sys.executable, str(ROOT / "extras" / "export.py"), str(path), "--to", "hf",
                             str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "head separate from the embedding" in result.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def bad_inputs(tmp_path) -> dict:
    torch.save({"encoder.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    good = save_book(book_model(), tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    torch.save({"final_norm.scale": Evil()}, tmp_path / "evil.pth")
    return {"other": ("other.pth", "nor a state dict of the book's GPTModel"),
            "truncated": ("cut.pth", "not a PyTorch checkpoint"),
            "code": ("evil.pth", "can load safely")}


@pytest.mark.parametrize("case", ["other", "truncated", "code"])
def test_bad_model_files_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, case):
    name, message = bad_inputs(tmp_path)[case]
    before = set(tmp_path.iterdir())
    code, err = run_main(capsys, tmp_path / name, "--to", "hf", tmp_path / "hf")
    assert code == 2 and err.count("\n") == 1 and message in err and name in err, err
    assert "unpickled!" not in capsys.readouterr().out + err
    assert set(tmp_path.iterdir()) == before  # no folder, no temporary left behind


def test_export_into_a_non_empty_or_unwritable_folder_is_refused(tmp_path, capsys):
    path = save_book(book_model(), tmp_path / "book.pth")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, err = run_main(capsys, path, "--to", "hf", tmp_path / "full")
    assert code == 2 and "folder is not empty" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "a-file").write_text("")  # a folder that cannot be made: its parent is a file
    code, err = run_main(capsys, path, "--to", "book", tmp_path / "a-file" / "out.pth")
    assert code == 2 and err.splitlines()[-1] == (f"error: cannot write --to {tmp_path}/a-file/"
                                                  f"out.pth: a file stands where its folder should be")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        (tmp_path / "ro").mkdir(mode=0o500)
        code, err = run_main(capsys, path, "--to", "safetensors", tmp_path / "ro" / "x.safetensors")
        assert code == 2 and "cannot write" in err and not any((tmp_path / "ro").iterdir())


def test_a_failure_half_way_leaves_no_folder_and_no_temporary(tmp_path, monkeypatch):
    def fail(folder, context_length):  # after config.json and model.safetensors are written
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_tokenizer", fail)
    model = GPTModel(dict(SMALL, vocab_size=50257))
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'hf'}: No space left"):
        export.export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_generate_accepts_a_book_checkpoint(tmp_path):
    book = book_model(dict(BOOK, vocab_size=50257, context_length=64))
    path = save_book(book, tmp_path / "b.pth")
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model-path", str(path),
                             "--prompt", "Name a colour.", "--max-new-tokens", "3"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.pt"), ("unwritable", "cannot write --to"), ("dtype", "invalid choice")])
def test_gguf_export_bad_input_is_one_line_exit_2_before_any_work(tmp_path, case, message):
    pytest.importorskip("gguf")
    model = tmp_path / ("missing.pt" if case == "missing" else "m.pt")
    if case != "missing":
        save_model(GPTModel(dict(SMALL, vocab_size=50257)), dict(SMALL, vocab_size=50257), model)
    dest = tmp_path / ("no-folder/m.gguf" if case == "unwritable" else "m.gguf")
    extra = ["--dtype", "q4_0"] if case == "dtype" else []
    result = subprocess.run([sys.executable, str(ROOT / "extras" / "export.py"), str(model),
                             "--to", "gguf", str(dest), *extra], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1]
    assert not dest.exists() and "Traceback" not in result.stderr


def test_gguf_export_writes_the_model_and_its_modelfile(tmp_path):
    pytest.importorskip("gguf")
    cfg = dict(SMALL, vocab_size=50257, prompt_style="phi3")
    save_model(GPTModel(cfg), cfg, tmp_path / "m.pt")
    result = subprocess.run([sys.executable, str(ROOT / "extras" / "export.py"),
                             str(tmp_path / "m.pt"), "--to", "gguf", str(tmp_path / "m.gguf"),
                             "--dtype", "f32"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "m.pt"]
    assert "<|user|>" in (tmp_path / "m.Modelfile").read_text()  # the style it was trained with

