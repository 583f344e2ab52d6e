"""Issue 9, reliability: the failure cases the per-file tests do not reach, and two fuzz tests.

A corrupted weight or data file must load or raise a ValueError naming the file; failed, refused or
interrupted work must leave earlier outputs intact and no temporary file behind. Offline and fast:
the fuzz tests are seeded and bounded by a case count and an alarm.
"""
import contextlib
import errno
import http.server
import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

import data
import generate
import gpt
import train
from training import checkpoint
from training import files
from training import run as recipe
from collate import make_loader
from data import InstructionDataset, cli_main, get_tokenizer, load_data, write_json
from gpt import GPTModel, load_gpt2, load_model, load_weights, model_config, save_model
from child_io import FRESH_TORCH_S
from local_server import local_server
from safetensors_io import hf_gpt2_tensors, safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent

SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.",
         "output": "I baked the cake."}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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


# ---- data ----------------------------------------------------------------------------------------
def loader_args(max_length: int) -> SimpleNamespace:
    return SimpleNamespace(max_length=max_length, batch_size=1, prompt_style="alpaca", seed=1,
                           mask_prompt=False, no_length_grouping=False,
                           pad_multiple=recipe.PAD_MULTIPLE)


def data_with_one_long_entry(extra_tokens: int) -> tuple[list[dict], int, list[int]]:
    """20 short entries and, first (so in the training split), one longer than the returned limit
    by `extra_tokens` tokens; also returns the long entry's token ids."""
    tok = get_tokenizer()
    short = [{"instruction": f"Name color {k}.", "output": "Blue."} for k in range(20)]
    max_length = max(InstructionDataset(short, tok).lengths) + 3
    long = {"instruction": "Repeat.", "output": "word"}
    base = InstructionDataset([long], tok).lengths[0]
    long["output"] += " word" * (max_length + extra_tokens - base)  # " word" is one token
    ids = InstructionDataset([long], tok)[0]
    assert len(ids) == max_length + extra_tokens
    return [long] + short, max_length, ids


def test_entry_longer_than_max_length_is_kept_counted_and_cut():
    entries, max_length, ids = data_with_one_long_entry(30)
    logs = []
    train_loader, _, (train_data, _, _) = recipe.prepare_loaders(
        loader_args(max_length), entries, get_tokenizer(), torch.device("cpu"), logs.append)
    assert entries[0] in train_data
    assert any(f"1 training entries are longer than --max-length {max_length}" in line
               for line in logs)
    rows = [inputs[0].tolist() for inputs, _ in train_loader]
    assert max(len(r) for r in rows) == max_length
    assert ids[:max_length] in rows  # kept, cut to its first max_length tokens


def test_entry_one_token_too_long_is_counted_too():
    entries, max_length, ids = data_with_one_long_entry(1)
    logs = []
    train_loader, _, _ = recipe.prepare_loaders(loader_args(max_length), entries,
                                                get_tokenizer(), torch.device("cpu"), logs.append)
    (targets,) = [t[0].tolist() for inputs, t in train_loader if inputs[0].tolist() == ids[:-1]]
    assert 50256 not in targets  # the stop signal was cut off ...
    assert any("1 training entries are longer" in line for line in logs)  # ... so say so


def test_lone_surrogate_escapes_are_refused_but_real_pairs_round_trip(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"}, '
                    '{"instruction": "half an emoji \\ud83d", "output": "c"}]')
    with pytest.raises(ValueError, match=r"d.json: entry 1 holds a lone surrogate"):
        load_data(str(path))
    path.write_text('[{"instruction": "an emoji \\ud83d\\ude00", "output": "c"}]')
    entries = load_data(str(path))
    assert entries[0]["instruction"] == "an emoji 😀"
    write_json(tmp_path / "out.json", entries)
    assert load_data(str(tmp_path / "out.json")) == entries


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


# ---- downloads: a server that can cut the body short ---------------------------------------------
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfer needs it

    def do_GET(self):
        srv, body = self.server, self.server.body
        srv.seen.append(self.headers.get("Range"))
        start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        sent = body[start:]
        if srv.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(sent)))
        self.send_header("Connection", "close")
        self.end_headers()
        cut = srv.drop_after is not None
        sent = sent[:srv.drop_after] if cut else sent
        if srv.chunked:
            for i in range(0, len(sent), 1000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(sent[i:i + 1000]), sent[i:i + 1000]))
            if not cut:
                self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(sent)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with local_server(Handler) as srv:
        srv.body, srv.seen, srv.chunked, srv.drop_after = b"", [], False, None
        yield srv


def test_chunked_body_cut_short_keeps_the_part_and_resumes(server, tmp_path):
    server.body, server.chunked, server.drop_after = bytes(range(256)) * 40, True, 4000
    with pytest.raises(OSError, match="run again to resume"):
        files.download(server.url + "/f", tmp_path / "f", progress=False, timeout=5)
    assert names(tmp_path) == ["f.part"]
    # urllib drops the bytes of a chunked read that fails, so the .part may be shorter: a prefix
    assert server.body.startswith((tmp_path / "f.part").read_bytes())
    server.drop_after = None
    assert files.download(server.url + "/f", tmp_path / "f", progress=False,
                          timeout=5).read_bytes() == server.body
    assert names(tmp_path) == ["f"]


