"""fast/tricks.py: each opt-in trick against the standard piece it replaces, with hand-checked
values; --keep-memory's page reuse."""
import copy
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fast import tricks as fastpath
from fast.tricks import AdamWInBackward, recast_saved_weights, release_free_memory
from gpt import GPTModel

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}


def adamw(model, in_backward=True):
    kwargs = dict(lr=1e-2, weight_decay=0.1, fused=True)
    return AdamWInBackward(model.parameters(), **kwargs) if in_backward \
        else torch.optim.AdamW(model.parameters(), **kwargs)


def lm_loss(model, inputs, targets):
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def step(model, optimizer, inputs, targets):
    """The usual training step, written for a usual optimizer."""
    optimizer.zero_grad(set_to_none=True)
    lm_loss(model, inputs, targets).backward()
    optimizer.step()


def small_batches(n):
    torch.manual_seed(1)
    return [(torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))) for _ in range(n)]


def test_adamw_in_backward_takes_the_same_steps_as_adamw_after_backward():
    models = {}
    for in_backward in (False, True):
        torch.manual_seed(0)
        model = models[in_backward] = GPTModel(SMALL)  # tied head: one weight, two gradients
        opt = adamw(model, in_backward)
        for inputs, targets in small_batches(3):
            step(model, opt, inputs, targets)
    torch.manual_seed(0)
    start = GPTModel(SMALL).state_dict()
    for name, weight in models[True].state_dict().items():
        torch.testing.assert_close(weight, models[False].state_dict()[name], rtol=0, atol=1e-6)
        assert not torch.equal(weight, start[name])  # every weight took its steps


def test_adamw_in_backward_frees_each_gradient_and_stops_after_remove():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    opt = adamw(model)
    inputs, targets = small_batches(1)[0]
    lm_loss(model, inputs, targets).backward()
    assert all(p.grad is None for p in model.parameters())
    opt.remove()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lm_loss(model, inputs, targets).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_adamw_in_backward_state_resumes_exactly_and_refuses_another_model():
    batches = small_batches(4)
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    opt = adamw(model)
    for inputs, targets in batches[:2]:
        step(model, opt, inputs, targets)
    resumed = GPTModel(SMALL)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = adamw(resumed)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a file
    for m, o in ((model, opt), (resumed, resumed_opt)):
        for inputs, targets in batches[2:]:
            step(m, o, inputs, targets)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name])
    other = adamw(GPTModel(dict(SMALL, n_layers=1)))
    with pytest.raises(ValueError, match="optimizer state for"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(adamw(model, in_backward=False).state_dict())


# ---- recast_saved_weights ------------------------------------------------------------------
def test_a_saved_cast_of_a_weight_or_a_view_of_one_is_kept_as_the_weight():
    weight = torch.randn(3, 5, requires_grad=True)
    for saved in (weight.to(torch.bfloat16), weight.to(torch.bfloat16).T):
        packed = fastpath._pack_saved(saved)
        assert packed[0] is weight
        again = fastpath._unpack_saved(packed)
        assert again.dtype == torch.bfloat16 and again.stride() == saved.stride()
        assert torch.equal(again, saved)
    activation = (weight * 2).to(torch.bfloat16)  # a cast, but not of a leaf: kept as it is
    for kept in (weight, activation, torch.randn(2)):
        assert fastpath._pack_saved(kept) is kept and fastpath._unpack_saved(kept) is kept


def test_under_autocast_every_linear_weight_copy_is_recast_with_the_same_gradients():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    inputs, targets = small_batches(1)[0]
    recast = []

    def counting_pack(tensor):
        packed = fastpath._pack_saved(tensor)
        if isinstance(packed, tuple):
            recast.append(packed[0])
        return packed

    grads = []
    for hooks in (None, (counting_pack, fastpath._unpack_saved)):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else nullcontext():
            loss = lm_loss(model, inputs, targets)
        grads.append(torch.autograd.grad(loss, model.parameters()))
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m is not model.out_head]  # the tied head's weight is saved by F.linear too
    assert {id(w) for w in recast} >= {id(w) for w in linears}
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # the same bf16 values, cast twice


def test_recast_saved_weights_trains_like_autocast_with_its_cache():
    losses = []
    for recast in (False, True):
        torch.manual_seed(0)
        model = GPTModel(SMALL)
        opt = adamw(model)
        for inputs, targets in small_batches(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=not recast), \
                    recast_saved_weights() if recast else nullcontext():
                loss = lm_loss(model, inputs, targets)
            loss.backward()
            losses.append(loss.item())
    assert losses[:3] == losses[3:]


# ---- release_free_memory -------------------------------------------------------------------
def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


OTHER_ALLOCATOR = any(name in os.environ.get("LD_PRELOAD", "")
                      for name in ("jemalloc", "tcmalloc", "mimalloc"))


@pytest.mark.skipif(fastpath._MALLOC_TRIM is None, reason="needs glibc's malloc_trim")
@pytest.mark.skipif(OTHER_ALLOCATOR, reason="glibc's malloc_trim cannot shrink another allocator's "
                                            "heap (LD_PRELOAD)")
def test_release_free_memory_hands_freed_heap_blocks_back():
    # 100 KB blocks come from the heap; the last one alive pins it, so free() alone returns
    # nothing of the 150 MB before it
    blocks = [torch.ones(25_000) for _ in range(1500)]
    del blocks[:-1]
    before = resident_bytes()
    release_free_memory()
    assert before - resident_bytes() > 100 * 2**20


KEPT = """
import sys, torch
sys.path.insert(0, {root!r})
from fast.tricks import keep_freed_memory
def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmRSS:"))
if {keep}:
    assert keep_freed_memory()
before = rss()
x = torch.ones(16 * 2**20)  # 64 MB, faulted in
del x
print(rss() - before)
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "gnu_get_libc_version"),
                    reason="glibc's malloc only")
def test_keep_freed_memory_keeps_a_freed_tensors_pages_for_the_next_ones():
    """By default glibc maps a 64 MB block for the tensor and unmaps it when it is freed: the
    next tensor faults its pages in again. With --keep-memory the block stays in the process
    (measured: 1.4 MB left without, 65.4 MB with). Whether the next tensor reuses those pages
    depends on how malloc splits its free blocks; the speed it buys is measured in
    benchmarks/bench.py, not asserted here."""
    kept = {keep: int(subprocess.run([sys.executable, "-c", KEPT.format(root=str(ROOT), keep=keep)],
                                     capture_output=True, text=True, check=True).stdout)
            for keep in (False, True)}
    assert kept[False] < 16 * 2**20 and kept[True] > 60 * 2**20, kept
