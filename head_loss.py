"""The output head's cross-entropy a slice of the logits at a time: calc_loss_batch's default on
CPU (train.py), where it made training steps 1.18x faster (README, Performance)."""
import torch
import torch.nn.functional as F

from collate import padded_length

HEAD_CHUNK = 128  # rows of logits at a time in fp32 (128 x 50257 x 4 bytes is 26 MB)
VOCAB_CHUNK = 8192  # rows of the head's weight at a time: 8192 x 768 bf16 is 13 MB


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T`, without their fp32 copy.

    Same value and gradients as `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`.
    The logits are made in the matmul's dtype (bf16 under autocast), a slice of the vocabulary
    at a time, so the weight is never copied whole; `chunk` rows at a time then go to fp32 for
    the softmax, and their logits are overwritten by their gradient (softmax minus one-hot),
    which backward uses. `apply(hidden, weight, targets, chunk, keep_grad)`: keep_grad=False,
    for evaluation under `torch.no_grad()`, skips preparing that gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, keep_grad=True):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else hidden.dtype
        # zero rows up to a multiple of `chunk`: the matmuls see a few shapes, not one per
        # target count (on CPU each new shape costs kernels that stay in memory)
        n = len(hidden)
        h = F.pad(hidden.to(dtype), (0, 0, 0, padded_length(n, chunk) - n))
        logits = torch.empty(len(h), len(weight), dtype=dtype, device=h.device)
        for v in range(0, len(weight), VOCAB_CHUNK):
            logits[:, v:v + VOCAB_CHUNK] = h @ weight[v:v + VOCAB_CHUNK].to(dtype).T
        loss = torch.zeros((), device=h.device)
        for start in range(0, n, chunk):
            t = targets[start:start + chunk]
            block = logits[start:start + len(t)].float()
            rows = torch.arange(len(t), device=h.device)
            log_norm = torch.logsumexp(block, dim=1)
            loss += (log_norm - block[rows, t]).sum()
            if keep_grad:
                probs = block.sub_(log_norm[:, None]).exp_()
                probs[rows, t] -= 1
                logits[start:start + len(t)] = probs
        logits[n:] = 0  # the zero rows have no loss, so no gradient
        ctx.save_for_backward(h, weight, logits if keep_grad else None)
        ctx.hidden_dtype, ctx.rows = hidden.dtype, n
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, grad_logits = ctx.saved_tensors
        h = h * grad_loss.to(h.dtype)  # scale the small factor, not the (rows, vocab) one
        grad_hidden = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        # the weight's gradient is as large as the embedding: fill it a slice of the vocabulary
        # at a time, so it never exists twice (in the matmul's dtype and in the weight's)
        grad_weight = torch.empty_like(weight)
        for v in range(0, len(weight), VOCAB_CHUNK):
            grad_slice = grad_logits[:, v:v + VOCAB_CHUNK]
            grad_hidden += grad_slice @ weight[v:v + VOCAB_CHUNK].to(h.dtype)
            grad_weight[v:v + VOCAB_CHUNK] = grad_slice.T @ h
        grad_hidden = grad_hidden[:ctx.rows] * grad_loss
        return grad_hidden.to(ctx.hidden_dtype), grad_weight, None, None, None
