"""The faster training step: what replaces the book's `train_step` and `calc_loss_batch` in
train.py's default run (one visible line there: `make_step`). Same arithmetic, less work:

- the output head runs only on positions that have a target (`target_loss`): the book computes
  50257 logits at every position and ignores most of them;
- on CPU, that head's cross-entropy a slice of the logits at a time (`HeadCrossEntropy`);
- bf16 autocast where the hardware multiplies bf16 natively (`use_bf16`);
- on CPU, the plain attention kernel for rows of up to 128 tokens (`attention_kernel`);
- on CUDA, each batch shape's whole step recorded once as a CUDA graph (fast/cuda_graphs.py).
Flags turn them off (README, Differences from the book); what each buys, measured on which CPU
or GPU, is in docs/performance.md.
"""
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from collate import padded_length

HEAD_CHUNK = 128  # rows of logits at a time in fp32 (128 x 50257 x 4 bytes is 26 MB)
VOCAB_CHUNK = 8192  # rows of the head's weight at a time: 8192 x 768 bf16 is 13 MB
PLAIN_ATTENTION_MAX = 128  # longest rows for which the plain kernel trains faster on CPU


def make_step(model, optimizer, device, args, book_loss, book_step, dist=None, log=print):
    """(step, eval_loss) for train.train_model: `step(inputs, targets)` -> (loss, target tokens)
    and `eval_loss` with calc_loss_batch's signature. `book_loss` and `book_step` are train.py's
    calc_loss_batch and train_step (passed in: this wing never imports train.py); `dist` is
    extras/distributed.py's run under torchrun."""
    device = torch.device(device)
    if args.keep_memory:  # an opt-in trick (fast/tricks.py); CUDA has its own allocator
        from fast.tricks import keep_freed_memory
        if not (device.type == "cpu" and keep_freed_memory()):
            log("warning: --keep-memory changes nothing here (it needs the CPU and glibc's malloc)")
    bf16 = use_bf16(args.precision, device)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    if device.type == "cuda" and not (args.no_cuda_graphs or args.compile or dist
                                      or getattr(args, "lora_rank", 0)):
        return graphed_step(model, optimizer, book_loss, bf16, log)
    loss = book_loss if args.full_head else partial(target_loss, sliced=device.type == "cpu")
    if args.compile:  # the loss function, so that the model's forward pass and the head compile
        loss = torch.compile(loss, backend=args.compile)
    if dist:
        loss = dist.global_loss(loss)
    log(f"training step: {'compiled, ' if args.compile else ''}output head on "
        f"{'every position' if args.full_head else 'target positions'}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}")

    def fast_loss(input_batch, target_batch, model, device):
        with autocast(), attention_kernel(device, input_batch.shape[1]):
            return loss(input_batch, target_batch, model, device)
    return partial(book_step, model, optimizer, device=device, loss_fn=fast_loss,
                   count=dist.count_targets if dist else None), fast_loss


def graphed_step(model, optimizer, book_loss, bf16: bool, log=print):
    """On CUDA: each batch shape's whole step recorded once as a CUDA graph and replayed."""
    from fast.cuda_graphs import GraphedTraining  # CUDA only
    graphs = GraphedTraining(model, optimizer, book_loss, bf16)
    log(f"training step: CUDA graphs, output head on every position, "
        f"{'bf16 autocast' if bf16 else 'fp32'}")
    return graphs.step, graphs.loss


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware multiplies bf16 natively; the weights stay fp32. (An
    AVX2 CPU emulates bf16, ~100x slower than fp32: never there unless forced.)"""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def attention_kernel(device, seq_len: int):
    """On CPU, when training, the plain softmax(QK^T)V attention kernel for rows up to 128 tokens:
    the fused (flash) kernel's backward is slow on short rows there (9.5 ms against 5.5 ms for a
    GPT-2-small layer at 64 tokens). From 256 tokens, and on GPUs, the fused kernel wins."""
    if torch.device(device).type == "cpu" and seq_len <= PLAIN_ATTENTION_MAX \
            and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def target_loss(input_batch, target_batch, model, device, sliced: bool = False):
    """calc_loss_batch's value with the output head run only where a target is: the book's
    logits at every position are mostly ignored (padding; the prompt, with --mask-prompt).
    A batch with no targets gives 0.0, not NaN. `sliced`: HeadCrossEntropy (CPU)."""
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    keep = target_batch != -100
    hidden, targets = model.hidden(input_batch)[keep], target_batch[keep]  # (targets, emb_dim)
    if sliced:
        loss = HeadCrossEntropy.apply(hidden, model.out_head.weight, targets, HEAD_CHUNK,
                                      torch.is_grad_enabled())
    else:
        loss = F.cross_entropy(model.out_head(hidden), targets, reduction="sum")
    return loss / max(len(targets), 1)


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T`, without their fp32 copy: 1.18x
    faster training steps on CPU (docs/performance.md).

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
