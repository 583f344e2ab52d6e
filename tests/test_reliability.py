"""Issue 9, reliability: failed, refused or interrupted work must leave earlier outputs intact and
no temporary file behind (downloads cut short, unwritable places, full disks, Ctrl-C, a diverging
loss), and an entry too long for --max-length is kept, cut and counted. Damaged files, and the fuzz
tests that make them, are in test_damaged_files.py. Offline and fast.
"""
import errno
import http.server
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

import data
import generate
import train
from training import checkpoint
from training import files
from training import run as recipe
from collate import make_loader
from data import InstructionDataset, cli_main, get_tokenizer, load_data, write_json
from gpt import GPTModel, load_gpt2, save_model
from child_io import FRESH_TORCH_S
from local_server import local_server
from reliability_helpers import ENTRY, SMALL
from safetensors_io import hf_gpt2_tensors, safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- data: an entry longer than --max-length -----------------------------------------------------
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
