"""Test helper: write tensors in the real safetensors layout, and random GPT-2 checkpoints in
Hugging Face's naming, so the loader is tested on the file format itself rather than on a mock."""
import json
import struct

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())  # no numpy needed
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def hf_gpt2_tensors(cfg: dict, prefix: str = "", mask_buffers: bool = True, seed: int = 0) -> dict:
    """Random tensors with the names and (in, out) Conv1D shapes of a Hugging Face GPT-2 file."""
    g = torch.Generator().manual_seed(seed)
    C, V, L = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    t = {f"{prefix}wte.weight": rnd(V, C), f"{prefix}wpe.weight": rnd(L, C)}
    for i in range(cfg["n_layers"]):
        h = f"{prefix}h.{i}."
        t.update({h + "ln_1.weight": 1 + rnd(C), h + "ln_1.bias": rnd(C),
                  h + "attn.c_attn.weight": rnd(C, 3 * C), h + "attn.c_attn.bias": rnd(3 * C),
                  h + "attn.c_proj.weight": rnd(C, C), h + "attn.c_proj.bias": rnd(C),
                  h + "ln_2.weight": 1 + rnd(C), h + "ln_2.bias": rnd(C),
                  h + "mlp.c_fc.weight": rnd(C, 4 * C), h + "mlp.c_fc.bias": rnd(4 * C),
                  h + "mlp.c_proj.weight": rnd(4 * C, C), h + "mlp.c_proj.bias": rnd(C)})
        if mask_buffers:
            t[h + "attn.bias"] = torch.tril(torch.ones(1, 1, L, L))
    t[f"{prefix}ln_f.weight"] = 1 + rnd(C)
    t[f"{prefix}ln_f.bias"] = rnd(C)
    return t
