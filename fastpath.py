"""The training fast path's two drop-in pieces, each doing a standard one's arithmetic.

`HeadCrossEntropy` is `F.cross_entropy` over the output head that never holds all the logits in
fp32; `AdamWInBackward` is `torch.optim.AdamW` that updates each weight during backward, so the
gradients never all exist at once. train.py uses both; the tests check each against the
standard piece it replaces. Measured gains: README, Performance.
"""
import torch

VOCAB_CHUNK = 8192  # rows of the head's weight gradient at a time: 8192 x 768 bf16 is 13 MB


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T`, `chunk` rows at a time.

    Same value and gradients as `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`,
    but the (rows, vocab) logits never exist in fp32: each chunk's logits become their gradient
    (softmax minus one-hot) at once, kept in the matmul's dtype for the backward pass. Under
    autocast the matmuls run in its dtype (bf16) and the softmax in fp32, as autocast would.
    `apply(hidden, weight, targets, chunk, keep_grad)`: keep_grad=False, for evaluation under
    `torch.no_grad()`, skips preparing that gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, keep_grad=True):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_logits = torch.empty(len(h), len(w) if keep_grad else 0, dtype=dtype,
                                  device=h.device)
        loss = torch.zeros((), device=h.device)
        for start in range(0, len(h), chunk):
            logits = (h[start:start + chunk] @ w.T).float()
            rows, t = torch.arange(len(logits), device=h.device), targets[start:start + chunk]
            log_norm = torch.logsumexp(logits, dim=1)
            loss += (log_norm - logits[rows, t]).sum()
            if not keep_grad:
                continue
            probs = logits.sub_(log_norm[:, None]).exp_()
            probs[rows, t] -= 1
            grad_logits[start:start + chunk] = probs
        ctx.save_for_backward(h, w, grad_logits)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, grad_logits = ctx.saved_tensors
        h = h * grad_loss.to(h.dtype)  # scale the small factor, not the (rows, vocab) one
        grad_hidden = (grad_logits @ w).to(ctx.dtypes[0]) * grad_loss
        # the weight's gradient is as large as the embedding: fill it a slice of the vocabulary
        # at a time, so it never exists twice (in the matmul's dtype and in the weight's)
        grad_weight = torch.empty(w.shape, dtype=ctx.dtypes[1], device=w.device)
        for start in range(0, len(w), VOCAB_CHUNK):
            grad_weight[start:start + VOCAB_CHUNK] = grad_logits[:, start:start + VOCAB_CHUNK].T @ h
        return grad_hidden, grad_weight, None, None, None


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
