"""Continuous batching for serve/server.py: one thread owns the model and generates for every active
request at once, one token a step over a shared KV cache; requests that arrive join at the next
step (prefilled together, their cache merged in), finished or abandoned ones leave at once.

Entry points: `Request` (one generation: tokens, streamed text, stop strings, events for its
writer) and `Engine(model, eos_id, token_bytes)`. Sampling is generate.py's `sample_next`.
"""
import codecs
import collections
import threading
import traceback
from dataclasses import dataclass, field

import torch

from generate import KVCache, last_logits, left_pad, sample_next


# ---- one request's generation: its tokens, its text, and the events its writer sends ------------
@dataclass
class Request:
    """One generation. Its writer reads `events` (woken by `ready`): ("delta", text) pieces, then
    ("done", finish_reason, prompt_tokens, completion_tokens) or ("error", status, message).
    Setting `cancelled` makes the engine drop it at the next step."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None
    events: collections.deque = field(default_factory=collections.deque)
    cancelled: threading.Event = field(default_factory=threading.Event)
    new: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the writer
    reason: str | None = None  # "stop" or "length" once finished

    def __post_init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # tokens split characters
        self.ready = threading.Semaphore(0)  # one release per event: the writer sleeps on it

    def emit(self, *event) -> None:
        self.events.append(event)
        self.ready.release()

    def add(self, token: int, token_bytes: bytes, eos_id: int) -> bool:
        """Take the next token; True when the request is finished (EOS, a stop string, length)."""
        if token == eos_id:
            return self.finish("stop", self.decoder.decode(b"", final=True))
        self.new.append(token)
        last = len(self.new) == self.max_tokens
        self.text += self.decoder.decode(token_bytes, final=last)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if last:
            return self.finish("length")
        # hold back a tail that may be the start of a stop string: it must never reach the client
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                   default=0)
        self.flush(len(self.text) - held)
        return False

    def flush(self, upto: int) -> None:
        if upto > self.sent:
            self.emit("delta", self.text[self.sent:upto])
            self.sent = upto

    def finish(self, reason: str, tail: str = "") -> bool:
        self.text, self.reason = self.text + tail, reason
        self.flush(len(self.text))
        self.emit("done", reason, len(self.prompt), len(self.new))
        return True


# ---- the engine: continuous batching over one KV cache ------------------------------------------
def merge_caches(a: KVCache | None, b: KVCache) -> KVCache:
    """One cache holding a's rows then b's: the shorter is left-padded, its padding masked out."""
    if a is None or a.pad_mask is None:
        return b
    T = max(len(a), len(b))

    def pad(t: torch.Tensor, n: int, dim: int, value) -> torch.Tensor:  # n columns on the left
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)
    out = KVCache()
    for c in (a, b):
        n = T - len(c)
        out.keys.append([pad(k, n, 2, 0) for k in c.keys])
        out.values.append([pad(v, n, 2, 0) for v in c.values])
    out.keys = [torch.cat(pair) for pair in zip(*out.keys)]  # (B_a + B_b, n_heads, T, head_dim)
    out.values = [torch.cat(pair) for pair in zip(*out.values)]
    out.pad_mask = torch.cat([pad(a.pad_mask, T - len(a), 1, False),
                              pad(b.pad_mask, T - len(b), 1, False)])
    return out


def trim_cache(cache: KVCache) -> None:
    """Drop the leading columns that are padding in every row (left by rows that finished)."""
    lead = int((~cache.pad_mask).all(dim=0).long().cumprod(dim=0).sum())
    if lead:
        cache.keys = [k[:, :, lead:] for k in cache.keys]
        cache.values = [v[:, :, lead:] for v in cache.values]
        cache.pad_mask = cache.pad_mask[:, lead:]


class Engine:
    """The only thread that touches the model. Each step feeds every active row its last token;
    waiting requests are prefilled together and join the batch in the same step."""

    def __init__(self, model, eos_id: int, token_bytes, max_batch: int = 8, max_queue: int = 32):
        self.model, self.eos_id, self.token_bytes = model, eos_id, token_bytes
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self.pending: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.rows: list[Request] = []  # active requests, in cache order
        self.cache: KVCache | None = None
        self.last: torch.Tensor | None = None  # (B,) each row's newest token, not yet in the cache
        # requests by how they ended, and the largest batch, for /healthz (keys fixed up front:
        # stats() reads them while this thread writes)
        self.counts = dict.fromkeys(("stop", "length", "cancelled", "failed", "largest_batch"), 0)
        threading.Thread(target=self.run, name="engine", daemon=True).start()

    def submit(self, request: Request) -> bool:
        """Queue the request for the next step; False (refused) when `max_queue` already wait."""
        with self.wake:
            if len(self.pending) >= self.max_queue:
                return False
            self.pending.append(request)
            self.wake.notify()
            return True

    def stats(self) -> dict:
        with self.wake:
            return {"active": len(self.rows), "queued": len(self.pending), **self.counts}

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.rows and not self.pending:
                        self.wake.wait()
                    joining = []
                    while self.pending and len(self.rows) + len(joining) < self.max_batch:
                        joining.append(self.pending.popleft())
                self.counts["cancelled"] += sum(r.cancelled.is_set() for r in joining)
                joining = [r for r in joining if not r.cancelled.is_set()]
                if not self.rows and not joining:  # only abandoned requests were waiting
                    continue
                try:
                    self.step(joining)
                except Exception as e:  # a bug, or the device out of memory: fail this batch only
                    traceback.print_exc()
                    message = " ".join(f"{e.__class__.__name__}: {e}".split())[:300]
                    for r in self.rows + joining:
                        r.emit("error", 500, f"internal error during generation: {message}")
                    self.counts["failed"] += len(self.rows) + len(joining)
                    with self.wake:
                        self.rows, self.cache, self.last = [], None, None

    def step(self, joining: list[Request]) -> None:
        """One new token for every active row and every joining request."""
        logits = []
        if self.rows:
            trim_cache(self.cache)
            real = torch.ones(len(self.rows), 1, dtype=torch.bool, device=self.device)
            logits.append(last_logits(self.model, self.last[:, None], self.cache, real))
        if joining:
            idx, pad_mask = left_pad([r.prompt for r in joining], self.eos_id, self.device)
            fresh = KVCache()
            logits.append(last_logits(self.model, idx, fresh, pad_mask))
            self.cache = merge_caches(self.cache, fresh)
        rows, logits = self.rows + joining, torch.cat(logits)
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(rows))
        tokens, keep = [], []
        for i, r in enumerate(rows):
            if r.cancelled.is_set():  # its client left: stop spending compute on it
                self.counts["cancelled"] += 1
                continue
            try:
                token = int(sample_next(logits[i:i + 1], r.temperature, None, r.top_p,
                                        r.generator))
            except RuntimeError as e:  # e.g. odds that overflow to NaN: fail this row only
                r.emit("error", 500, f"sampling failed: {' '.join(str(e).split())[:200]}")
                self.counts["failed"] += 1
                continue
            if r.add(token, self.token_bytes(token), self.eos_id):
                self.counts[r.reason] += 1
            else:
                tokens.append(token)
                keep.append(i)
        if len(keep) < len(rows):  # finished and abandoned rows leave the batch and free a slot
            self.cache.select(torch.tensor(keep, dtype=torch.long, device=self.device))
        with self.wake:
            self.rows = [rows[i] for i in keep]
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if not self.rows:
            self.cache = None
