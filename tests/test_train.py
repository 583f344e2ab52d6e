"""train.py: the book's functions called the book's way (train_model_simple against the book's
own loop on the book's model), the project's loop, and `python train.py` end to end on tiny."""
import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import train
from training import checkpoint
from child_io import FRESH_TORCH_S, LineReader, quiet_env, terminal_ctrl_c
from collate import custom_collate_fn, make_loader
from data import InstructionDataset, get_tokenizer, load_data
from gpt import GPTModel, load_model, model_config
from script_loader import load_script
from training.run import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
book_model = load_script("benchmarks/book_model.py")


# ---- the book's functions ---------------------------------------------------------------------
def test_calc_loss_batch_is_the_books_cross_entropy_over_every_position():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    inputs, targets = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    targets[0, 5:] = -100
    logits = model(inputs)
    by_hand = torch.stack([-torch.log_softmax(logits[b, t], -1)[targets[b, t]]
                           for b in range(3) for t in range(9) if targets[b, t] != -100]).mean()
    torch.testing.assert_close(train.calc_loss_batch(inputs, targets, model, "cpu"), by_hand)


def test_padding_to_a_multiple_leaves_the_loss_and_gradients_unchanged():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    rows = [list(range(3, 12)), [5, 6, 7], list(range(20, 26))]
    results = []
    for multiple in (1, 8):
        inputs, targets = custom_collate_fn(rows, pad_token_id=0, pad_to_multiple=multiple)
        loss = train.calc_loss_batch(inputs, targets, model, 'cpu')
        results.append((inputs.shape[1], loss, torch.autograd.grad(loss, model.parameters())))
    (t1, loss1, grads1), (t8, loss8, grads8) = results
    assert (t1, t8) == (9, 16)
    torch.testing.assert_close(loss8, loss1)
    for a, b in zip(grads8, grads1):
        torch.testing.assert_close(a, b)


