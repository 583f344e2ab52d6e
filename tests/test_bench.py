"""Smoke test of benchmarks/bench.py: a tiny run end to end, its table, its batches."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from child_io import FRESH_TORCH_S
from script_loader import load_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def load_bench():
    return load_script("benchmarks/bench.py")  # with its folder on the path: it imports bench_generate


def test_tiny_run_prints_throughput_step_time_and_memory(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--steps", "2",
                          "--warmup", "1", "--skip-inference", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=FRESH_TORCH_S)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("training ("))
    assert re.search(r"\d+\.\d target tokens/s, \d+\.\d\d s/step", line)
    assert re.search(r"peak RSS \d+\.\d\d GiB", line)
    assert "bf16" in line or "fp32" in line
    assert "inference" not in out.stdout
    assert '"tokens_per_s"' in (tmp_path / "r.json").read_text()


def test_the_old_default_runs_through_every_trick_of_fast_tricks(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--steps", "1",
                          "--warmup", "1", "--skip-inference", "--old-default"],
                         capture_output=True, text=True, timeout=FRESH_TORCH_S)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("training ("))
    for piece in ("weights recast in backward",
                  "freed memory returned each step", "fused AdamW in backward"):
        assert piece in line


def test_the_default_row_takes_the_step_train_py_takes():
    """bench.py's default configuration times the very step fast/step.py's make_step gives train.py
    (bf16 autocast where native, head on targets, sliced on CPU, plain attention on short rows):
    the same loss and, bit for bit, the same weights after it."""
    import argparse

    import torch

    from fast.step import make_step, use_bf16
    from gpt import GPTModel, model_config
    from train import calc_loss_batch, train_step
    from training.run import make_optimizer
    bench, cpu = load_bench(), torch.device("cpu")
    torch.manual_seed(1)
    inputs = torch.randint(0, 50257, (2, 24))
    targets = inputs.roll(-1, dims=1)
    targets[:, :6] = -100  # a masked prompt
    results = []
    for program in ("bench", "train.py"):
        torch.manual_seed(0)
        model = GPTModel(model_config("tiny")).train()
        optimizer = make_optimizer(model, 5e-5, 0.1, cpu)
        if program == "bench":
            d = bench.DEFAULT
            loss_fn = bench.bench_loss(cpu, use_bf16(d["precision"], cpu), d["full_head"],
                                       d["plain_head"], d["pick_attention"], d["recast"])
            result = train_step(model, optimizer, inputs, targets, cpu, loss_fn)
        else:
            flags = argparse.Namespace(precision="auto", full_head=False, no_cuda_graphs=False,
                                       compile=None, keep_memory=False, lora_rank=0)
            step, _ = make_step(model, optimizer, cpu, flags, calc_loss_batch, train_step,
                                log=lambda *_: None)
            result = step(inputs, targets)
        results.append((result, model.state_dict()))
    (bench_result, bench_weights), (train_result, train_weights) = results
    assert bench_result == train_result and bench_result[1] == 2 * 18
    assert all(torch.equal(bench_weights[k], train_weights[k]) for k in train_weights)


def test_table_gives_ratios_against_the_first_row():
    bench = load_bench()
    plain = {"tokens_per_s": 100.0, "s_per_step": 4.0, "peak_rss": 4 * 2**30}
    fast = {"tokens_per_s": 300.0, "s_per_step": 1.0, "peak_rss": 2 * 2**30}
    table = bench.markdown_table([("plain", plain), ("fast", fast)],
                                 {"plain": plain, "fast": fast}).splitlines()
    assert table[0].endswith(
        "| speed vs plain | memory vs plain | speed vs fast | memory vs fast |")
    assert table[2] == "| plain | 100.0 | 4.00 | 4.00 | 1.00x | 1.00x | 0.33x | 2.00x |"
    assert table[3] == "| fast | 300.0 | 1.00 | 2.00 | 3.00x | 0.50x | 1.00x | 1.00x |"


def test_the_same_settings_give_the_same_batches_longest_first():
    bench = load_bench()
    rows = [[1] * n for n in (5, 9, 3, 7, 4, 8, 6, 2)]
    for group in (False, True):
        a = bench.bench_batches(rows, 2, 3, group, seed=1, max_length=None)
        b = bench.bench_batches(rows, 2, 3, group, seed=1, max_length=None)
        assert len(a) == 3 and all((x[0] == y[0]).all() for x, y in zip(a, b))
        assert a[0][0].shape[1] == 9  # the batch holding the longest row (+1 for <|endoftext|>)


def test_the_books_modules_compute_the_same_logits_from_the_same_weights():
    sys.path.insert(0, str(BENCH.parent))
    try:
        from book_model import from_gpt
    finally:
        sys.path.remove(str(BENCH.parent))
    import torch

    from gpt import GPTModel, model_config
    torch.manual_seed(0)
    ours = GPTModel(model_config("tiny")).eval()
    book = from_gpt(ours).eval()
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(book(ids), ours(ids), rtol=1e-4, atol=1e-5)
    assert book.out_head.weight.data_ptr() != book.tok_emb.weight.data_ptr()  # untied, as the book
    assert sum(p.numel() for p in book.parameters()) == \
        sum(p.numel() for p in ours.parameters()) + 50257 * 128


def test_the_hugging_face_reference_computes_the_same_logits_from_the_same_weights():
    pytest.importorskip("transformers")  # the benchmark's reference row only; not a dependency
    import torch

    from gpt import GPTModel, model_config
    book_job = load_script("benchmarks/book_job.py")
    torch.manual_seed(0)
    ours = GPTModel(model_config("tiny")).eval()
    hf = book_job.HFLogits(ours).eval()
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids), ours(ids), rtol=1e-4, atol=1e-4)
    assert hf.pos_emb.weight.shape == (256, 128)
