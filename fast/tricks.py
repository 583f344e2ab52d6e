"""Opt-in training tricks, each doing a standard piece's arithmetic, measured in benchmarks/bench.py.

None of them is in train.py's default path: each bought under 10 % of speed or memory on the
machines measured (docs/performance.md). `keep_freed_memory` is `train.py --keep-memory`;
`AdamWInBackward` updates each weight during backward, so the gradients never all exist at once
(gradient clipping and accumulation then cannot work); `recast_saved_weights` keeps autocast's
bf16 weight copies out of the saved activations; `release_free_memory` hands back what the C
allocator keeps.
"""
import ctypes
import sys

import torch


def _pack_saved(tensor):
    """What autograd keeps of a tensor it saves for backward: a low-precision copy of a weight
    (or a view of one, e.g. a Linear's transposed weight) is kept as the weight itself."""
    base = tensor if tensor._base is None else tensor._base
    cast = base.grad_fn
    source = cast.next_functions[0][0] if type(cast).__name__ == "ToCopyBackward0" else None
    if not hasattr(source, "variable"):  # only a leaf's AccumulateGrad node has `variable`
        return tensor
    return source.variable, base.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()


def _unpack_saved(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    weight, dtype, size, stride, offset = packed
    return weight.to(dtype).as_strided(size, stride, offset)  # the same view of a fresh cast


def recast_saved_weights():
    """A context in which backward casts the weights again instead of keeping autocast's copies.

    Under bf16 autocast each Linear saves the bf16 copy of its weight until backward reaches
    it: 0.16 GiB for GPT-2 small, all alive when backward starts. Inside this context autograd
    keeps a reference to the fp32 weight and casts it again when backward needs it (the same
    values: the weight is not updated before its own gradient is complete, which comes after).
    Use it with `torch.autocast(..., cache_enabled=False)`, or autocast's cache keeps the copies.
    """
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)


def keep_freed_memory() -> bool:
    """Ask the C library (glibc's malloc) to keep the memory of freed tensors for the next ones.

    By default each tensor over 32 MB (gpt2-small's embedding gradient is 154 MB, a bf16 copy of
    its weights 77 MB) gets fresh pages from the kernel and returns them when freed, so the next
    one of its size faults them in again, a page at a time: about 170,000 page faults a training
    step on CPU. Without mmap and trimming, freed memory is reused: 6-9 % faster steps for up to
    7 % more peak memory (docs/performance.md), so it is `train.py --keep-memory`, not a default.
    Process wide; False where there is no glibc `mallopt` (macOS, musl: nothing changes there).
    """
    try:
        libc = ctypes.CDLL(None)  # the running process's own C library
    except (OSError, TypeError):  # Windows has no such handle
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc has it, musl does not
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Return the memory that glibc's malloc holds free to the system (elsewhere: nothing).

    glibc keeps freed blocks mapped for reuse, and the next step's blocks do not always fit the
    holes. Called once a step, the peak is closer to what the step needs: 0.03 GiB lower for
    6 % of the speed in the last measurement (docs/performance.md).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class AdamWInBackward:
    """AdamW that updates each weight as soon as backward has finished its gradient, then frees it.

    The arithmetic of `loss.backward(); optimizer.step()` (AdamW's update of a weight reads
    only that weight's gradient), but the gradients, as large as the model, never all exist at
    once. `step()` and `zero_grad()` have nothing left to do, so a training loop written for a
    usual optimizer runs unchanged. The hooks stay on the weights until `remove()`: every
    backward through them is a training step.
    """

    def __init__(self, params, **adamw_kwargs):
        self.optimizers = {p: torch.optim.AdamW([p], **adamw_kwargs)
                           for p in dict.fromkeys(params)}  # a tied weight once
        self.hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self.optimizers]

    def _update(self, param):  # autograd calls it once the weight's gradient is complete
        self.optimizers[param].step()
        param.grad = None

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def state_dict(self) -> dict:
        return {"per_weight": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        if "per_weight" not in state:
            raise ValueError("optimizer state of another optimizer, not of AdamWInBackward")
        if len(state["per_weight"]) != len(self.optimizers):
            raise ValueError(f"optimizer state for {len(state['per_weight'])} weights, "
                             f"the model has {len(self.optimizers)}")
        for opt, opt_state in zip(self.optimizers.values(), state["per_weight"]):
            opt.load_state_dict(opt_state)
