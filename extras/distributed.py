"""Data-parallel training under torchrun (an extra of train.py): DDP, or FSDP2 with --fsdp.

train.py (through training/run.py) imports this file only when torchrun started it with WORLD_SIZE > 1, so a plain
`python train.py` never touches torch.distributed. `Run` joins the process group (NCCL on CUDA,
gloo on CPU, a timeout on every collective), wraps the model, shards the batches, makes every
loss the mean over all ranks' target tokens, and tells who writes files (rank 0).
"""
import atexit
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import distribute_tensor

# whole (not sharded) tensors; gathered on the CPU, so no GPU ever holds a second full copy
FULL = StateDictOptions(full_state_dict=True)
FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardedBatchSampler:
    """Each global batch of `sampler` (batch_size x world entries, in the one-process order)
    cut into `world` contiguous shares; this rank gets share `rank`. Every rank sees the same
    number of batches, so none waits at an epoch's end. Needs full batches (drop_last)."""

    def __init__(self, sampler, rank: int, world: int):
        if not sampler.drop_last:
            raise ValueError("sharding needs full batches (drop_last=True)")
        self.sampler, self.rank, self.share = sampler, rank, sampler.batch_size
        sampler.batch_size *= world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in self.sampler:
            yield batch[self.rank * self.share:(self.rank + 1) * self.share]

    def __len__(self) -> int:
        return len(self.sampler)


