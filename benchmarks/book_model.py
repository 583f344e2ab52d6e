"""The book's chapter 4 GPT modules, as the benchmark's baseline ("what the book does").

Same architecture and arithmetic as `gpt.GPTModel`, written the way the book writes it: LayerNorm
and GELU spelled out in tensor operations, separate query/key/value projections, attention as an
explicit masked softmax, and an output head separate from the token embedding. `from_gpt` copies
a `GPTModel`'s weights in, so both models compute the same function (a test checks the logits).
"""
import math
import re

import torch
import torch.nn as nn


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):  # the tanh approximation GPT-2 was trained with
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["emb_dim"]
        self.num_heads, self.head_dim = cfg["n_heads"], d // cfg["n_heads"]
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg["drop_rate"])
        n = cfg["context_length"]
        self.register_buffer("mask", torch.triu(torch.ones(n, n), diagonal=1))

    def forward(self, x):
        b, T, d = x.shape
        q, k, v = (w(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:T, :T], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ v).transpose(1, 2).contiguous().view(b, T, d)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["emb_dim"]
        self.att = MultiHeadAttention(cfg)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), GELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        positions = torch.arange(in_idx.shape[1], device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def from_gpt(model) -> BookGPTModel:
    """A BookGPTModel with copies of a `gpt.GPTModel`'s weights (the head untied, as the book)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        name = re.sub(r"norm(\d?)\.weight$", r"norm\1.scale", name)
        name = re.sub(r"norm(\d?)\.bias$", r"norm\1.shift", name)
        name = name.replace(".ff.fc.", ".ff.0.").replace(".ff.proj.", ".ff.2.")
        if ".att.qkv." in name:  # our fused (3 * d, d) projection: query, key, value rows
            for part, rows in zip(("W_query", "W_key", "W_value"), tensor.chunk(3)):
                weights[name.replace("qkv", part)] = rows.clone()
        else:
            weights[name] = tensor.clone()
    book = BookGPTModel(model.cfg)
    result = book.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(".mask")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not map: missing {missing}, extra {result.unexpected_keys}")
    return book
