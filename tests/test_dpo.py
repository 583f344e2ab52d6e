import json
import math
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from extras import dpo
from extras import lora
from child_io import FRESH_TORCH_S, LineReader, quiet_env, terminal_ctrl_c
from gpt import GPTModel, load_model, read_checkpoint, save_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
# the real tokenizer's ids need the real vocabulary; the rest is kept tiny so the CLI runs fast
CLI_MODEL = dict(SMALL, vocab_size=50257, context_length=128, n_layers=1, name="tiny",
                 prompt_style="alpaca")


def test_compute_dpo_loss_on_hand_computed_logprobs():
    loss, chosen, rejected = dpo.compute_dpo_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0]),   # policy chosen, rejected
        torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -3.0]), beta=0.1)  # reference
    # pair 1: (-1 - -2) - (-1.5 - -1.5) = 1 -> -logsigmoid(0.1) = ln(1 + e^-0.1) = 0.644397
    # pair 2: 0 - 0 = 0 -> ln 2 = 0.693147; mean 0.668772
    assert loss.item() == pytest.approx(0.668772, abs=1e-6)
    # chosen: 0.1 * (-1 - -1.5) = 0.05 and 0 -> 0.025; rejected: 0.1 * (-2 - -1.5) = -0.05 and 0
    assert chosen.item() == pytest.approx(0.025) and rejected.item() == pytest.approx(-0.025)


def test_compute_logprobs_averages_the_selected_tokens_only():
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [0.0, 0.0], [5.0, 5.0]]])  # position 2 predicts nothing
    labels = torch.tensor([[0, 1, 0]])  # position t predicts labels[t + 1]
    # position 0 -> label 1: softmax([0, ln 3]) = [1/4, 3/4], log 3/4 = -0.287682
    # position 1 -> label 0: log 1/2 = -0.693147; both selected: mean -0.490415
    both = dpo.compute_logprobs(logits, labels, torch.tensor([[False, True, True]]))
    assert both.item() == pytest.approx(-0.490415, abs=1e-6)
    last = dpo.compute_logprobs(logits, labels, torch.tensor([[False, False, True]]))
    assert last.item() == pytest.approx(-0.693147, abs=1e-6)  # the prompt token is masked


