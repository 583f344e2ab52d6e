"""Issue 9, reliability: a damaged weight, checkpoint or data file must load or raise one ValueError
naming the file, never run code from a pickle nor allocate what a corrupted header asks for. Two fuzz
tests damage files at random; they are seeded and bounded by a case count and an alarm. Offline and
fast. (Failed or interrupted work is in test_reliability.py.)
"""
import contextlib
import json
import pickle
import random
import re
import signal
import struct
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import gpt
import train
from training import checkpoint
from training import files
from data import InstructionDataset, get_tokenizer, load_data, write_json
from gpt import GPTModel, load_gpt2, load_model, load_weights, model_config, save_model
from reliability_helpers import ENTRY, SMALL
from safetensors_io import hf_gpt2_tensors, safetensors_bytes


@contextlib.contextmanager
def alarm(seconds: int):
    """Turn a hang into a test failure."""
    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- weights: missing, pickles, malformed checkpoints --------------------------------------------
def test_missing_weights_file_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(GPTModel(SMALL), tmp_path / "nope.safetensors")


class Evil:
    """Unpickling this creates a file: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_files(tmp_path) -> dict[str, Path]:
    marker = tmp_path / "code-ran"
    payload = {"format": "gpt2-instruct", "config": SMALL, "state_dict": {"x": Evil(marker)}}
    files = {"zip": tmp_path / "evil.pt", "legacy": tmp_path / "legacy.pt",
             "plain": tmp_path / "plain.pkl"}
    torch.save(payload, files["zip"])
    torch.save(payload, files["legacy"], _use_new_zipfile_serialization=False)
    files["plain"].write_bytes(pickle.dumps(payload, protocol=2))
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
def test_pickles_are_refused_everywhere_and_never_run(tmp_path, kind):
    path, model = pickle_files(tmp_path)[kind], GPTModel(SMALL)
    optimizer = torch.optim.AdamW(model.parameters())
    loaders = [lambda: load_weights(model, path), lambda: load_model(path),
               lambda: checkpoint.load_checkpoint(path, model, optimizer, dict(SMALL, name="small"))]
    if kind != "zip":  # where a .safetensors file is expected
        loaders.append(lambda: load_gpt2(GPTModel(SMALL), path))
    for load in loaders:
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load()
    assert not (tmp_path / "code-ran").exists()


def test_torch_file_passed_as_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(GPTModel(SMALL), SMALL, path)
    with pytest.raises(ValueError, match="does not fit|header is not"):
        load_gpt2(GPTModel(SMALL), path)


def saved_model(tmp_path, **changes) -> Path:
    """A model.pt as save_model writes it, with fields of the saved dict replaced."""
    ckpt = {"format": "gpt2-instruct", "config": SMALL, "state_dict": GPTModel(SMALL).state_dict()}
    path = tmp_path / "model.pt"
    torch.save({k: v for k, v in {**ckpt, **changes}.items() if v is not None}, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"config": None}, "config or state dict is missing"),
    ({"config": [1, 2]}, "config or state dict is missing"),
    ({"config": {"vocab_size": 97}}, "config or state dict is missing"),
    ({"config": dict(SMALL, emb_dim="16")}, "config or state dict is missing"),
    ({"config": dict(SMALL, n_heads=5)}, "config or state dict is missing"),
    ({"config": dict(SMALL, n_layers=10**4)}, "config or state dict is missing"),
    ({"config": dict(SMALL, drop_rate=2.0)}, "config or state dict is missing"),
    ({"config": dict(SMALL, vocab_size=10**12)}, r"'tok_emb.weight' has shape \(97, 16\)"),
    ({"config": dict(SMALL, n_layers=3)}, "missing tensor 'trf_blocks.2"),
    ({"state_dict": None}, "config or state dict is missing"),
    ({"state_dict": [1]}, "config or state dict is missing"),
    ({"state_dict": {1: torch.zeros(1), **GPTModel(SMALL).state_dict()}}, "unexpected tensor 1"),
])
def test_malformed_model_file_is_one_value_error(tmp_path, changes, message):
    """A huge config is caught by comparing shapes on the meta device, before any allocation."""
    path = saved_model(tmp_path, **changes)
    with alarm(20), pytest.raises(ValueError, match=message) as e:
        load_model(path)
    assert str(e.value).startswith(str(path))


def damaged_checkpoint(tmp_path, edit) -> Path:
    model = GPTModel(SMALL)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), asdict(train.RunState()),
                          {}, dict(SMALL, name="small"))
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit", [
    lambda c: c.pop("torch_rng"),
    lambda c: c.update(config=[1]),
    lambda c: c.update(state=dict(c["state"], unknown_field=1)),
    lambda c: c.update(model={}),
    lambda c: c.update(torch_rng=torch.zeros(3)),
], ids=["no-rng", "config-list", "unknown-state-field", "no-weights", "bad-rng"])
def test_damaged_training_checkpoint_is_one_value_error(tmp_path, edit):
    path = damaged_checkpoint(tmp_path, edit)
    model = GPTModel(SMALL)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        checkpoint.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()),
                                   dict(SMALL, name="small"), train.RunState)


def test_resume_from_another_preset_names_both(tmp_path):
    model = GPTModel(SMALL)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, model, opt, asdict(train.RunState()), {},
                          dict(model_config("gpt2-medium"), name="gpt2-medium"))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"another model.*gpt2-medium.*tiny"):
        checkpoint.load_checkpoint(path, model, opt, dict(model_config("tiny"), name="tiny"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing loaded


def test_truncated_cached_gpt2_file_is_never_used_but_fetched_again(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "gpt2" / "model.safetensors"
    dest.parent.mkdir()
    good = safetensors_bytes(hf_gpt2_tensors(SMALL))
    dest.write_bytes(good[:-1000])
    fetched = []

    def fake_download(url, path, **kw):  # stands in for the network; records what was asked
        assert not path.exists()  # the damaged file is gone before the new download starts
        fetched.append(url)
        path.write_bytes(good)
        return path
    monkeypatch.setattr(files, "download", fake_download)
    path = files.download_gpt2("gpt2-small", cache_dir=tmp_path)
    assert fetched == ["https://huggingface.co/openai-community/gpt2/resolve/main/"
                       "model.safetensors"]
    assert path.read_bytes() == good
    assert "downloading it again" in capsys.readouterr().err
    load_weights(GPTModel(SMALL), path)


# ---- fuzz: corrupted safetensors files -----------------------------------------------------------
def split_file(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(header, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def random_value(rng: random.Random, like=None):
    """Something a damaged header might hold where a dtype, shape or offset list should be."""
    pool = [None, True, 0, -1, 2**63, 2**64 + 5, 1.5, "", "F32", "I64", "BOOL", "f32", [], [0],
            [-8, 0], [1, 0], [0, 2**40], [0.0, 4.0], ["16"], [True, 2], [2**62, 2**62],
            [rng.randrange(0, 300) for _ in range(rng.randrange(0, 4))], {"a": 1}]
    if isinstance(like, list) and like:
        shifted = list(like)
        shifted[rng.randrange(len(like))] += rng.choice([-8, -4, -1, 1, 4, 8])
        pool += [shifted, like[::-1], like + [1], [1] + like, like[:-1]]
    return rng.choice(pool)


def mutate_header(rng: random.Random, header):
    names_ = [k for k, v in header.items() if isinstance(v, dict) and k != "__metadata__"] \
        if isinstance(header, dict) else []
    if not names_:
        return header
    name, key = rng.choice(names_), rng.choice(["dtype", "shape", "data_offsets"])
    kind = rng.randrange(9)
    if kind < 4:  # one field of one tensor
        header[name][key] = random_value(rng, header[name].get(key))
    elif kind == 4:
        header[name].pop(key, None)
    elif kind == 5:  # a second name for the same bytes, or a foreign name
        alias = rng.choice(["transformer." + name, "h.9.ln_1.weight", "score.weight", name + "x"])
        header[alias] = dict(header[name])
    elif kind == 6:
        header[name]["data_offsets"] = header[rng.choice(names_)].get("data_offsets")  # overlap
    elif kind == 7:
        header[name] = random_value(rng)
    else:
        return rng.choice([[1, 2], "header", 7, None, {"__metadata__": random_value(rng)}])
    return header


def corrupt_safetensors(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:  # truncated anywhere
        return raw[:rng.randrange(len(raw))]
    if kind == 1:  # bit flips anywhere
        out = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    n = struct.unpack("<Q", raw[:8])[0]
    if kind == 2:  # bit flips inside the JSON header
        out = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            out[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 3:  # a wrong header length
        length = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(raw) - 8, len(raw), 2**63,
                             2**64 - 1, gpt.MAX_HEADER_BYTES + 1, rng.randrange(2**64)])
        return struct.pack("<Q", length) + raw[8:]
    header, body = split_file(raw)
    if kind == 4:
        return join_file(mutate_header(rng, header), body)
    if kind == 5:  # a header that is not JSON of the expected kind
        head = rng.choice([b"\xff\xfe{}", b"[" * 50000, b'{"a": ' + b"9" * 5000 + b"}",
                           b'{"a": NaN}', b"{" + b" " * 100, b"\x00" * 64])
        return join_file(head, body)
    if kind == 6:  # data section shorter or longer than the header says
        cut = rng.randrange(1, 200)
        return join_file(header, body[:-cut] if rng.random() < 0.5 else body + b"\0" * cut)
    return join_file(mutate_header(rng, mutate_header(rng, header)), body)


def test_fuzzed_safetensors_load_or_raise_value_error(tmp_path):
    rng = random.Random(20240909)
    bases = [safetensors_bytes(hf_gpt2_tensors(SMALL)),
             safetensors_bytes(hf_gpt2_tensors(SMALL, prefix="transformer.", mask_buffers=False),
                               metadata={"format": "pt"})]
    path = tmp_path / "model.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    tracemalloc.start()
    try:
        with alarm(60):
            for case in range(300):
                path.write_bytes(corrupt_safetensors(rng, rng.choice(bases)))
                load = [lambda: gpt.read_safetensors(path),
                        lambda: load_gpt2(GPTModel(SMALL), path),
                        lambda: load_weights(GPTModel(SMALL), path)][case % 3]
                try:
                    load()
                    outcomes["loaded"] += 1
                except ValueError as e:
                    assert str(path) in str(e) and "\n" not in str(e), (case, str(e))
                    outcomes["refused"] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # no allocation sized by a corrupted header
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 150, outcomes


def test_header_length_cap_reads_nothing(tmp_path):
    """A header length under the file size but over the cap is refused before reading it."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", gpt.MAX_HEADER_BYTES + 1))
        f.truncate(gpt.MAX_HEADER_BYTES + 64)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="does not fit"):
            gpt.read_safetensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# ---- data files: a lone surrogate, then fuzzed ---------------------------------------------------
