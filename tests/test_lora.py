import json
import subprocess
import sys
from pathlib import Path

import torch

from extras import lora
import train
from training.files import TINY_PRETRAINED
from training.run import make_optimizer
from data import load_data
from gpt import GPTModel, load_model, model_config, read_checkpoint, save_model

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def wrapped(rank=4, alpha=2.0, targets=lora.TARGETS, seed=0):
    torch.manual_seed(seed)
    model = GPTModel(SMALL)
    base = GPTModel(SMALL)
    base.load_state_dict(model.state_dict())
    lora.add_lora(model, rank, alpha, targets)
    return model, base


def randomize_adapters(model):
    with torch.no_grad():  # B starts at zero; a trained adapter is not zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)


def test_lora_layer_computes_alpha_x_a_b():
    layer = lora.LoRALayer(2, 3, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0], [2.0]]))
        layer.B.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    # x = [3, 4]: x @ A = 3 + 8 = 11; times B = [11, 0, -11]; times alpha 2 = [22, 0, -22]
    assert layer(torch.tensor([[3.0, 4.0]])).tolist() == [[22.0, 0.0, -22.0]]
    assert layer.delta().tolist() == [[2.0, 4.0], [0.0, 0.0], [-2.0, -4.0]]


def test_wrapped_model_equals_the_plain_model_at_initialisation():
    model, base = wrapped()
    idx = torch.randint(0, 97, (2, 7))
    assert torch.equal(model(idx), base(idx))
    assert all(torch.equal(m.lora[0].B, torch.zeros_like(m.lora[0].B))
               for m in lora.lora_modules(model))


def test_trainable_count_matches_the_books_exercise_7_4_for_gpt2_medium():
    with torch.device("meta"):  # shapes only: no 355M weights allocated
        model = GPTModel(model_config("gpt2-medium"))
        n = lora.add_lora(model, 16, 16)
    # per block, rank 16 adds 16 * (in + out): q, k, v, out_proj 4 * 16 * 2048 = 131,072;
    # fc and proj 2 * 16 * (1024 + 4096) = 163,840; 24 blocks: 7,077,888; the head
    # 16 * (1024 + 50257) = 820,496; total 7,898,384, the book's figure
    assert n == 7_898_384
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n


def test_targets_pick_the_layers_and_unknown_ones_are_refused():
    model, _ = wrapped(rank=2, targets=("fc",))
    # fc is 16 -> 64 in both blocks: 2 * 2 * (16 + 64) = 320
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 320
    assert type(model.out_head) is torch.nn.Linear and type(model.tok_emb) is torch.nn.Embedding
    try:
        lora.add_lora(GPTModel(SMALL), 2, 1.0, ("qkv", "w_query"))
    except ValueError as e:
        assert "'w_query'" in str(e)
    else:
        raise AssertionError("an unknown target was accepted")


def test_training_changes_only_the_adapters_and_they_alone_have_optimizer_state():
    model, _ = wrapped()
    opt = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert opt.param_groups[0]["params"] == trainable  # frozen weights get no AdamW state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, targets = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    for _ in range(3):
        train.train_step(model, opt, inputs, targets, "cpu")
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(lora.lora_state(model))  # every adapter moved, no base weight did


def test_merged_model_gives_the_logits_of_the_adapted_one_and_stays_tied(tmp_path):
    model, _ = wrapped()
    randomize_adapters(model)
    idx = torch.randint(0, 97, (3, 9))
    adapted = model(idx)
    with torch.no_grad():  # the loss path reads the head as a weight: same logits
        torch.testing.assert_close(model.hidden(idx) @ model.out_head.weight.T, adapted)
    merged = lora.merge_lora(model)
    assert not lora.lora_modules(merged) and merged.out_head.weight is merged.tok_emb.weight
    torch.testing.assert_close(merged(idx), adapted, rtol=1e-5, atol=1e-5)
    save_model(merged, SMALL, tmp_path / "model.pt")  # a plain model file, as any other
    loaded, _ = load_model(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(idx), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_disabled_gives_the_base_model():
    model, base = wrapped()
    randomize_adapters(model)
    idx = torch.randint(0, 97, (2, 6))
    assert not torch.allclose(model(idx), base(idx))
    with lora.adapters_disabled(model):
        assert torch.equal(model(idx), base(idx))
    assert not torch.allclose(model(idx), base(idx))  # switched on again


def run_train(tmp_path, *extra, check=True):
    data = tmp_path / "slice.json"
    data.write_text(json.dumps(load_data(ROOT / "data" / "instruction-data.json")[:60]))
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "tiny", "--data", str(data),
           "--batch-size", "4", "--out-dir", str(tmp_path / "out"), "--no-generate",
           "--lora-rank", "4", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_train_lora_checkpoint_holds_only_adapters_resumes_and_saves_a_merged_model(tmp_path):
    first = run_train(tmp_path, "--max-steps", "4", "--eval-every", "2", "--save-every", "4",
                      "--lr", "1e-2")
    assert "LoRA rank 4, alpha 16.0 on qkv, out_proj, fc, proj, out_head" in first.stdout
    ckpt = read_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert ckpt["format"] == "gpt2-instruct-lora-checkpoint" and "model" not in ckpt
    assert all(name.endswith((".A", ".B")) for name in ckpt["lora"])
    assert ckpt["base"]["path"] == str(TINY_PRETRAINED)  # tiny: the shipped pretrained file
    assert len(ckpt["base"]["sha256"]) == 64
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["lora"])

    resumed = run_train(tmp_path, "--max-steps", "6", "--eval-every", "2", "--lr", "1e-2",
                        "--resume", "--keep-last")  # the best may be the pretrained start
    assert "resumed from" in resumed.stdout and "reached --max-steps 6" in resumed.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4, 6]
    model, cfg = load_model(tmp_path / "out" / "model.pt")  # plain, merged
    assert cfg["name"] == "tiny" and model.out_head.weight is model.tok_emb.weight
    base, _ = load_model(TINY_PRETRAINED)  # the base differs from the merged model
    assert not torch.equal(base.trf_blocks[0].ff.fc.weight, model.trf_blocks[0].ff.fc.weight)


def test_resume_on_other_base_weights_is_refused(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--eval-every", "2", "--save-every", "2",
              "--from-scratch")
    result = run_train(tmp_path, "--max-steps", "4", "--resume", "--seed", "7", "--from-scratch",
                       check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out' / 'checkpoint.pt'}: its base weights (tiny, seeded) have "
        f"changed since the checkpoint was written"]
