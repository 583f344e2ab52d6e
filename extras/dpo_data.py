"""The preference data of extras/dpo.py: checked {instruction, input, chosen, rejected} entries,
each pair tokenized once, and batches in the book's DPO layout {"chosen", "chosen_mask",
"rejected", "rejected_mask"}, the masks True on response tokens. extras/dpo.py imports every
name here, so callers keep writing `dpo.collate_pairs`, `dpo.load_preferences`, ...
"""
import sys
from functools import partial

import torch
from torch.utils.data import DataLoader

from collate import LengthGroupedBatchSampler
from data import InstructionDataset, load_data
from training.files import fetch_data


def preference_problem(entry: dict) -> str | None:
    """Why a (valid instruction) entry is not a usable preference pair, or None."""
    for key in ("chosen", "rejected"):
        if key not in entry:
            return f"has no {key!r} field"
        if not isinstance(entry[key], str):
            return f"field {key!r} is a {type(entry[key]).__name__}, not a string"
        if not entry[key].strip():
            return f"field {key!r} is empty or only whitespace"
    if entry["chosen"].strip() == entry["rejected"].strip():
        return "has the same text as 'chosen' and 'rejected' (nothing to prefer)"
    return None


def load_preferences(source: str, log=lambda message: print(message, file=sys.stderr)) -> list[dict]:
    """The usable preference pairs of a file or URL. A pair that cannot be used (the book's own
    file has 6 whose chosen and rejected answers are the same text: no preference, a constant
    loss of log 2) is skipped and counted in one `log` line; a ValueError names the file and the
    first problem when no pair is left."""
    return load_data(fetch_data(source, require_output=False), require_output=False, log=log,
                     check=preference_problem)


class PreferenceDataset:
    """Each pair tokenized once: prompt + response header + chosen (or rejected) response."""

    def __init__(self, data: list[dict], tokenizer, style: str = "alpaca"):
        self.chosen = InstructionDataset([dict(e, output=e["chosen"]) for e in data], tokenizer, style)
        self.rejected = InstructionDataset([dict(e, output=e["rejected"]) for e in data],
                                           tokenizer, style)
        self.lengths = [max(a, b) for a, b in zip(self.chosen.lengths, self.rejected.lengths)]

    def __getitem__(self, index: int):
        return (self.chosen.item_with_prompt_length(index),
                self.rejected.item_with_prompt_length(index))

    def __len__(self) -> int:
        return len(self.lengths)


def pad_with_mask(items, pad_token_id: int, allowed_max_length: int | None):
    """(ids, prompt_len) items -> padded (B, T) ids and a mask that is True on response tokens.

    Each response ends with one <|endoftext|> (its end is part of what is preferred).
    """
    rows = [(list(ids) + [pad_token_id], prompt_len) for ids, prompt_len in items]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, prompt_len) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, prompt_len:len(row)] = True
    return ids[:, :allowed_max_length], mask[:, :allowed_max_length]


def collate_pairs(batch, pad_token_id: int = 50256, allowed_max_length: int | None = None,
                  device="cpu") -> dict:
    """The book's DPO batch: {"chosen", "chosen_mask", "rejected", "rejected_mask"}."""
    out = {}
    for key, items in (("chosen", [c for c, _ in batch]), ("rejected", [r for _, r in batch])):
        ids, mask = pad_with_mask(items, pad_token_id, allowed_max_length)
        out[key], out[f"{key}_mask"] = ids.to(device), mask.to(device)
    return out


def make_pair_loader(data, tokenizer, style, batch_size, shuffle, seed, max_length, device):
    dataset = PreferenceDataset(data, tokenizer, style)
    sampler = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=shuffle,
                                        drop_last=shuffle, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                      collate_fn=partial(collate_pairs, allowed_max_length=max_length,
                                         device=device))
