import time

import torch

from serve.batching import Engine, Request, merge_caches, trim_cache
from generate import generate, last_logits, left_pad
from generate import KVCache
from test_generate import EOS, lively_model


def token_bytes(token: int) -> bytes:
    return f"<{token}>".encode()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def slow_steps(model, seconds: float):
    """Every forward pass of the model takes at least `seconds` (a hook on its first block)."""
    return model.trf_blocks[0].register_forward_hook(lambda *_: time.sleep(seconds))


def test_merged_caches_continue_exactly_like_each_row_alone():
    """Rows prefilled apart (lengths 3 and 6), merged, then stepped together: each row's logits
    are those of the same row stepped in its own cache."""
    model = lively_model(4)
    prompts, nxt = [[1, 2, 3], [9, 8, 7, 6, 5, 4]], torch.tensor([[11], [12]])
    alone, caches = [], []
    with torch.no_grad():
        for p, t in zip(prompts, nxt):
            cache = KVCache()
            last_logits(model, torch.tensor([p]), cache, None)
            caches.append(cache)
            solo = KVCache()
            last_logits(model, torch.tensor([p]), solo, None)
            alone.append(last_logits(model, t[None], solo, None))
        merged = merge_caches(caches[0], caches[1])
        assert len(merged) == 6 and merged.pad_mask.tolist() == [[False] * 3 + [True] * 3,
                                                                 [True] * 6]
        together = last_logits(model, nxt, merged, torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_trim_drops_only_columns_that_are_padding_in_every_row():
    idx, mask = left_pad([[1, 2], [3, 4, 5, 6]], 0, "cpu")  # row 0 padded by 2
    cache = KVCache()
    with torch.no_grad():
        last_logits(lively_model(), idx, cache, mask)
    cache.select(torch.tensor([0]))  # the long row leaves: 2 columns are now padding everywhere
    trim_cache(cache)
    assert len(cache) == 2 and cache.pad_mask.tolist() == [[True, True]]
    assert all(k.shape[2] == 2 for k in cache.keys + cache.values)


def test_stop_string_is_held_back_then_cut():
    """Pieces "ab", "cE", "N", "Dxy" with stop "END": "ab" goes out, "c" once "E" may start the
    stop string, nothing while "EN" may, and the text ends at "abc" when "END" appears."""
    r = Request([1], max_tokens=10, stop=["END"])
    sent = []
    for piece in ("ab", "cE", "N", "Dxy"):
        done = r.add(1, piece.encode(), eos_id=0)
        sent.append("".join(e[1] for e in r.events if e[0] == "delta"))
    assert sent == ["ab", "abc", "abc", "abc"] and done
    assert r.text == "abc" and r.events[-1] == ("done", "stop", 1, 4)


def test_a_character_split_across_tokens_arrives_whole():
    r = Request([1], max_tokens=2)
    assert not r.add(1, "€".encode()[:2], eos_id=0)  # b"\xe2\x82": half of the euro sign
    assert r.add(2, "€".encode()[2:] + b"!", eos_id=0)
    assert list(r.events) == [("delta", "€!"), ("done", "length", 1, 2)]


def test_requests_joining_mid_generation_equal_generate():
    """B and C arrive while A is generating; every answer is generate.py's greedy answer."""
    model = lively_model(5)
    engine = Engine(model, EOS, token_bytes, max_batch=4)
    prompts, lengths = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [42]], [20, 12, 9]
    hook = slow_steps(model, 0.03)  # A's last 16 steps take 0.5 s: time enough to join
    try:
        requests = [Request(p, n) for p, n in zip(prompts, lengths)]
        assert engine.submit(requests[0])
        wait_for(lambda: len(requests[0].new) >= 4)
        assert engine.submit(requests[1]) and engine.submit(requests[2])
        assert requests[0].reason is None  # A was still generating when they joined
        wait_for(lambda: all(r.reason for r in requests))
    finally:
        hook.remove()
    for r, p, n in zip(requests, prompts, lengths):
        assert r.new == generate(model, [p], n, eos_id=EOS)[0][len(p):]
        assert r.text == "".join(token_bytes(t).decode() for t in r.new)
    assert engine.stats()["largest_batch"] == 3 and engine.stats()["active"] == 0


def test_cancelled_request_leaves_and_the_other_is_unchanged():
    model = lively_model(6)
    engine = Engine(model, EOS, token_bytes)
    hook = slow_steps(model, 0.02)
    try:
        a, b = Request([3, 1, 4], 20), Request([1, 5], 20)
        engine.submit(a)
        engine.submit(b)
        wait_for(lambda: len(a.new) >= 2)
        a.cancelled.set()
        wait_for(lambda: b.reason is not None)
    finally:
        hook.remove()
    assert a.reason is None and len(a.new) < 20
    assert b.new == generate(model, [[1, 5]], 20, eos_id=EOS)[0][2:]
    assert engine.stats()["cancelled"] == 1


def test_a_failing_step_fails_its_batch_and_the_engine_keeps_serving():
    model = lively_model(7)
    engine = Engine(model, EOS, token_bytes)

    def fail_once(*_):
        hook.remove()
        raise RuntimeError("device on fire")
    hook = model.trf_blocks[0].register_forward_hook(fail_once)
    broken = Request([1, 2], 5)
    engine.submit(broken)
    wait_for(lambda: broken.events and broken.events[-1][0] == "error")
    assert broken.events[-1][1] == 500 and "device on fire" in broken.events[-1][2]
    fine = Request([1, 2], 5)
    engine.submit(fine)
    wait_for(lambda: fine.reason is not None)
    assert fine.new == generate(model, [[1, 2]], 5, eos_id=EOS)[0][2:]
    assert engine.stats()["failed"] == 1