def test_gpt2_download_cut_short_leaves_no_model_and_the_next_run_resumes(server, tmp_path,
                                                                        monkeypatch):
    server.body = safetensors_bytes(hf_gpt2_tensors(SMALL))
    server.drop_after = len(server.body) // 2
    monkeypatch.setattr(files, "gpt2_url", lambda name: server.url + "/model.safetensors")
    with pytest.raises(FileNotFoundError, match="run again to resume.*--weights PATH"):
        files.download_gpt2("gpt2-small", cache_dir=tmp_path)
    assert names(tmp_path / "gpt2") == ["model.safetensors.part"]
    server.drop_after = None
    path = files.download_gpt2("gpt2-small", cache_dir=tmp_path)
    assert server.seen[-1] == f"bytes={len(server.body) // 2}-"
    assert names(tmp_path / "gpt2") == ["model.safetensors"]
    load_gpt2(GPTModel(SMALL), path)


def test_damaged_cached_data_is_downloaded_again(server, tmp_path):
    server.body = json.dumps([ENTRY]).encode()
    url = server.url + "/instruction-data.json"
    assert load_data(files.fetch_data(url, cache_dir=tmp_path)) == [ENTRY]
    cached = files.cached_path(url, tmp_path)
    cached.write_bytes(cached.read_bytes()[:-5])  # damaged after the download
    assert load_data(files.fetch_data(url, cache_dir=tmp_path)) == [ENTRY]
    assert server.seen == [None, None] and cached.read_bytes() == server.body


# ---- runs: unwritable places, full disks, Ctrl-C, a diverging loss ------------------------------
def test_out_dir_under_a_file_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write to --out-dir .*file/out"):
        recipe.check_out_dir(tmp_path / "file" / "out")


def test_read_only_out_dir_is_refused_before_work(tmp_path):
    """Root writes into read-only folders anyway (as CI runs), so as root a child process drops
    to the user `nobody` after importing, and checks the folder from inside it (a relative path,
    so the root-only folders above it do not matter)."""
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    if os.geteuid() != 0:
        with pytest.raises(OSError, match="cannot write to --out-dir"):
            recipe.check_out_dir(out)
        return
    code = ("import os, sys; from pathlib import Path; from training.run import check_out_dir\n"
            "os.chdir(sys.argv[1]); os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try:\n    check_out_dir(Path('out'))\n"
            "except OSError as e:\n    print(e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=FRESH_TORCH_S)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("cannot write to --out-dir out: Permission denied")
    assert list(out.iterdir()) == []


def test_write_into_a_missing_folder_names_the_file_not_the_temp(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot write .*missing/report.md: No such") as e:
        data.atomic_write_bytes(tmp_path / "missing" / "report.md", b"x")
    assert ".tmp" not in str(e.value)


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_model(path):
    save_model(GPTModel(SMALL), SMALL, path)


def write_checkpoint(path):
    model = GPTModel(SMALL)
    checkpoint.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), asdict(train.RunState()),
                          {}, SMALL)


@pytest.mark.parametrize("write", [write_model, write_checkpoint,
                                   lambda path: write_json(path, [ENTRY])])
def test_disk_full_while_saving_keeps_the_previous_file(tmp_path, monkeypatch, write):
    path = tmp_path / "output"
    path.write_bytes(b"previous run")
    monkeypatch.setattr(data.os, "fsync", disk_full)  # the data did not reach the disk
    with pytest.raises(OSError, match=re.escape(f"cannot write {path}: No space left on device")):
        write(path)
    assert path.read_bytes() == b"previous run" and names(tmp_path) == ["output"]


def answer_tokens(prompts):
    return [[464, 2068] for _ in prompts]  # "The quick"


def test_generate_disk_full_is_one_line_exit_2_and_keeps_the_old_output(tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "out.json"
    out.write_text("[]")
    monkeypatch.setattr(data.os, "fsync", disk_full)
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: generate.answer_file(answer_tokens, [ENTRY], get_tokenizer(), "alpaca",
                                              str(out)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: [Errno 28] cannot write {out}: No space left " \
                                        "on device\n"
    assert out.read_text() == "[]" and names(tmp_path) == ["out.json"]


def test_generate_ctrl_c_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out.json"

    def interrupted(prompts):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        generate.answer_file(interrupted, [ENTRY], get_tokenizer(), "alpaca", str(out))
    assert names(tmp_path) == []
    out.write_text("[]")  # Ctrl-C while the file itself is being written

    def ctrl_c(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(data.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        generate.answer_file(answer_tokens, [ENTRY], get_tokenizer(), "alpaca", str(out))
    assert out.read_text() == "[]" and names(tmp_path) == ["out.json"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = dict(SMALL, vocab_size=50257)  # collate pads with <|endoftext|>
    model = GPTModel(cfg)
    seqs = [[(3 * i + j) % 97 for j in range(4 + i % 3)] for i in range(12)]
    loader = make_loader(seqs, batch_size=2, shuffle=True, drop_last=True)
    val_loader = make_loader(seqs[:4], batch_size=2, shuffle=False, drop_last=False)
    opt = recipe.make_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    real_loss, training_steps = train.calc_loss_batch, []

    def nan_at_step_4(inputs, targets, model, device):
        loss = real_loss(inputs, targets, model, device)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            training_steps.append(1)
            return loss * float("nan") if len(training_steps) == 4 else loss
        return loss
    path, saved = tmp_path / "checkpoint.pt", []

    def save(state, best):
        checkpoint.save_checkpoint(path, model, opt, asdict(state), best, cfg)
        saved.append(state.step)
    with pytest.raises(ValueError, match="loss became nan at step 4"):
        train.train_model(model, loader, val_loader, opt, "cpu", 1, 2, 1, loss_fn=nan_at_step_4,
                          best=train.copy_weights(model), save_every=(1, "steps"), save=save,
                          on_epoch_end=save, log=lambda *a: None)
    kept = torch.load(path, weights_only=True)
    assert saved == [1, 2, 3] and kept["state"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert names(tmp_path) == ["checkpoint.pt"]


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


# ---- fuzz: corrupted data files ------------------------------------------------------------------
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