class LossModule(nn.Module):
    """The model and its loss as one module, so that DDP's forward (which arms the gradient
    averaging) runs around the head-only loss, which calls model.hidden, not model.forward."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device = model, device
        self.loss_fn = None  # set by Run.global_loss

    def forward(self, input_batch, target_batch):
        return self.loss_fn(input_batch, target_batch, self.model, self.device)


class Run:
    """One rank of a torchrun job: its rank, world size, device and the wrapped loss."""

    def __init__(self, device_name: str, args, log=print):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.is_main = self.rank == 0
        self.fsdp, self.log = args.fsdp, log if self.is_main else (lambda *a, **k: None)
        if args.fsdp and args.lora_rank:
            raise ValueError("--fsdp does not support --lora-rank yet (use DDP)")
        device = torch.device(device_name)
        if device.type == "cuda":  # one GPU per process: the one torchrun numbered for this node
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise ValueError(f"torchrun training runs on cuda or cpu, not {device.type}")
        self.device = device
        # a rank that died or hangs makes the others fail after this, never wait forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=args.timeout))
        atexit.register(self.close)
        self.wrapped = None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def finish(self) -> None:
        """Every rank waits here until rank 0 has written the outputs, then all end together.

        The process ends with os._exit, skipping Python's shutdown: a gloo worker thread may
        still be dropping a finished collective that holds tensors, and during shutdown it
        cannot take the GIL, so the rank aborted ("terminate called without an active
        exception", SIGABRT, 1 launch in 7 on a loaded CPU; the core dump shows
        ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref_pyobject -> take_gil ->
        pthread_exit). Every output is written and renamed by now, so nothing is lost."""
        dist.barrier()
        self.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def shard_loaders(self, train_loader, val_loader) -> tuple[DataLoader, DataLoader]:
        """Training batches sharded; validation batches of the same global size, evaluated whole
        on every rank (they are few and need no gradients) so their loss equals one process's."""
        self.log(f"{self.world} processes ({'FSDP' if self.fsdp else 'DDP'}, "
                 f"{dist.get_backend()}): global batch {train_loader.batch_sampler.batch_size} "
                 f"x {self.world} = {train_loader.batch_sampler.batch_size * self.world}")
        val_loader.batch_sampler.batch_size *= self.world
        train = DataLoader(train_loader.dataset, collate_fn=train_loader.collate_fn,
                           batch_sampler=ShardedBatchSampler(train_loader.batch_sampler,
                                                             self.rank, self.world),
                           num_workers=0, pin_memory=train_loader.pin_memory)
        return train, val_loader

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model and its loss, or FSDP2: each transformer block its own shard
        group, the rest (embeddings, final norm, head) the root's."""
        self.model_class = type(model)  # fully_shard changes it (FSDPGPTModel)
        if self.fsdp:
            for block in model.trf_blocks:
                fully_shard(block)
            # the root stays gathered after forward: the head runs after model.hidden returns
            fully_shard(model, reshard_after_forward=False)
            register_fsdp_forward_method(model, "hidden")
            self.wrapped = LossModule(model, self.device)
        else:
            ids = [self.device] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(LossModule(model, self.device),
                                                   device_ids=ids)
        return model

    def global_loss(self, loss_fn):
        """train.py's loss function, run through the wrapper and averaged over ranks (`loss`)."""
        (self.wrapped if self.fsdp else self.wrapped.module).loss_fn = loss_fn
        return self.loss

    def count_targets(self, target_batch) -> int:
        """Target tokens of this step over all ranks (train.py's tokens seen, and whether to step)."""
        count = torch.tensor([(target_batch != -100).sum().item()], device=self.device)
        dist.all_reduce(count)
        return int(count.item())

    def loss(self, input_batch, target_batch, model=None, device=None) -> torch.Tensor:
        """The mean loss over ALL ranks' target tokens, as one process on the global batch.

        Each rank holds sum_r / n_r over its n_r targets; DDP and FSDP average gradients over
        the W ranks, so the rank's part is scaled to sum_r * W / n (n = sum of n_r): the average
        of the parts is then sum(sum_r) / n, the global token mean (a plain average of rank means
        would weigh a rank's tokens more when it has fewer). The value returned is that global
        mean on every rank (so logs and decisions agree); its gradient is the rank's part.
        """
        local = self.wrapped(input_batch, target_batch)
        n_r = (target_batch != -100).sum().to(local.device, torch.float32)
        stats = torch.stack([local.detach().float() * n_r, n_r])
        dist.all_reduce(stats)
        total, n = stats[0], stats[1].clamp(min=1)
        part = local * (n_r * self.world / n)
        return part + (total / n - part).detach()

    def save(self, write, path, model, optimizer, state, best, cfg) -> None:
        """`write` (training/checkpoint.py's save_checkpoint) on rank 0 while the others wait, so that every
        rank goes on only once the checkpoint is complete. The file is one process's checkpoint
        (DDP: every rank has the same weights; FSDP: the shards gathered into whole tensors and
        AdamW's state in one process's numbering), so it resumes under any number of ranks."""
        if self.fsdp:
            model, optimizer, best = self._gathered(model, optimizer, best)
        if self.is_main:
            write(path, model, optimizer, state, best, cfg)
        dist.barrier()

    def load(self, read, path, model, optimizer, cfg, state_class=dict) -> tuple:
        """`read` (training/checkpoint.py's load_checkpoint) on every rank; under FSDP into a whole model
        first (one full copy in CPU memory per rank while loading), then sharded."""
        if not self.fsdp:
            return read(path, model, optimizer, cfg, state_class)
        whole = self.model_class(cfg)
        # its settings (lr, weight decay) come from the checkpoint's param_groups
        whole_opt = torch.optim.AdamW([p for p in whole.parameters() if p.requires_grad])
        state, best = read(path, whole, whole_opt, cfg, state_class)
        set_model_state_dict(model, whole.state_dict(), options=FULL)
        set_optimizer_state_dict(model, optimizer, by_name(whole_opt.state_dict(), model),
                                 options=FULL)
        params = model.state_dict(keep_vars=True)
        if best is not None:  # None: the current weights are the best
            best = {k: distribute_tensor(v.to(self.device), params[k].device_mesh,
                                         params[k].placements) for k, v in best.items()}
        return state, best

    def _gathered(self, model, optimizer, best):
        """Whole-tensor stand-ins for an FSDP model, its AdamW and best weights (collectives:
        every rank calls this; only rank 0 gets the tensors)."""
        model_state = get_model_state_dict(model, options=FULL_CPU)
        optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_CPU)
        best = best and {k: v.full_tensor().cpu() for k, v in best.items()}
        if not self.is_main:
            return None, None, None
        return (Saved(model_state), Saved(by_number(optim_state, model)), best)

    def full_model(self, model, cfg: dict):
        """The whole trained model on rank 0 (None elsewhere) for the outputs; FSDP gathers it."""
        # every rank's collectives are finished before any rank moves on: a rank that left with
        # a gather still in flight was seen to abort at exit ("terminate called ...") in CI
        if not self.fsdp:
            dist.barrier()
            return model if self.is_main else None
        state = get_model_state_dict(model, options=FULL_CPU)
        dist.barrier()
        if not self.is_main:
            return None
        whole = self.model_class(cfg)
        whole.load_state_dict(state)
        return whole.to(self.device)


class Saved:
    """A state dict behind `.state_dict()`, what checkpoint.save_checkpoint asks a model for."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def trainable_names(model) -> list[str]:
    # train.make_optimizer's order: AdamW numbers the parameters in this order
    return [name for name, p in model.named_parameters() if p.requires_grad]


def by_number(optim_state: dict, model) -> dict:
    """AdamW's state keyed by parameter name (torch.distributed.checkpoint) -> by number, as
    optimizer.state_dict() of one process gives it."""
    number = {name: i for i, name in enumerate(trainable_names(model))}
    return {"state": {number[k]: v for k, v in optim_state["state"].items()},
            "param_groups": [dict(g, params=[number[k] for k in g["params"]])
                             for g in optim_state["param_groups"]]}


def by_name(optim_state: dict, model) -> dict:
    """The inverse of `by_number`."""
    names = trainable_names(model)
    return {"state": {names[i]: v for i, v in optim_state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                             for g in optim_state["param_groups"]]}
