"""The training step and the evaluation loss replayed as CUDA graphs: train.py's default on CUDA
(fast/step.py's `make_step` chooses it).

At the book's batch (8 rows of 40-80 tokens) a GPT-2-medium training step is a few milliseconds of
GPU arithmetic behind ~1,500 kernel launches, and launching them from Python takes longer than
running them: the GPU waits on the host. A CUDA graph records a step's launches once per batch
shape and replays them all with one call. A graph replays fixed memory addresses and no host
work, so the step here is written for that:
- each batch shape has its own input tensors, which every batch of that shape is copied into;
- gradients exist before the first capture and are zeroed and accumulated in place; AdamW's
  state is created up front, as its first step would create it;
- the output head runs on every position and cross_entropy ignores the -100 targets (the
  book's loss); the default head's selection of rows with a target has a data-dependent size;
- the learning rate is a tensor, not a number baked into the recorded kernels: the loop sets a
  number, which `step` copies into the tensor before each replay;
- a loss that is not finite is flagged on the GPU, and fused AdamW skips the whole update when
  the flag is set (its `found_inf`, the mechanism of torch's GradScaler): as in `train_step`,
  such a step never touches the weights;
- autocast keeps no cache of bf16 weight copies, which a replay would read stale.
Without `capture` (any device other than CUDA) the same step runs eagerly, which is how the
tests check it against the book's step on CPU.
"""
from functools import partial

import torch


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Make a fused AdamW safe to record: its state and the gradients allocated, the learning
    rate a tensor, and a flag tensor (`found_inf`) that skips the update when set."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            raise ValueError("CUDA graphs need a fused AdamW (torch.optim.AdamW(..., fused=True))")
        device = group["params"][0].device
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            state = optimizer.state[p]
            if not state:  # what AdamW's first step would create
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
    optimizer.found_inf = torch.zeros((), device=device)  # one device: the model's


class GraphedTraining:
    """`step(inputs, targets)` and `loss(...)` for train_model, each batch shape recorded once.

    `step` returns (loss, target tokens) as train.train_step does. `loss` has calc_loss_batch's
    signature: under torch.no_grad() (evaluation) it replays a graph of the forward pass and the
    loss; with gradients on it runs eagerly. `loss_fn` must need no host work (fast/step.py passes
    the book's calc_loss_batch: the head on every position). `capture=False` runs it all eagerly.
    """

    def __init__(self, model, optimizer, loss_fn, bf16: bool, capture: bool | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.autocast = partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                enabled=bf16, cache_enabled=False)
        prepare_optimizer(optimizer)
        self.rates = [group["lr"] for group in optimizer.param_groups]  # what the kernels read
        self.graphs = {}  # (step?, train mode?, batch shape) -> (graph, loss, inputs, targets)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    # ---- what one replay does --------------------------------------------------------------
    def _forward_loss(self, inputs, targets):
        with self.autocast():
            return self.loss_fn(inputs, targets, self.model, self.device)

    def _train(self, inputs, targets):
        """zero_grad, forward and loss, backward, the update unless the loss is not finite."""
        self.optimizer.zero_grad(set_to_none=False)  # in place: the addresses stay
        loss = self._forward_loss(inputs, targets)
        loss.backward()
        self.optimizer.found_inf.copy_(~torch.isfinite(loss))
        self.optimizer.step()
        return loss.detach()

    def _record(self, train: bool, inputs, targets):
        """Warm up on a side stream (cuBLAS and the attention kernels set up their workspaces;
        forward and backward only, so the weights stay as they are), then record."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if train:
                self._forward_loss(inputs, targets).backward()
            else:
                self._forward_loss(inputs, targets)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # one pool: replays never overlap
            loss = self._train(inputs, targets) if train else self._forward_loss(inputs, targets)
        return graph, loss

    def _run(self, train: bool, input_batch, target_batch) -> torch.Tensor:
        if not self.capture:
            return (self._train if train else self._forward_loss)(input_batch.to(self.device),
                                                                  target_batch.to(self.device))
        key = (train, self.model.training, tuple(input_batch.shape))
        if key not in self.graphs:
            inputs = input_batch.to(self.device)
            targets = target_batch.to(self.device)
            self.graphs[key] = (*self._record(train, inputs, targets), inputs, targets)
        graph, loss, inputs, targets = self.graphs[key]
        inputs.copy_(input_batch, non_blocking=True)  # pinned memory: copied while the GPU works
        targets.copy_(target_batch, non_blocking=True)
        graph.replay()
        return loss

    # ---- what train_model calls ------------------------------------------------------------
    def step(self, input_batch, target_batch) -> tuple[float, int]:
        n_targets = int((target_batch != -100).sum())
        if not n_targets:  # nothing to learn from (and a mean over no targets is NaN)
            return 0.0, 0
        for group, rate in zip(self.optimizer.param_groups, self.rates):
            if not torch.is_tensor(group["lr"]):  # the loop set a new rate: into the tensor
                rate.fill_(group["lr"])
                group["lr"] = rate
        return self._run(True, input_batch, target_batch).item(), n_targets

    def loss(self, input_batch, target_batch, model, device) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.loss_fn(input_batch, target_batch, model, device)
        return self._run(False, input_batch, target_batch)