def book_reference_loop(model, train_loader, val_loader, optimizer, num_epochs, eval_freq,
                        eval_iter):
    """Chapter 7's train_model_simple, spelt out here on the book's own modules
    (benchmarks/book_model.py), as the reference: full logits, the book's loader average."""
    def loader_loss(loader):
        n = min(eval_iter, len(loader))
        return sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                   for _, (x, y) in zip(range(n), loader)) / n
    train_losses, val_losses, tokens, seen, step = [], [], [], 0, -1
    for _ in range(num_epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            seen, step = seen + x.numel(), step + 1
            if step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(loader_loss(train_loader))
                    val_losses.append(loader_loss(val_loader))
                model.train()
                tokens.append(seen)
    return train_losses, val_losses, tokens


def test_train_model_simple_returns_the_books_losses_on_the_books_model():
    """10 steps of tiny (dropout 0) from the same weights over the same plain DataLoader batches:
    train_model_simple on GPTModel and the book's loop on the book's GPTModel agree to 1e-4."""
    tok = get_tokenizer()
    entries = load_data(ROOT / "data" / "instruction-data.json")[:100]
    collate = lambda b: custom_collate_fn(b, allowed_max_length=256)  # noqa: E731
    train_loader = DataLoader(InstructionDataset(entries[:40], tok), batch_size=4,
                              collate_fn=collate)
    val_loader = DataLoader(InstructionDataset(entries[40:60], tok), batch_size=4,
                            collate_fn=collate)
    torch.manual_seed(123)
    ours = GPTModel(dict(model_config("tiny"), tie_head=False))  # the book's head is its own
    book = book_model.from_gpt(ours).train()
    results = {}
    for name, model in (("ours", ours), ("book", book)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
        if name == "ours":
            with redirect_stdout(io.StringIO()) as printed:
                results[name] = train.train_model_simple(
                    model, train_loader, val_loader, optimizer, "cpu", 1, 3, 2,
                    "Name a colour.", tok)
        else:
            results[name] = book_reference_loop(model, train_loader, val_loader, optimizer, 1, 3, 2)
    (ours_train, ours_val, ours_tokens), (book_train, book_val, book_tokens) = \
        results["ours"], results["book"]
    assert len(ours_train) == 4  # steps 0, 3, 6, 9 of the 10 (40 entries, batch 4)
    assert ours_tokens == book_tokens and ours_tokens[0] == train_loader.__iter__().__next__()[0].numel()
    assert ours_train == pytest.approx(book_train, rel=1e-4)
    assert ours_val == pytest.approx(book_val, rel=1e-4)
    assert ours_train[-1] < ours_train[0]  # it learned
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("Ep 1 (Step 000000): Train loss ") and len(lines) == 5
    assert lines[-1].startswith("Name a colour.")  # the sample after the epoch, on one line


def test_plot_losses_takes_the_books_four_arguments(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert train.plot_losses([0.0, 0.5, 1.0], [0, 40, 80], [3.0, 2.0, 1.5], [3.1, 2.2, 1.9])
    assert (tmp_path / "loss-plot.pdf").read_bytes()[:5] == b"%PDF-"  # the book's file name
    assert train.plot_losses([0, 1], [0, 8], [2.0, 1.0], [2.5, 1.5], path=tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss-plot.pdf", "p.png"]


# ---- the project's loop ---------------------------------------------------------------------------
def test_train_step_skips_a_batch_without_targets_and_leaves_the_weights():
    model = GPTModel(SMALL)
    opt = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    before = train.copy_weights(model)
    inputs, targets = torch.randint(0, 97, (2, 5)), torch.full((2, 5), -100)
    assert train.train_step(model, opt, inputs, targets, "cpu") == (0.0, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    targets[0, 1] = 7
    loss, n = train.train_step(model, opt, inputs, targets, "cpu")
    assert n == 1 and loss > 0
    assert not torch.equal(before["tok_emb.weight"], model.tok_emb.weight)


def test_copy_weights_copies_a_tied_weight_once_and_overwrites_an_earlier_copy_in_place():
    model = GPTModel(model_config("tiny"))  # head tied to the token embedding
    best = train.copy_weights(model)
    assert best["tok_emb.weight"] is best["out_head.weight"]
    distinct = {id(t): t for t in best.values()}.values()
    # 7.26M numbers, not 13.7M (parameters() lists the tied weight once)
    assert sum(t.numel() for t in distinct) == sum(p.numel() for p in model.parameters())
    kept = {k: v.clone() for k, v in best.items()}
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
        model.trf_blocks[0].ff.proj.weight.mul_(2.0)
    assert all(torch.equal(best[k], kept[k]) for k in kept)  # a copy, not a view of the weights
    again = train.copy_weights(model, into=best)
    assert all(again[k] is best[k] for k in best)  # the same tensors, no second copy
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_the_step_updates_the_weights_in_optimizer_step_not_in_backward():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    opt = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    inputs, targets = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    before = train.copy_weights(model)
    loss = train.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is not None for p in model.parameters())  # a clip could act here
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len(before)


def test_the_books_calls_work_with_the_books_arguments():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batches = [custom_collate_fn([[1, 2, 3, 4], [5, 6, 7]], 0, -100, None, "cpu") for _ in range(3)]
    inputs, targets = batches[0]
    keep = targets != -100
    book = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(train.calc_loss_batch(inputs, targets, model, "cpu"), book)
    assert train.calc_loss_loader(batches, model, "cpu", num_batches=2) == \
        pytest.approx(book.item(), rel=1e-5)
    assert train.evaluate_model(model, batches, batches[:1], "cpu", 5) == \
        pytest.approx((book.item(), book.item()), rel=1e-5)
    assert keep.sum() == 7  # targets 2 3 4 <pad> and 6 7 <pad> -100: the first pad is learned
    assert model.training  # evaluate_model puts the model back in training mode


def test_compile_compiles_the_default_loss_path(tmp_path):
    """`--compile` compiles the code that runs: a counting backend sees the model's graphs."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch._dynamo.reset()
    data = write_slice(tmp_path, 40)
    real_compile = torch.compile
    train_compile = lambda fn, backend=None: real_compile(fn, backend=counter)  # noqa: E731
    original, torch.compile = torch.compile, train_compile
    try:
        train.main(["--model", "tiny", "--data", str(data), "--batch-size", "4", "--max-steps",
                    "2", "--eval-every", "1", "--eval-batches", "1", "--no-generate", "--quiet",
                    "--compile", "--out-dir", str(tmp_path / "out")])
    finally:
        torch.compile = original
        torch._dynamo.reset()
    assert counter.frame_count >= 1 and counter.op_count > 50


def run_train(tmp_path, *extra, data=None, check=True, **kw):
    data = data or write_slice(tmp_path, 60)
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--data", str(data),
           "--batch-size", "4", "--out-dir", str(tmp_path / "out"), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write_slice(tmp_path, n):
    path = tmp_path / "slice.json"
    entries = load_data(ROOT / "data" / "instruction-data.json")[:n]
    path.write_text(json.dumps(entries))
    return path


def test_end_to_end_tiny_run_writes_every_output(tmp_path):
    result = run_train(tmp_path, "--max-steps", "6", "--eval-every", "2", "--max-new-tokens", "8")
    out = tmp_path / "out"
    assert "settings: model tiny" in result.stdout and "reached --max-steps 6" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4, 6]
    assert metrics["stop_reason"] == "reached --max-steps 6" and metrics["steps"] == 6
    assert metrics["best_val_loss"] == min(h["val_loss"] for h in metrics["history"])
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 6  # 10 % of 60
    assert all(isinstance(r["model_response"], str) and "answer" in r for r in responses)
    model, cfg = load_model(out / "model.pt")
    assert cfg["name"] == "tiny" and cfg["prompt_style"] == "alpaca"
    if "loss-plot.png skipped" not in result.stdout:
        assert (out / "loss-plot.png").read_bytes()[:4] == b"\x89PNG"
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".part"))]
    assert leftovers == []


def test_early_stopping_when_validation_never_improves(tmp_path):
    result = run_train(tmp_path, "--lr", "0", "--eval-every", "1", "--patience", "2",
                       "--no-generate")
    assert "early stop at step 2" in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["best_step"] == 0 and metrics["steps"] == 2


@pytest.mark.slow  # over 20 s on 2 cores
def test_ctrl_c_writes_a_checkpoint_and_resume_reproduces_the_run(tmp_path):
    common = ["--epochs", "2", "--eval-every", "2", "--no-generate", "--patience", "0"]
    full = run_train(tmp_path / "a", *common, data=write_slice(tmp_path, 60))
    reference = json.loads((tmp_path / "a" / "out" / "metrics.json").read_text())["history"]

    data = write_slice(tmp_path, 60)
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--data", str(data),
           "--batch-size", "4", "--out-dir", str(tmp_path / "b"), *common]
    # without PYTHONUNBUFFERED the line reaches the pipe mid-run only if train.py flushes it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=quiet_env(), preexec_fn=terminal_ctrl_c)
    try:  # interrupt once the run is a few steps in
        LineReader(proc.stdout).wait_for(lambda line: line.startswith("ep")
                                         and " step     4/" in line)
        assert proc.poll() is None  # the run is still going
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=FRESH_TORCH_S)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [h["step"] for h in reference]
    for got, want in zip(history, reference):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert full.returncode == 0
    final_a, _ = load_model(tmp_path / "a" / "out" / "model.pt")
    final_b, _ = load_model(tmp_path / "b" / "model.pt")  # the best weights survived the restart
    for (name, a), b in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_log_lines_reach_a_pipe_while_the_run_goes_on(tmp_path):
    """`python train.py | tee log` shows each line as it is printed, not at exit. The run prints
    a few short lines and then trains for minutes printing one short line per epoch of 255
    steps (--eval-every past --max-steps), so unflushed lines would sit in the 8 KB buffer
    until long after the wait ends."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--data",
           str(write_slice(tmp_path, 600)), "--batch-size", "2", "--epochs", "10000",
           "--max-steps", "100000", "--eval-every", "200000", "--eval-batches", "1",
           "--no-generate", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=quiet_env())
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for(lambda line: line.startswith("settings: model tiny"))
        reader.wait_for(lambda line: line.startswith("ep 1 step     0/"), timeout=150)
        assert proc.poll() is None  # 100000 steps are far from done
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was still running when killed


@pytest.mark.parametrize("extra,message", [
    (["--max-length", "300"], "more than tiny's context length 256"),
    (["--lr", "1e30", "--eval-every", "100"], "loss became"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, extra, message):
    result = run_train(tmp_path, *extra, "--no-generate", check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_data_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_train(tmp_path, data=bad, check=False)
    assert result.returncode == 2 and "bad.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "out").glob("*"))


def test_unwritable_out_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--out-dir", str(blocker / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "cannot write to --out-dir" in result.stderr


def test_resume_with_a_checkpoint_of_another_model_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = GPTModel(SMALL)
    opt = torch.optim.AdamW(other.parameters())
    checkpoint.save_checkpoint(out / "checkpoint.pt", other, opt, asdict(train.RunState()), {},
                          dict(SMALL, name="small-test"))
    result = run_train(tmp_path, "--resume", check=False)
    assert result.returncode == 2 and "checkpoint is for another model" in result.stderr


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, COLUMNS="200"))
    for flag in ("--model", "--weights", "--data", "--prompt-style", "--mask-prompt", "--epochs",
                 "--max-steps", "--batch-size", "--lr", "--weight-decay", "--eval-every",
                 "--eval-batches", "--patience", "--max-length", "--precision", "--device",
                 "--seed", "--out-dir", "--save-every", "--resume", "--no-generate"):
        assert flag in result.stdout


def test_lr_at_warms_up_then_decays_along_a_cosine_to_a_tenth():
    # lr 1, warm-up 2, 10 steps: steps 0, 1 -> 1/2, 2/2; then 0.1 + 0.9 * (1 + cos(pi * p)) / 2
    # with p = (step - 2) / 8: step 2 -> 1.0, step 6 (p = 1/2) -> 0.55, step 10 (p = 1) -> 0.1
    got = [train.lr_at(s, 1.0, 10, "cosine", 2) for s in (0, 1, 2, 6, 10, 12)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert [train.lr_at(s, 2e-3, 10, "constant", 4) for s in (0, 3, 4, 9)] == \
        pytest.approx([5e-4, 2e-3, 2e-3, 2e-3])
    assert train.lr_at(0, 5e-5, 10) == 5e-5  # the book's constant rate, no warm-up


def test_train_model_sets_each_steps_rate_from_the_schedule():
    torch.manual_seed(0)
    model = GPTModel(dict(SMALL, vocab_size=50257))  # collate pads with <|endoftext|>
    rows = [[(3 * i + j) % 97 for j in range(5)] for i in range(8)]
    loader = make_loader(rows, batch_size=2, shuffle=True, drop_last=True)  # 4 steps an epoch
    opt = make_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    seen = []

    def recording_loss(inputs, targets, model, device):
        if torch.is_grad_enabled():  # a training step: the rate it will use
            seen.append(opt.param_groups[0]["lr"])
        return train.calc_loss_batch(inputs, targets, model, device)
    reason, best = train.train_model(
        model, loader, loader, opt, "cpu", 2, 100, 1, loss_fn=recording_loss,
        lr_schedule=lambda s, total: train.lr_at(s, 1e-2, total, "cosine", 2), log=lambda *a: None)
    assert seen == pytest.approx([train.lr_at(s, 1e-2, 8, "cosine", 2) for s in range(8)])
    assert reason == "completed 2 epochs" and best is None


def test_train_model_keeps_the_best_weights_and_stops_early():
    """--lr 0: nothing improves after the first evaluation, so patience 2 stops at step 2 and the
    best weights are those of step 0."""
    torch.manual_seed(0)
    model = GPTModel(dict(SMALL, vocab_size=50257))
    rows = [[(3 * i + j) % 97 for j in range(5)] for i in range(8)]
    loader = make_loader(rows, batch_size=2, shuffle=True, drop_last=True)
    opt = make_optimizer(model, 0.0, 0.0, torch.device("cpu"))
    state = train.RunState()
    reason, best = train.train_model(model, loader, loader, opt, "cpu", 3, 1, 1, state=state,
                                     patience=2, best=train.copy_weights(model), log=lambda *a: None)
    assert reason == "early stop at step 2: no new best validation loss in 2 evaluations"
    assert state.best_step == 0 and [h["step"] for h in state.history] == [0, 1, 2]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())




def test_save_due_takes_steps_or_minutes_and_stop_reason_names_why():
    assert train.save_due((200, "steps"), 400, 0.0) and not train.save_due((200, "steps"), 401, 1e9)
    assert train.save_due((1.5, "minutes"), 7, 90.0)
    assert not train.save_due((1.5, "minutes"), 7, 89.0)
    assert not train.save_due((0, "steps"), 0, 1e9)
    state = train.RunState(step=4, evals_since_best=2)
    assert train.stop_reason(state, 2, 0) == \
        "early stop at step 4: no new best validation loss in 2 evaluations"
    assert train.stop_reason(state, 3, 4) == "reached --max-steps 4"
    assert train.stop_reason(state, 0, 0) is None and train.stop_reason(state, 3, 5) is None
