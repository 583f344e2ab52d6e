"""benchmarks/job_flops.py: its FLOP count against torch's own counter on the real model, and a run."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from child_io import FRESH_TORCH_S
from script_loader import load_script
from gpt import GPTModel, model_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "job_flops.py"


def load_job_flops():
    return load_script("benchmarks/job_flops.py")


def test_a_training_step_counts_as_torch_counts_it_on_the_real_model():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    model, inputs = GPTModel(cfg), torch.randint(0, cfg["vocab_size"], (2, 48))
    with FlopCounterMode(display=False) as counter:
        model(inputs).sum().backward()  # the head on all 96 positions, as the book's loss
    blocks, head = load_job_flops().forward_flops(cfg, (2, 48), head_rows=96)
    # torch's counter has no formula for the CPU's fused attention kernel: that part by hand,
    # 2 products (q k^T, then with v) of 2 x 48 x 48 x 128 multiply-adds in each of 4 layers
    attention = 2 * 2 * (2 * 48 * 48 * 128) * 4
    assert attention == 9_437_184
    assert counter.get_total_flops() == 3 * (blocks - attention + head)
    assert head == 2 * 128 * 50257 * 96


def test_the_project_counts_the_head_on_targets_only_and_the_book_on_every_position():
    script = load_job_flops()
    args = script.parse_args(["--model", "tiny", "--entries", "60", "--eval-every", "2",
                              "--eval-batches", "1"])
    book_loaders = script.book_loaders(args, torch.device("cpu"))
    book = script.job_flops(model_config("tiny"), book_loaders, args, book=True)
    project = script.job_flops(model_config("tiny"), script.project_loaders(args), args, book=False)
    assert book["steps"] == project["steps"] == len(book_loaders[0].dataset) // 8
    assert project["train"]["head"] < book["train"]["head"]  # the book's covers the padding too


def test_a_run_prints_the_table_and_the_ceiling_over_the_books_time(tmp_path):
    results = tmp_path / "job.json"
    results.write_text(json.dumps({"book": {"train_seconds": 10.0}, "project": {"train_seconds": 5.0}}))
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--entries", "60",
                          "--seconds", "0.05", "--results", str(results)],
                         capture_output=True, text=True, timeout=FRESH_TORCH_S)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| book", "| project"))]
    assert len(rows) == 2
    assert "over the least the project's products take: at most" in out.stdout
    assert "- project:" in out.stdout and "GFLOP/s of matrix products" in out.stdout
