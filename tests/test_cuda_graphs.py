"""fast/cuda_graphs.GraphedTraining: the step a CUDA graph records, checked against the book's step.

On CPU the step runs eagerly (capture=False): the same arithmetic the graph records (in-place
gradients, a tensor learning rate, AdamW state made up front, the skip flag), compared with
train.train_step. With a GPU the recorded graphs are compared with that eager step too.
"""
import copy
from dataclasses import asdict

import pytest
import torch

from fast.cuda_graphs import GraphedTraining, prepare_optimizer
from gpt import GPTModel
from train import RunState, calc_loss_batch, train_step
from training.checkpoint import load_checkpoint, save_checkpoint

SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
FULL_HEAD = calc_loss_batch  # the book's loss: the head on every position


def set_lr(optimizer, lr: float) -> None:
    """What train.train_model does before each step (a schedule's rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch(rows: int, length: int, seed: int, masked: int = 2):
    """Random tokens; the last `masked` targets of each row are padding (-100)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, SMALL["vocab_size"], (rows, length), generator=g)
    targets = torch.randint(0, SMALL["vocab_size"], (rows, length), generator=g)
    targets[:, length - masked:] = -100
    return inputs, targets


def two_runs(device="cpu", cfg=SMALL):
    """The same model and fused AdamW twice: one for the book's step, one for the graphed one."""
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device)
    other = copy.deepcopy(model)
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1,  # noqa: E731
                                       fused=True)
    return (model, make(model)), (other, make(other))


def assert_same_weights(a, b, **tolerance):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name, **tolerance)


def test_eager_replica_of_the_recorded_step_trains_as_the_book_step():
    (book, book_opt), (model, opt) = two_runs()
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16=False)
    assert not graphed.capture  # CPU: eager
    for i, (rows, length) in enumerate([(4, 8), (4, 12), (4, 8), (3, 12)]):
        inputs, targets = batch(rows, length, seed=i)
        rate = 1e-2 / (i + 1)  # a schedule: each step's rate must reach the update
        set_lr(book_opt, rate)
        set_lr(opt, rate)
        expected, n = train_step(book, book_opt, inputs, targets, "cpu", loss_fn=FULL_HEAD)
        loss, n_graphed = graphed.step(inputs, targets)
        assert n_graphed == n == rows * (length - 2)
        assert loss == pytest.approx(expected, rel=1e-5)
    # train_step uses the plain attention kernel on CPU, the graph step the fused one: the key
    # biases, whose gradient is zero but for rounding (~1e-12), get AdamW's normalised noise, up
    # to ~1e-5 at these rates; a rate not applied or an update skipped would be ~1e-3
    assert_same_weights(book, model, rtol=1e-4, atol=2e-5)
    # the optimizer state a checkpoint saves: 4 steps counted, the same moments
    state = opt.state_dict()["state"]
    assert all(float(s["step"]) == 4 for s in state.values())
    for p, q in zip(book.parameters(), model.parameters()):
        torch.testing.assert_close(book_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-9)


def test_a_loss_that_is_not_finite_never_touches_the_weights_or_adamw_state():
    (_, _), (model, opt) = two_runs()
    poisoned = lambda *a: FULL_HEAD(*a) * float("nan")  # noqa: E731
    graphed = GraphedTraining(model, opt, poisoned, bf16=False)
    before = copy.deepcopy(model.state_dict())
    loss, _ = graphed.step(*batch(2, 8, seed=0))
    assert loss != loss  # NaN comes back, for train_model to stop the run
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for s in opt.state.values():
        assert float(s["step"]) == 0 and not s["exp_avg"].any()


