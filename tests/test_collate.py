import random

import pytest
import torch

from collate import LengthGroupedBatchSampler, custom_collate_fn, make_loader, padded_length
from data import InstructionDataset, format_input, get_tokenizer, response_header

EOT, IGN = 50256, -100


def book_collate(batch, pad_token_id=EOT, ignore_index=IGN, allowed_max_length=None):
    """The book's algorithm transcribed from its description in words, on plain lists: append
    <|endoftext|>, pad to the longest + 1, inputs = row[:-1], targets = row[1:], every pad target
    but the first -> ignore_index, then truncate."""
    longest = max(len(item) for item in batch) + 1
    inputs, targets = [], []
    for item in batch:
        row = item + [pad_token_id]
        row = row + [pad_token_id] * (longest - len(row))
        x, y = row[:-1], row[1:]
        pads = [j for j, t in enumerate(y) if t == pad_token_id]
        for j in pads[1:]:
            y[j] = ignore_index
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.tensor(inputs), torch.tensor(targets)


def test_the_books_example_by_hand():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [8, 9, EOT, IGN, IGN]]
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"


def test_truncation_by_hand():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, EOT]]
    assert targets.tolist() == [[1, 2, 3], [6, EOT, IGN]]


def test_equals_the_books_algorithm_on_random_batches():
    rng = random.Random(0)
    for trial in range(200):
        batch = [[rng.randrange(50257) for _ in range(rng.randrange(1, 12))]
                 for _ in range(rng.randrange(1, 6))]
        if trial % 4 == 0:  # a literal 50256 inside an item: the book masks all but the first
            batch[0].insert(rng.randrange(len(batch[0]) + 1), EOT)
        max_len = rng.choice([None, 1, 3, 8, 50])
        pad, ign = rng.choice([(EOT, IGN), (0, -1)])
        got = custom_collate_fn(batch, pad_token_id=pad, ignore_index=ign,
                                allowed_max_length=max_len)
        want = book_collate(batch, pad_token_id=pad, ignore_index=ign, allowed_max_length=max_len)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_items_are_not_modified():
    batch = [[1, 2], [3]]
    custom_collate_fn(batch)
    assert batch == [[1, 2], [3]]


def test_prompt_masking_by_hand():
    # item 0: prompt = tokens 10, 11, 12 -> targets predicting 11 and 12 are ignored
    batch = [([10, 11, 12, 13, 14], 3), ([20, 21, 22], 2)]
    inputs, targets = custom_collate_fn(batch, mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, EOT, EOT]]
    assert targets.tolist() == [[IGN, IGN, 13, 14, EOT], [IGN, 22, EOT, IGN, IGN]]
    unmasked = custom_collate_fn(batch)  # pairs without mask_prompt: the book's result
    assert torch.equal(unmasked[1], book_collate([[10, 11, 12, 13, 14], [20, 21, 22]])[1])


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_prompt_masking_leaves_only_response_and_eot(style):
    tok = get_tokenizer()
    entries = [{"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.",
                "output": "I baked the cake."},
               {"instruction": "Name a color.", "input": "", "output": "Blue."}]
    ds = InstructionDataset(entries, tok, style=style)
    _, targets = custom_collate_fn([ds.item_with_prompt_length(i) for i in range(2)],
                                   mask_prompt=True)
    for row, entry in zip(targets.tolist(), entries):
        kept = [t for t in row if t != IGN]
        assert tok.decode(kept) == entry["output"] + "<|endoftext|>"
        prompt_tokens = len(tok.encode(format_input(entry, style) + response_header(style)))
        assert row[:prompt_tokens - 1] == [IGN] * (prompt_tokens - 1)


def test_all_ignored_batch_is_returned_as_is():
    """Masking + truncation shorter than the prompt: no target left. train.py's loss divides by
    max(count, 1) and skips the step; collate just returns the batch."""
    batch = [([1, 2, 3, 4, 5, 6], 5), ([7, 8, 9, 10], 4)]
    inputs, targets = custom_collate_fn(batch, allowed_max_length=3, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3], [7, 8, 9]]
    assert (targets == IGN).all() and targets.shape == (2, 3)


def test_padding_to_a_multiple_adds_only_ignored_padding():
    # longest item 5 tokens -> 8 positions; the first <|endoftext|> target stays, the rest -100
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], pad_to_multiple=4)
    assert inputs.tolist() == [[0, 1, 2, 3, 4, EOT, EOT, EOT], [5, 6, EOT, EOT, EOT, EOT, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT, IGN, IGN, IGN],
                                [6, EOT, IGN, IGN, IGN, IGN, IGN, IGN]]
    book_inputs, book_targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]])
    assert torch.equal(inputs[:, :5], book_inputs) and torch.equal(targets[:, :5], book_targets)
    # a longest item that is already a multiple keeps the book's shape
    assert custom_collate_fn([[0, 1, 2, 3], [5]], pad_to_multiple=4)[0].shape == (2, 4)