def test_collate_pairs_masks_prompt_and_padding():
    batch = [(([1, 2, 3], 2), ([1, 2, 4, 5], 2)), (([6, 7, 8, 9], 3), ([6, 7, 8], 3))]
    out = dpo.collate_pairs(batch, pad_token_id=0)
    # each response gets one end token (0 here), then rows are padded to the longest
    assert out["chosen"].tolist() == [[1, 2, 3, 0, 0], [6, 7, 8, 9, 0]]
    assert out["chosen_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert out["rejected"].tolist() == [[1, 2, 4, 5, 0], [6, 7, 8, 0, 0]]
    assert out["rejected_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]]
    cut = dpo.collate_pairs(batch, pad_token_id=0, allowed_max_length=3)
    assert cut["chosen"].shape == (2, 3) and cut["chosen_mask"].int().tolist() == [[0, 0, 1], [0, 0, 0]]


def fixed_batch():
    torch.manual_seed(1)
    items = [((torch.randint(0, 97, (9,)).tolist(), 4), (torch.randint(0, 97, (7,)).tolist(), 4))
             for _ in range(4)]
    return dpo.collate_pairs(items, pad_token_id=96)


def test_a_dpo_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    reference = dpo.FrozenReference(model)
    batch = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss, chosen, rejected = dpo.compute_dpo_loss_batch(batch, model, reference, beta=0.1)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.01 and all(a > b for a, b in zip(losses, losses[1:]))
    assert not any(p.requires_grad for p in reference.model.parameters())  # frozen, untouched


def test_lora_reference_is_the_base_model_without_a_copy():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    idx = torch.randint(0, 97, (2, 6))
    base_logits = model(idx).detach()
    lora.add_lora(model, 2, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    reference = dpo.FrozenReference(model, lora)
    assert reference.model is model
    mask = torch.ones_like(idx, dtype=torch.bool)
    torch.testing.assert_close(reference.logprobs(idx, mask),
                               dpo.compute_logprobs(base_logits, idx, mask))
    assert not torch.allclose(model(idx), base_logits)  # the adapters are on again


def test_response_logprobs_equal_the_books_full_logits_way():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batch = fixed_batch()
    for key in ("chosen", "rejected"):
        ids, mask = batch[key], batch[f"{key}_mask"]
        torch.testing.assert_close(dpo.response_logprobs(model, ids, mask),
                                   dpo.compute_logprobs(model(ids), ids, mask))


@pytest.mark.parametrize("change,problem", [
    ({"chosen": None}, "entry 1 has no 'chosen' field"),
    ({"rejected": "  "}, "entry 1 field 'rejected' is empty or only whitespace"),
    ({"rejected": "Good. "}, "entry 1 has the same text as 'chosen' and 'rejected'"),
    ({"instruction": ""}, "entry 1 field 'instruction' is empty or only whitespace"),
])
def test_unusable_preference_pairs_are_skipped_and_counted(tmp_path, change, problem):
    """A pair that cannot be used is skipped with one warning line naming it; a file with no
    usable pair left is refused naming the first problem."""
    entries = [{"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "No."},
               {"instruction": "Be nice.", "input": "", "chosen": "Good.", "rejected": "Bad."}]
    entries[1].update(change)
    entries[1] = {k: v for k, v in entries[1].items() if v is not None}
    path, said = tmp_path / "prefs.json", []
    path.write_text(json.dumps(entries))
    assert dpo.load_preferences(str(path), log=said.append) == entries[:1]
    assert said == [f"{path}: warning: skipped 1 of 2 entries that cannot be used: {problem}"
                    + said[0][len(f"{path}: warning: skipped 1 of 2 entries that cannot be used: "
                                  f"{problem}"):]]
    path.write_text(json.dumps(entries[1:]))
    with pytest.raises(ValueError) as info:
        dpo.load_preferences(str(path))
    assert str(info.value).startswith(f"{path}: {problem.replace('entry 1', 'entry 0')}")


def test_the_books_preference_file_loads_without_its_six_identical_pairs(tmp_path):
    """The book's instruction-data-with-preference.json has 6 pairs (of 1,100) whose chosen and
    rejected texts are the same; such pairs are written here at the book's indices."""
    same = {122, 226, 400, 566, 628, 676}
    entries = [{"instruction": f"Task {i}.", "input": "", "chosen": "Yes.",
                "rejected": "Yes." if i in same else "No."} for i in range(1100)]
    path, said = tmp_path / "book.json", []
    path.write_text(json.dumps(entries))
    assert len(dpo.load_preferences(str(path), log=said.append)) == 1094
    assert len(said) == 1 and "skipped 6 of 1100 entries" in said[0]
    assert "entry 122 has the same text as 'chosen' and 'rejected'" in said[0]


def write_inputs(tmp_path, n=40):
    torch.manual_seed(0)
    save_model(GPTModel(CLI_MODEL), CLI_MODEL, tmp_path / "model.pt")
    pairs = json.loads((ROOT / "data" / "preference-data.json").read_text())[:n]
    (tmp_path / "prefs.json").write_text(json.dumps(pairs))


def run_dpo(tmp_path, *extra, check=True):
    cmd = [sys.executable, str(ROOT / "extras" / "dpo.py"), "--model-path", str(tmp_path / "model.pt"),
           "--data", str(tmp_path / "prefs.json"), "--out-dir", str(tmp_path / "out"),
           "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--lr", "1e-3", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_dpo_run_writes_every_output(tmp_path):
    write_inputs(tmp_path)
    result = run_dpo(tmp_path, "--max-steps", "4", "--max-new-tokens", "3")
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4]
    first = metrics["history"][0]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference
    assert first["val_margin"] == pytest.approx(0.0, abs=1e-3)
    assert "reached --max-steps 4" in result.stdout and "margin" in result.stdout
    responses = json.loads((out / "preference-data-with-response.json").read_text())
    assert len(responses) == 4 and all(isinstance(r["model_response"], str) for r in responses)
    model, cfg = load_model(out / "model.pt")
    assert cfg == CLI_MODEL
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow  # over 20 s on 2 cores
def test_dpo_with_lora_checkpoints_adapters_resumes_and_saves_a_plain_model(tmp_path):
    write_inputs(tmp_path)
    run_dpo(tmp_path, "--lora-rank", "2", "--max-steps", "2", "--save-every", "2", "--no-generate")
    ckpt = read_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ckpt["policy"] and all(k.endswith((".A", ".B")) for k in ckpt["policy"])
    assert ckpt["source"]["lora"] == [2, 16.0, None] and len(ckpt["source"]["sha256"]) == 64
    resumed = run_dpo(tmp_path, "--lora-rank", "2", "--max-steps", "4", "--resume", "--no-generate")
    assert "resumed from" in resumed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4]
    load_model(tmp_path / "out" / "model.pt")  # plain: no adapter tensors left
    other = run_dpo(tmp_path, "--max-steps", "4", "--resume", check=False)  # not a LoRA run
    assert other.returncode == 2 and "written for another start" in other.stderr


def test_a_preference_file_with_no_usable_pair_exits_2_with_one_line_and_writes_nothing(tmp_path):
    write_inputs(tmp_path, n=3)
    entries = json.loads((tmp_path / "prefs.json").read_text())
    for entry in entries:
        entry["rejected"] = entry["chosen"]
    (tmp_path / "prefs.json").write_text(json.dumps(entries))
    result = run_dpo(tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'prefs.json'}: entry 0 has the same text as 'chosen' and 'rejected' "
        f"(nothing to prefer) (and the 2 others)"]
    assert not (tmp_path / "out").exists()  # the folder is made only once the inputs are right


def test_make_preferences_regenerates_the_committed_file_byte_for_byte(tmp_path):
    script = ROOT / "data" / "make_preferences.py"
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=FRESH_TORCH_S)
    assert out.returncode == 0, out.stderr
    committed = ROOT / "data" / "preference-data.json"
    assert (tmp_path / "p.json").read_bytes() == committed.read_bytes()
    pairs = json.loads(committed.read_text())
    source = json.loads((ROOT / "data" / "instruction-data.json").read_text())
    assert [p["instruction"] for p in pairs] == [e["instruction"] for e in source]  # same split
    assert all(p["chosen"] == p["output"] and not dpo.preference_problem(p) for p in pairs)


def test_evaluation_at_the_start_gives_ln2_zero_rewards_and_no_reward_wins():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batch = fixed_batch()
    with torch.no_grad():
        pi_c = dpo.response_logprobs(model, batch["chosen"], batch["chosen_mask"])
        pi_r = dpo.response_logprobs(model, batch["rejected"], batch["rejected_mask"])
    out = dpo.evaluate_dpo([batch], model, dpo.FrozenReference(model), 0.1, 0,
                           nullcontext)
    # policy == reference: every pair's loss is ln 2, rewards 0, each reward comparison a tie
    assert out["loss"] == pytest.approx(math.log(2)) and out["margin"] == 0.0
    assert out["reward_accuracy"] == 0.0
    assert out["accuracy"] == (pi_c > pi_r).float().mean().item()


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    write_inputs(tmp_path)
    cmd = [sys.executable, str(ROOT / "extras" / "dpo.py"), "--model-path", str(tmp_path / "model.pt"),
           "--data", str(tmp_path / "prefs.json"), "--out-dir", str(tmp_path / "out"),
           "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--max-steps", "4",
           "--no-generate"]
    # without PYTHONUNBUFFERED the line reaches the pipe mid-run only if dpo.py flushes it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=quiet_env(), preexec_fn=terminal_ctrl_c)
    try:  # interrupt once the first evaluation is printed
        LineReader(proc.stdout).wait_for(lambda line: line.startswith("ep 1 step    0/4"))
        assert proc.poll() is None  # the run is still going
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=FRESH_TORCH_S)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130 and "continue with --resume" in err
    assert (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "model.pt").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "reached --max-steps 4" in resumed.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 4