def test_a_batch_without_targets_is_skipped():
    (_, _), (model, opt) = two_runs()
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16=False)
    before = copy.deepcopy(model.state_dict())
    assert graphed.step(*batch(2, 6, seed=0, masked=6)) == (0.0, 0)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_prepared_optimizer_reads_its_rate_from_one_tensor_that_each_step_fills():
    (model, opt), _ = two_runs()
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16=False)
    rate = opt.param_groups[0]["lr"]
    assert torch.is_tensor(rate) and float(rate) == pytest.approx(1e-3)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    set_lr(opt, 0.25)  # the loop sets a number ...
    graphed.step(*batch(2, 8, seed=0))
    assert opt.param_groups[0]["lr"] is rate and float(rate) == 0.25  # ... the step fills it in


def test_an_unfused_optimizer_is_refused():
    model = GPTModel(SMALL)
    with pytest.raises(ValueError, match="fused AdamW"):
        prepare_optimizer(torch.optim.AdamW(model.parameters()))


def test_evaluation_loss_is_the_book_loss():
    (model, opt), _ = two_runs()
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16=False)
    inputs, targets = batch(3, 10, seed=5)
    model.eval()
    with torch.no_grad():
        expected = calc_loss_batch(inputs, targets, model, "cpu")
        assert graphed.loss(inputs, targets, model, "cpu").item() == pytest.approx(expected.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs: needs a GPU")
@pytest.mark.parametrize("bf16", [False, True])
def test_recorded_graphs_train_and_evaluate_as_the_eager_step(bf16):
    # no qkv bias: the key bias's gradient is zero but for rounding, which differs from run to
    # run on a GPU (atomic adds) and which AdamW scales up to the learning rate
    (eager_model, eager_opt), (model, opt) = two_runs("cuda", dict(SMALL, qkv_bias=False))
    eager = GraphedTraining(eager_model, eager_opt, FULL_HEAD, bf16, capture=False)
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16)
    shapes = [(4, 8), (4, 16), (4, 8), (2, 16), (4, 16), (4, 8)]  # replays of recorded shapes
    for i, (rows, length) in enumerate(shapes):
        inputs, targets = batch(rows, length, seed=i)
        set_lr(eager_opt, 1e-3 / (i + 1))
        set_lr(opt, 1e-3 / (i + 1))
        expected, _ = eager.step(inputs.pin_memory(), targets.pin_memory())
        loss, _ = graphed.step(inputs.pin_memory(), targets.pin_memory())
        assert loss == pytest.approx(expected, rel=1e-3 if bf16 else 1e-5)
    assert len(graphed.graphs) == 3
    assert_same_weights(eager_model, model, rtol=1e-2 if bf16 else 1e-4,
                        atol=1e-4 if bf16 else 1e-5)
    model.eval()
    eager_model.eval()
    with torch.no_grad():
        for i, (rows, length) in enumerate([(4, 8), (4, 8), (3, 24)]):
            inputs, targets = batch(rows, length, seed=10 + i)
            expected = eager._forward_loss(inputs.cuda(), targets.cuda())  # eager, same autocast
            got = graphed.loss(inputs, targets, model, "cuda")
            assert got.item() == pytest.approx(expected.item(), rel=1e-3 if bf16 else 1e-5)


def test_a_checkpoint_of_a_graphed_run_resumes_with_a_plain_optimizer(tmp_path):
    (model, opt), (other, other_opt) = two_runs()
    graphed = GraphedTraining(model, opt, FULL_HEAD, bf16=False)
    graphed.step(*batch(2, 8, seed=0))
    cfg = dict(SMALL, name="small")
    save_checkpoint(tmp_path / "c.pt", model, opt, asdict(RunState(step=1)), None, cfg)
    load_checkpoint(tmp_path / "c.pt", other, other_opt, cfg)
    group = other_opt.param_groups[0]
    assert type(group["lr"]) is float and group["capturable"] is False  # not the graph's own
    set_lr(other_opt, 1e-3)  # the book's step takes it from here, on any device
    assert train_step(other, other_opt, *batch(2, 8, seed=1), "cpu", loss_fn=FULL_HEAD)[1] == 12
    assert all(float(s["step"]) == 2 for s in other_opt.state.values())
