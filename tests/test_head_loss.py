"""head_loss.HeadCrossEntropy, the CPU default of calc_loss_batch: the output head's cross-entropy a
slice of the logits at a time, against F.cross_entropy, with hand-checked values."""
import math

import pytest
import torch
import torch.nn.functional as F

import head_loss
import train
from gpt import GPTModel
from head_loss import HeadCrossEntropy

# more rows than one slice of the head's weight (VOCAB_CHUNK), the last slice partial, so the
# slicing loops in HeadCrossEntropy's forward and backward run three times
VOCAB = 2 * head_loss.VOCAB_CHUNK + 17
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def test_chunked_head_loss_of_zero_weights_is_log_vocab_per_row():
    # all logits 0: each row's loss is ln(4), and d loss / d logits = 1/4 - one-hot
    hidden = torch.randn(5, 3, requires_grad=True)
    weight = torch.zeros(4, 3, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 3])
    loss = HeadCrossEntropy.apply(hidden, weight, targets, 2)
    assert loss.item() == pytest.approx(5 * math.log(4))
    loss.backward()
    grad_logits = torch.full((5, 4), 0.25) - F.one_hot(targets, 4)
    torch.testing.assert_close(weight.grad, grad_logits.T @ hidden.detach())
    torch.testing.assert_close(hidden.grad, torch.zeros(5, 3))  # grad_logits @ zero weights


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_head_loss_equals_cross_entropy_in_value_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    targets = torch.tensor([3, VOCAB - 1, head_loss.VOCAB_CHUNK, 8000, 9000, VOCAB - 10, 0])
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    expected = torch.autograd.grad(2 * reference, (hidden, weight))
    loss = HeadCrossEntropy.apply(hidden, weight, targets, chunk)
    torch.testing.assert_close(loss, reference)
    # fp32 sums over 16,401 vocabulary rows in another order: measured up to 1.3e-5 (of ~1.5)
    for got, want in zip(torch.autograd.grad(2 * loss, (hidden, weight)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_chunked_head_loss_without_gradient_gives_the_same_value():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 16), torch.randn(VOCAB, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (7,))
    with torch.no_grad():
        loss = HeadCrossEntropy.apply(hidden, weight, targets, 3, False)
        reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(loss, reference)


def test_chunked_head_loss_under_bf16_autocast_matches_autocast_cross_entropy(monkeypatch):
    monkeypatch.setattr(head_loss, "VOCAB_CHUNK", 16)  # 50 rows: four slices, the last of 2
    torch.manual_seed(0)
    hidden = torch.randn(9, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
        loss = HeadCrossEntropy.apply(hidden, weight, targets, 4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-4)  # measured 7.6e-6 of 94.3
    (got_h, got_w), (want_h, want_w) = (torch.autograd.grad(x, (hidden, weight))
                                        for x in (loss, reference))
    assert got_h.dtype == got_w.dtype == torch.float32
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)  # measured 0.0
    # the hidden gradient's matmul runs in bf16 on one side: measured 0.0135 (of up to 4.8)
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=0.03)


def test_the_cpu_default_equals_the_head_loss_in_one_piece_with_the_same_gradients():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    inputs, targets = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    targets[1, 4:] = -100
    results = []
    for sliced in (True, False):
        loss = train.calc_loss_batch(inputs, targets, model, "cpu", sliced_head=sliced)
        results.append((loss, torch.autograd.grad(loss, model.parameters())))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
