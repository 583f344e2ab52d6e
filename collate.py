"""Step 2 of the pipeline: token lists in, (inputs, targets) batches out.
`custom_collate_fn` is the book's collate (append <|endoftext|>, pad, shift by one, -100) plus
optional prompt masking; `LengthGroupedBatchSampler` puts entries of similar length together so
that less compute goes to padding; `make_loader` wires both into a DataLoader.
"""
import math
import random
from functools import partial

import torch
from torch.utils.data import DataLoader


def custom_collate_fn(batch, pad_token_id: int = 50256, ignore_index: int = -100,
                      allowed_max_length: int | None = None, device="cpu",
                      mask_prompt: bool = False,
                      pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's collate. Each item is a list of token ids, or an `(ids, prompt_len)` pair
    (see InstructionDataset.item_with_prompt_length). Per item, in order:
      1. append one <|endoftext|> (= pad_token_id) and pad to the longest item + 1, or with
         pad_to_multiple > 1 to one more than the next multiple of it (see `padded_length`);
      2. inputs = all tokens but the last, targets = all tokens but the first (the shift by one);
      3. every pad target after the first becomes ignore_index: the model learns to stop once;
      4. with mask_prompt, targets that predict prompt tokens (instruction, input, response
         header) become ignore_index too, so only the response and its <|endoftext|> are learned;
      5. cut both to allowed_max_length.
    A batch can end with every target ignored (masking + a short allowed_max_length). It is
    returned as is: train.py's loss divides by max(count, 1), so it is 0, not NaN, and the
    optimizer step is skipped."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    items = [item if is_pair(item) else (item, None) for item in batch]
    if mask_prompt and any(prompt_len is None for _, prompt_len in items):
        raise ValueError("mask_prompt needs (ids, prompt_len) items, e.g. from "
                         "InstructionDataset.item_with_prompt_length")
    batch_max_length = padded_length(max(len(ids) for ids, _ in items), pad_to_multiple) + 1
    inputs_lst, targets_lst = [], []
    for ids, prompt_len in items:
        padded = list(ids) + [pad_token_id] * (batch_max_length - len(ids))  # a copy: ids untouched
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        pad_positions = torch.nonzero(targets == pad_token_id).flatten()
        targets[pad_positions[1:]] = ignore_index
        if mask_prompt:
            targets[:max(prompt_len - 1, 0)] = ignore_index  # target j predicts token j + 1
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (1: unchanged).

    Batches then come in a few shapes instead of one per length, and on CPU the matrix-multiply
    library prepares (and keeps) its kernels per shape: fewer shapes made training faster and its
    memory stop growing (docs/performance.md). The extra positions are padding with ignored
    targets, so the loss is the same."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple must be at least 1, got {multiple}")
    return -(-length // multiple) * multiple


def is_pair(item) -> bool:
    """True for an `(ids, prompt_len)` pair, False for a plain list of ids."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int) \
        and not isinstance(item[0], int)


class LengthGroupedBatchSampler:
    """Batches of dataset indices for a DataLoader's `batch_sampler`.
    With shuffle and group (training): shuffle, cut into mega-batches of 50 batches, sort each by
    length, cut into batches, shuffle the batch order, and put the batch holding the longest item
    first (an out-of-memory error then shows on step 1, not hours in). Batches hold similar
    lengths, so little padding, yet each epoch still sees a fresh mix.
    With group=False: plain shuffled batches. With shuffle=False: indices in order.
    The order is a pure function of (seed, epoch), so a resumed run can skip the first k batches.
    drop_last drops only the one short remainder batch."""

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 123, group: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.shuffle, self.drop_last, self.seed, self.group = shuffle, drop_last, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n, size = len(self.lengths), self.batch_size
        order = list(range(n))
        rng = random.Random(f"{self.seed}:{self.epoch}")  # str seeds are stable across runs
        if self.shuffle:
            rng.shuffle(order)
        grouped = self.shuffle and self.group
        if grouped:
            mega = 50 * size
            order = [i for start in range(0, n, mega)
                     for i in sorted(order[start:start + mega], key=lambda i: -self.lengths[i])]
        batches = [order[start:start + size] for start in range(0, n, size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if grouped and batches:
            rng.shuffle(batches)
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches.insert(0, batches.pop(longest))  # batches are sorted: [0] is the longest
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def make_loader(dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 123,
                mask_prompt: bool = False, allowed_max_length: int | None = None,
                group_by_length: bool = True, device="cpu", pad_to_multiple: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `dataset` (an InstructionDataset, or any list of token lists) using
    custom_collate_fn and a LengthGroupedBatchSampler (reach it as `loader.batch_sampler` to call
    set_epoch). Grouping applies only with shuffle: evaluation keeps the data's order.
    pad_to_multiple > 1 pads every batch's length up to a multiple of it (`padded_length`).
    pin_memory (for CUDA) lets the batches be copied to the GPU while it computes."""
    lengths = getattr(dataset, "lengths", None) or [len(dataset[i]) for i in range(len(dataset))]
    padded_length(1, pad_to_multiple)  # a bad multiple is refused now, not at the first batch
    sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, drop_last=drop_last,
                                        seed=seed, group=group_by_length)
    collate = partial(custom_collate_fn, allowed_max_length=allowed_max_length, device=device,
                      mask_prompt=mask_prompt, pad_to_multiple=pad_to_multiple)
    # the items in a plain list, read once: with --mask-prompt, (ids, prompt_len) pairs
    items = [dataset.item_with_prompt_length(i) if mask_prompt else dataset[i]
             for i in range(len(dataset))]
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate, num_workers=0,
                      pin_memory=pin_memory)