def test_lone_surrogate_escapes_are_skipped_but_real_pairs_round_trip(tmp_path):
    path, said = tmp_path / "d.json", []
    path.write_text('[{"instruction": "a", "output": "b"}, '
                    '{"instruction": "half an emoji \\ud83d", "output": "c"}]')
    assert load_data(str(path), log=said.append) == [{"instruction": "a", "output": "b"}]
    assert "entry 1 holds a lone surrogate" in said[0]
    path.write_text('[{"instruction": "half an emoji \\ud83d", "output": "c"}]')
    with pytest.raises(ValueError, match=r"d.json: entry 0 holds a lone surrogate"):
        load_data(str(path))
    path.write_text('[{"instruction": "an emoji \\ud83d\\ude00", "output": "c"}]')
    entries = load_data(str(path))
    assert entries[0]["instruction"] == "an emoji 😀"
    write_json(tmp_path / "out.json", entries)
    assert load_data(str(tmp_path / "out.json")) == entries


RAW = ["[" * 5000 + "]" * 5000, "9" * 5000, '"\\ud800"', '"\\udc00 tail"', "NaN", "-Infinity",
       '"\\u0000"', "1e400"]
STRINGS = ["", "   ", "\n\t", "<|endoftext|>", "<|user|>\n<|assistant|>:", "日本語 🙂",
           "x" * 3000, "\\", '"', "### Response:"]


