"""train.py under torchrun (distributed.py): sharding, equivalence with one process, a dead rank.

The torchrun tests start real gloo process groups on CPU (two ranks of the tiny model, a
50-entry slice of the data) and are marked slow: each launch costs ~10 s on a busy machine.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch
from torch import nn

from collate import LengthGroupedBatchSampler
from extras.distributed import ShardedBatchSampler, by_name, by_number

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
ENV.pop("WORLD_SIZE", None)
ENV.pop("RANK", None)
# eval every 2 steps over 2 batches; fp32 so that nothing depends on the CPU's bf16 support
COMMON = ["--model", "tiny", "--eval-every", "2", "--eval-batches", "2", "--precision", "fp32",
          "--no-generate", "--seed", "7"]


def test_shards_are_disjoint_halves_of_the_one_process_batches():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    single = LengthGroupedBatchSampler(lengths, 4, seed=3)
    shards = [ShardedBatchSampler(LengthGroupedBatchSampler(lengths, 2, seed=3), rank, 2)
              for rank in (0, 1)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        # 11 entries, global batch 4: two full batches, the remainder of 3 dropped everywhere
        assert len(shards[0]) == len(shards[1]) == len(single) == 2
        for whole, a, b in zip(single, *shards):
            assert len(a) == len(b) == 2 and not set(a) & set(b)
            assert a + b == whole


def test_sharding_refuses_batches_that_may_be_short():
    with pytest.raises(ValueError, match="drop_last"):
        ShardedBatchSampler(LengthGroupedBatchSampler([1, 2, 3], 2, drop_last=False), 0, 2)


def test_adamw_state_numbered_as_one_process_numbers_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)  # frozen: AdamW never sees it, so it gets no number
    # trainable in order: 0.weight -> 0, 1.weight -> 1, 1.bias -> 2
    named = {"state": {"1.weight": {"step": 3}},
             "param_groups": [{"lr": 0.1, "params": ["0.weight", "1.weight", "1.bias"]}]}
    numbered = {"state": {1: {"step": 3}}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    assert by_number(named, model) == numbered
    assert by_name(numbered, model) == named
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert plain.state_dict()["param_groups"][0]["params"] == [0, 1, 2]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    entries = json.loads((ROOT / "data" / "instruction-data.json").read_text())[:50]
    path = tmp_path_factory.mktemp("data") / "slice.json"
    path.write_text(json.dumps(entries))
    return path


def train(args, out_dir, nproc=1, wait=True):
    """train.py in one process, or under torchrun with `nproc` ranks on this machine."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--standalone"] if nproc > 1 else [sys.executable]
    cmd = launcher + [str(ROOT / "train.py"), *COMMON, *args, "--out-dir", str(out_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return json.loads((out_dir / "metrics.json").read_text()), output


def losses(metrics):
    return [(h["step"], h["tokens"], h["train_loss"], h["val_loss"]) for h in metrics["history"]]


def assert_same_losses(a, b):
    assert [x[:2] for x in a] == [x[:2] for x in b]  # same steps, same target tokens seen
    for x, y in zip(a, b):
        assert x[2:] == pytest.approx(y[2:], rel=1e-5)


@pytest.fixture(scope="module")
def one_process(data_file, tmp_path_factory):
    """The reference: one process, global batch 4 (= 2 per rank x 2 ranks)."""
    metrics, _ = train(["--data", str(data_file), "--batch-size", "4", "--max-steps", "6"],
                       tmp_path_factory.mktemp("one"))
    return losses(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_give_the_losses_of_one_process_on_the_same_global_batch(
        mode, one_process, data_file, tmp_path):
    metrics, output = train(["--data", str(data_file), "--batch-size", "2", "--max-steps", "6",
                             *mode], tmp_path, nproc=2)
    assert "global batch 2 x 2 = 4" in output
    assert len(one_process) == 4  # steps 0, 2, 4, 6
    assert_same_losses(losses(metrics), one_process)
    assert (tmp_path / "model.pt").exists() and metrics["steps"] == 6


def test_plain_python_never_starts_torch_distributed(data_file, tmp_path):
    code = ("import sys, torch.distributed as d, train\n"
            f"train.main(['--data', {str(data_file)!r}, '--out-dir', {str(tmp_path)!r}, "
            f"'--batch-size', '4', '--max-steps', '1', *{COMMON!r}])\n"
            "assert 'distributed' not in sys.modules and not d.is_initialized()\n"
            "print('plain')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "plain" in done.stdout, done.stderr


def test_fsdp_without_torchrun_is_refused_in_one_line(data_file, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--fsdp", "--data",
                           str(data_file), "--out-dir", str(tmp_path), *COMMON], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --fsdp needs several processes: torchrun "
                                   "--nproc_per_node N train.py ...")


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (children of its agent process, read from /proc)."""
    found = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
        if ranks:
            found[ranks[0]] = int(child)
    return found


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_and_its_checkpoint_resumes(data_file, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(data_file), "--batch-size", "2", "--epochs", "3", "--save-every", "2"]
    proc = train(args, out, nproc=2, wait=False)
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.communicate()[0]
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and time.monotonic() - killed < 30
    assert "train.py FAILED" in output and "Signal 9" in output  # torchrun's summary

    # the checkpoint (at step 2, 4, ...) continues under 2 ranks, and under 1 with batch 2 x 2
    metrics, output = train(args + ["--resume", "--max-steps", "12"], out, nproc=2)
    assert "resumed from" in output and metrics["steps"] == 12
    metrics, output = train(["--data", str(data_file), "--batch-size", "4", "--resume",
                             "--max-steps", "14"], out)
    assert "resumed from" in output and metrics["steps"] == 14


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_where_it_stopped(one_process, data_file, tmp_path):
    args = ["--data", str(data_file), "--batch-size", "2", "--fsdp"]
    train(args + ["--max-steps", "4", "--save-every", "4"], tmp_path, nproc=2)
    metrics, output = train(args + ["--max-steps", "6", "--resume"], tmp_path, nproc=2)
    assert "resumed from" in output
    # the history (steps 0-4 from the checkpoint, 6 after it) is the uninterrupted one's
    assert_same_losses(losses(metrics), one_process)
