"""train.py's flags, each run through train.main on tiny and checked by its effect on what was
trained (a spy on train_step sees every batch, the autocast state and the head's input) or on
what was written, not by the parsed settings."""
import json
from pathlib import Path

import pytest
import torch

import train
from fast import step as fast_step
from training import checkpoint
from data import get_tokenizer, load_data
from gpt import GPTModel, load_model, model_config, save_model

ROOT = Path(__file__).resolve().parent.parent
PAD = 50256
REAL_STEP = train.train_step  # not a spy left by an earlier run in the same test


def trained(tmp_path, monkeypatch, *flags, steps=2, weights=False):
    """Runs train.main on 40 entries; returns (one record per trained batch, the out folder)."""
    seen = []

    def spy(model, optimizer, inputs, targets, device, loss_fn=train.calc_loss_batch, count=None):
        record = {"inputs": inputs.clone(), "targets": targets.clone()}
        if weights:
            record["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def head_rows(module, args, output) -> None:
            record["head_rows"] = args[0].shape[:-1].numel()

        def autocast_state(module, args) -> None:
            record["autocast"] = torch.is_autocast_enabled("cpu")

        def watched(i, t, m, d):  # what the forward pass sees: autocast on or off, head rows
            hooks = [m.out_head.register_forward_hook(head_rows),
                     m.trf_blocks[0].register_forward_pre_hook(autocast_state)]
            try:
                return loss_fn(i, t, m, d)
            finally:
                for hook in hooks:
                    hook.remove()
        result = REAL_STEP(model, optimizer, inputs, targets, device, watched, count)
        if weights:
            record["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen.append(record)
        return result
    monkeypatch.setattr(train, "train_step", spy)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "slice.json"
    data.write_text(json.dumps(load_data(ROOT / "data" / "instruction-data.json")[:40]))
    out = tmp_path / "out"
    train.main(["--model", "tiny", "--data", str(data), "--batch-size", "4", "--max-steps",
                str(steps), "--eval-every", "1000", "--eval-batches", "1", "--no-generate",
                "--quiet", "--out-dir", str(out), *flags])
    return seen, out


def decoded_targets(record) -> list[str]:
    tok = get_tokenizer()
    return [tok.decode([t for t in row.tolist() if t not in (-100, PAD)])
            for row in record["targets"]]


def test_mask_prompt_leaves_the_prompt_targets_at_minus_100(tmp_path, monkeypatch):
    plain, _ = trained(tmp_path / "a", monkeypatch, "--no-mask-prompt")  # tiny masks by default
    masked, _ = trained(tmp_path / "b", monkeypatch, "--mask-prompt")
    assert [r["inputs"].tolist() for r in plain] == [r["inputs"].tolist() for r in masked]
    for p, m in zip(plain, masked):
        assert all("### Instruction:" in text for text in decoded_targets(p))
        # masked: only "the response + EOS" is learned; the header's last token "\n" predicts
        # the response's first one, so a row's targets start right after "### Response:\n"
        assert all("### Instruction:" not in t and "Below is" not in t for t in decoded_targets(m))
        assert (m["targets"] == -100).sum() > (p["targets"] == -100).sum()


def test_precision_fp32_keeps_autocast_off_and_bf16_turns_it_on(tmp_path, monkeypatch):
    fp32, _ = trained(tmp_path / "a", monkeypatch, "--precision", "fp32")
    bf16, _ = trained(tmp_path / "b", monkeypatch, "--precision", "bf16")
    assert [r["autocast"] for r in fp32] == [False, False]
    assert [r["autocast"] for r in bf16] == [True, True]


def test_prompt_style_phi3_trains_on_phi3_prompts(tmp_path, monkeypatch):
    seen, out = trained(tmp_path, monkeypatch, "--prompt-style", "phi3")
    tok = get_tokenizer()
    for row in seen[0]["inputs"]:
        text = tok.decode([t for t in row.tolist() if t != PAD])
        assert text.startswith("<|user|>\n") and "\n<|assistant|>:\n" in text
        assert "### Instruction" not in text
    assert load_model(out / "model.pt")[1]["prompt_style"] == "phi3"  # generate.py uses it


def test_weights_starts_from_the_given_file(tmp_path, monkeypatch):
    torch.manual_seed(7)
    cfg = model_config("tiny")
    start = GPTModel(cfg)
    save_model(start, cfg, tmp_path / "start.pt")
    seen, _ = trained(tmp_path, monkeypatch, "--weights", str(tmp_path / "start.pt"),
                      steps=1, weights=True)
    for name, value in start.state_dict().items():
        assert torch.equal(seen[0]["before"][name], value), name


def test_pad_multiple_sets_the_batch_length(tmp_path, monkeypatch):
    sixteen, _ = trained(tmp_path / "a", monkeypatch, "--pad-multiple", "16", steps=4)
    book, _ = trained(tmp_path / "b", monkeypatch, "--pad-multiple", "1", steps=4)
    assert all(r["inputs"].shape[1] % 16 == 0 for r in sixteen)
    # the book's padding: each batch as long as its longest entry (+1 for the shifted target)
    for r in book:
        longest = max(int((row != PAD).sum()) for row in r["inputs"])
        assert r["inputs"].shape[1] in (longest, longest + 1)
    assert any(r["inputs"].shape[1] % 16 for r in book)


def test_no_length_grouping_gives_batches_with_more_padding(tmp_path, monkeypatch):
    steps = ["--epochs", "1"]  # 34 training entries: 8 batches
    grouped, _ = trained(tmp_path / "a", monkeypatch, *steps, "--pad-multiple", "1", steps=100)
    plain, _ = trained(tmp_path / "b", monkeypatch, *steps, "--pad-multiple", "1",
                       "--no-length-grouping", steps=100)
    assert len(grouped) == len(plain) == 8
    pads = [sum(int((r["inputs"] == PAD).sum()) for r in run) for run in (grouped, plain)]
    assert pads[0] < pads[1]


def test_full_head_runs_the_head_on_every_position(tmp_path, monkeypatch):
    rows, real = [], fast_step.HeadCrossEntropy  # on CPU the default head loss goes through it

    class Recording:
        @staticmethod
        def apply(hidden, *rest):
            if torch.is_grad_enabled():  # a training step, not an evaluation
                rows.append(len(hidden))
            return real.apply(hidden, *rest)
    monkeypatch.setattr(fast_step, "HeadCrossEntropy", Recording)
    default, _ = trained(tmp_path / "a", monkeypatch)
    assert rows == [int((d["targets"] != -100).sum()) for d in default] and len(rows) == 2
    full, _ = trained(tmp_path / "b", monkeypatch, "--full-head")
    for f in full:
        assert f["head_rows"] == f["inputs"].numel()


def test_untied_head_trains_a_head_of_its_own(tmp_path, monkeypatch):
    _, out = trained(tmp_path / "a", monkeypatch)
    _, out_untied = trained(tmp_path / "b", monkeypatch, "--untied-head")
    tied, _ = load_model(out / "model.pt")
    untied, cfg = load_model(out_untied / "model.pt")
    assert tied.out_head.weight is tied.tok_emb.weight
    assert cfg["tie_head"] is False
    assert not torch.equal(untied.out_head.weight, untied.tok_emb.weight)  # a copy, then trained


def fake_validation(monkeypatch, losses):
    """Validation losses in a given order (the weights still train with lr > 0)."""
    values = iter(losses)
    monkeypatch.setattr(train, "evaluate_model", lambda *a, **k: (1.0, next(values)))


@pytest.mark.parametrize("keep_last", [False, True])
def test_the_best_weights_are_restored_unless_keep_last(tmp_path, monkeypatch, keep_last):
    # evaluations at steps 0..5: the best (3.0) is at step 2, then it gets worse
    fake_validation(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.8, 3.9])
    flags = ["--eval-every", "1", "--patience", "0", "--save-every", "5",
             "--keep-last" if keep_last else "--no-keep-last"]
    seen, out = trained(tmp_path, monkeypatch, *flags, steps=5, weights=True)
    assert json.loads((out / "metrics.json").read_text())["best_step"] == 2
    saved = load_model(out / "model.pt")[0].state_dict()
    want = seen[-1 if keep_last else 1]["after"]  # the weights after step 5, or after step 2
    other = seen[1 if keep_last else -1]["after"]
    assert all(torch.equal(saved[k], want[k]) for k in want)
    assert not torch.equal(saved["tok_emb.weight"], other["tok_emb.weight"])  # lr > 0: they differ
    # the checkpoint at step 5 holds the best weights of step 2, or none: --keep-last copies none
    kept = torch.load(out / "checkpoint.pt", weights_only=True)["best_weights"]
    step_2 = seen[1]["after"]["tok_emb.weight"]
    assert kept is None if keep_last else torch.equal(kept["tok_emb.weight"], step_2)


def checkpoint_steps(monkeypatch) -> list[int]:
    steps = []
    real = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, model, opt, state, *a, **k:
                        (steps.append(state["step"]), real(path, model, opt, state, *a, **k)))
    return steps


def test_a_checkpoint_at_each_epoch_end_unless_no_checkpoint(tmp_path, monkeypatch):
    steps = checkpoint_steps(monkeypatch)
    _, out = trained(tmp_path / "a", monkeypatch, "--epochs", "1", steps=100)
    assert steps == [8] and (out / "checkpoint.pt").exists()
    steps.clear()
    _, out = trained(tmp_path / "b", monkeypatch, "--epochs", "1", "--no-checkpoint", steps=100)
    assert steps == [] and not (out / "checkpoint.pt").exists()


def test_save_every_2_writes_a_checkpoint_every_second_step(tmp_path, monkeypatch):
    steps = checkpoint_steps(monkeypatch)
    trained(tmp_path, monkeypatch, "--save-every", "2", steps=5)
    assert steps == [2, 4]