def random_field(rng: random.Random):
    kind = rng.randrange(4)
    if kind == 0:
        return f"@RAW{rng.randrange(len(RAW))}@"  # spliced in after json.dumps
    if kind == 1:
        return rng.choice(STRINGS)
    return rng.choice([None, True, 0, 2.5, [], {}, ["a"], {"x": "y"}, "ok", "Blue."])


def corrupt_data(rng: random.Random) -> bytes:
    entries = [dict(ENTRY), {"instruction": "Say <|endoftext|>", "output": "<|user|> ok"},
               {"instruction": "Name a color.", "input": "", "output": "Blue.", "id": 3}]
    kind = rng.randrange(6)
    if kind <= 2:  # fields replaced, removed or added
        for _ in range(rng.randint(1, 3)):
            entry = rng.choice(entries)
            key = rng.choice(["instruction", "input", "output", "id", "extra"])
            if rng.random() < 0.2:
                entry.pop(key, None)
            else:
                entry[key] = random_field(rng)
    elif kind == 3:  # the top level
        entries = rng.choice([[], {}, "text", 3, None, [entries], {"data": entries},
                              entries + [random_field(rng)]])
    text = json.dumps(entries, ensure_ascii=rng.random() < 0.5)
    for i, raw in enumerate(RAW):
        text = text.replace(f'"@RAW{i}@"', raw)
    raw = text.encode(rng.choice(["utf-8", "utf-8", "utf-8-sig", "utf-16"]))
    if kind >= 4:  # bytes: truncation, bit flips, garbage
        out = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(out))
            action = rng.randrange(3)
            if action == 0:
                out[pos] ^= 1 << rng.randrange(8)
            elif action == 1:
                del out[pos:pos + rng.randint(1, 40)]
            else:
                out[pos:pos] = rng.choice([b"\xff", b"\xc3", b",", b"]", b"{", b"\x00", b'"'])
        raw = bytes(out)
    return raw


def test_fuzzed_data_files_load_or_raise_value_error(tmp_path):
    """What load_data accepts, the rest of the pipeline can tokenize, write and read back."""
    rng, tok = random.Random(99), get_tokenizer()
    path, out = tmp_path / "data.json", tmp_path / "out.json"
    outcomes = {"loaded": 0, "refused": 0}
    with alarm(60):
        for case in range(400):
            path.write_bytes(corrupt_data(rng))
            try:
                entries = load_data(str(path))
            except ValueError as e:
                assert str(e).startswith(f"{path}: ") and "\n" not in str(e), (case, str(e))
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            assert all(data.entry_problem(e) is None for e in entries)
            InstructionDataset(entries, tok, style=rng.choice(data.PROMPT_STYLES))
            write_json(out, entries)
            assert json.dumps(load_data(str(out))) == json.dumps(entries)
    assert outcomes["loaded"] > 40 and outcomes["refused"] > 150, outcomes