def test_padded_length_rounds_up_to_the_multiple():
    assert [padded_length(n, 16) for n in (1, 15, 16, 17, 48, 49)] == [16, 16, 16, 32, 48, 64]
    assert padded_length(37, 1) == 37
    with pytest.raises(ValueError, match="pad_to_multiple must be at least 1, got 0"):
        padded_length(5, 0)


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="empty batch"):
        custom_collate_fn([])
    with pytest.raises(ValueError, match="mask_prompt needs"):
        custom_collate_fn([[1, 2]], mask_prompt=True)


# ---- LengthGroupedBatchSampler -----------------------------------------------------------------
def realistic_lengths(n=1100, seed=0):
    """Token counts shaped like the book's instruction data: most 40-120, a long tail."""
    rng = random.Random(seed)
    return [min(400, max(30, int(rng.lognormvariate(4.2, 0.35)))) for _ in range(n)]


def padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [True, False])
def test_sampler_is_a_pure_function_of_seed_and_epoch(group):
    lengths = realistic_lengths(300)
    a = LengthGroupedBatchSampler(lengths, 8, seed=1, group=group)
    b = LengthGroupedBatchSampler(lengths, 8, seed=1, group=group)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) == list(a)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(a) != list(LengthGroupedBatchSampler(lengths, 8, seed=2, group=group))


@pytest.mark.parametrize("group", [True, False])
def test_every_index_once_and_drop_last_drops_only_the_remainder(group):
    lengths = realistic_lengths(103)
    full = list(LengthGroupedBatchSampler(lengths, 10, drop_last=False, group=group))
    assert sorted(i for b in full for i in b) == list(range(103))
    assert sorted(len(b) for b in full) == [3] + [10] * 10
    dropped = list(LengthGroupedBatchSampler(lengths, 10, drop_last=True, group=group))
    flat = [i for b in dropped for i in b]
    assert len(dropped) == 10 and len(flat) == len(set(flat)) == 100
    assert len(LengthGroupedBatchSampler(lengths, 10)) == 10
    assert len(LengthGroupedBatchSampler(lengths, 10, drop_last=False)) == 11


def test_plain_modes():
    lengths = [5, 1, 4, 2, 3]
    assert list(LengthGroupedBatchSampler(lengths, 2, shuffle=False, drop_last=False)) == \
        [[0, 1], [2, 3], [4]]
    plain = list(LengthGroupedBatchSampler(list(range(100)), 10, group=False))
    assert all(len(b) == 10 for b in plain) and sorted(sum(plain, [])) == list(range(100))
    assert sum(plain, []) != list(range(100))  # shuffled
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler(lengths, 0)


def test_grouping_cuts_padding_and_puts_the_longest_batch_first():
    lengths = realistic_lengths()
    grouped = list(LengthGroupedBatchSampler(lengths, 8))
    plain = list(LengthGroupedBatchSampler(lengths, 8, group=False))
    assert padding(lengths, grouped) < 0.25 * padding(lengths, plain)
    assert max(lengths[i] for i in grouped[0]) == max(lengths)


# ---- make_loader -------------------------------------------------------------------------------
def small_dataset(n=20):
    entries = [{"instruction": f"Repeat {'word ' * (i % 7)}{i}.", "output": f"{i}"}
               for i in range(n)]
    return InstructionDataset(entries, get_tokenizer())


def test_loader_batches_and_resumes_deterministically():
    ds = small_dataset()
    def epoch_batches(epoch):  # a fresh loader each time, as a resumed process builds it
        loader = make_loader(ds, 4, shuffle=True, drop_last=True, seed=5)
        loader.batch_sampler.set_epoch(epoch)
        return list(loader)
    first, again, other = epoch_batches(2), epoch_batches(2), epoch_batches(3)
    assert len(first) == len(again) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(a[0].shape == b[0].shape and torch.equal(a[0], b[0])
                   for a, b in zip(first, other))  # another epoch, another order
    assert all(x.shape == y.shape and x.shape[0] == 4 for x, y in first)


def test_loader_for_evaluation_keeps_order_and_masks():
    ds = small_dataset(10)
    loader = make_loader(ds, 4, shuffle=False, drop_last=False, mask_prompt=True,
                         allowed_max_length=64)
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    x, y = batches[0]
    want = custom_collate_fn([ds.item_with_prompt_length(i) for i in range(4)],
                             allowed_max_length=64, mask_prompt=True)
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])
    assert torch.equal(make_loader([[1, 2], [3]], 2, shuffle=False, drop_last=False)
                       .__iter__().__next__()[0], torch.tensor([[1, 2], [3, EOT]]))


def test_loader_pads_to_the_multiple_and_refuses_a_bad_one_at_once():
    x, y = next(iter(make_loader([[1, 2, 3], [4]], 2, shuffle=False, drop_last=False,
                                 pad_to_multiple=8)))
    assert x.shape == y.shape == (2, 8)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        make_loader([[1, 2, 3], [4]], 2, shuffle=False, drop_last=False, pad_to_multiple=0)
