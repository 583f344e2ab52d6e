"""training/: the run's settings (the book's defaults and the tiny demo's), the model it builds,
and its checkpoints (written whole, read back exactly, streamed without a copy in memory)."""
import argparse
import hashlib
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import train
from gpt import GPTModel, model_config
from training import checkpoint
from training import files as recipe_files
from training import run as recipe
from training.run import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def test_save_every_takes_steps_or_minutes():
    assert checkpoint.parse_every("200") == (200, "steps")
    assert checkpoint.parse_every("1.5m") == (1.5, "minutes")
    with pytest.raises(argparse.ArgumentTypeError):
        checkpoint.parse_every("ten")


def test_a_checkpoint_keeps_best_weights_only_when_they_differ_from_the_model(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    opt = make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    best = {k: v + 1 for k, v in train.copy_weights(model).items()}
    for best_step, stored in ((3, False), (2, True)):
        state = asdict(train.RunState(step=3, best_step=best_step, history=[{"step": 3}]))
        checkpoint.save_checkpoint(tmp_path / "c.pt", model, opt, state, best, SMALL)
        kept = torch.load(tmp_path / "c.pt", weights_only=True)["best_weights"]
        assert (kept is not None) == stored
        saved, loaded = checkpoint.load_checkpoint(tmp_path / "c.pt", GPTModel(SMALL), opt, SMALL,
                                                   train.RunState)
        assert saved == train.RunState(**state)
        if stored:
            assert all(torch.equal(loaded[k], best[k]) for k in best)
        else:
            assert loaded is None  # the current weights are the best: train.py copies them


def test_a_checkpoint_save_streams_to_disk_without_a_copy_in_memory(tmp_path):
    """Peak memory (a fresh process's ru_maxrss) grows by under 5 % of the checkpoint's size when
    it is saved: the file is streamed, never built in a buffer (which doubled it before)."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from dataclasses import asdict
import train
from gpt import GPTModel
from training import checkpoint
from training.run import make_optimizer
cfg = dict(vocab_size=50257, context_length=64, emb_dim=512, n_heads=8, n_layers=4,
           drop_rate=0.0, qkv_bias=True)
model = GPTModel(cfg)
opt = make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
model(torch.randint(0, 50257, (1, 8))).sum().backward()
opt.step()
opt.zero_grad()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
checkpoint.save_checkpoint({str(tmp_path / 'c.pt')!r}, model, opt, asdict(train.RunState()), {{}}, cfg)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = (int(x) * 1024 for x in out.stdout.split())  # KiB on Linux
    size = (tmp_path / "c.pt").stat().st_size
    assert size > 300 * 2**20  # weights and AdamW's two moments of a 39M-parameter model
    assert after - before < 0.05 * size



# ---- the tiny demo: pretrained start, defaults -----------------------------------------------
def test_tiny_defaults_and_the_books_stay_apart():
    book, tiny = recipe.parse_args([]), recipe.parse_args(["--model", "tiny"])
    assert (book.lr, book.epochs, book.lr_schedule, book.warmup_steps, book.mask_prompt) == \
        (5e-5, 2, "constant", 0, False)
    assert (tiny.lr_schedule, tiny.mask_prompt, tiny.keep_last, tiny.patience) == ("cosine", True, True, 0)
    assert book.keep_last is False and recipe.parse_args(["--model", "tiny", "--no-keep-last"]).keep_last is False
    assert recipe.parse_args(["--model", "tiny", "--no-mask-prompt"]).mask_prompt is False
    assert recipe.parse_args(["--mask-prompt"]).mask_prompt is True
    scratch = recipe.parse_args(["--model", "tiny", "--from-scratch"])
    assert (scratch.epochs, scratch.lr, scratch.lr_schedule, scratch.mask_prompt) == \
        (15, 1e-3, "constant", False)


def test_the_committed_tiny_model_is_the_pretrained_one_and_train_loads_it():
    raw = recipe_files.TINY_PRETRAINED.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == \
        "7f5987e6e08a89789723f5544ae35e773f1f36c5281d14e0021f45f9189c55ec"
    assert len(raw) < 30_000_000  # the size limit for shipped weights
    saved = torch.load(recipe_files.TINY_PRETRAINED, weights_only=True)
    assert saved["config"]["name"] == "tiny"
    model, cfg = recipe.build_model(recipe.parse_args(["--model", "tiny"]), log=lambda *a: None)
    assert cfg["name"] == "tiny"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][name].float(), msg=name)


def test_from_scratch_never_reads_the_pretrained_file(monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "TINY_PRETRAINED", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        recipe.build_model(recipe.parse_args(["--model", "tiny"]), log=lambda *a: None)
    model, _ = recipe.build_model(recipe.parse_args(["--model", "tiny", "--from-scratch"]),
                                 log=lambda *a: None)
    torch.manual_seed(123)  # the run's seed: the same random start as GPTModel on its own
    torch.testing.assert_close(model.state_dict(), GPTModel(model_config("tiny")).state_dict())


def test_test_entries_that_copy_a_training_entry_are_warned_of_in_one_line(tmp_path):
    from data import load_data, split_data
    entries = load_data(ROOT / "data" / "instruction-data.json")[:100]  # 85 / 5 / 10
    said = []
    recipe.warn_of_leaks("d.json", split_data(entries), said.append)
    assert said == []
    entries[86] = dict(entries[3])  # the second test entry: a copy of a training entry
    recipe.warn_of_leaks("d.json", split_data(entries), said.append)
    assert said == ["warning: 1 of 10 test entries near-copy a training entry (scores on them "
                    "flatter the model); to see them: python data/near_duplicates.py d.json "
                    "--split"]
