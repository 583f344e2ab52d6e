"""What test_reliability.py and test_damaged_files.py (issue 9, reliability) share: a small
model that builds in milliseconds and one entry of the book's data set."""

SMALL = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.",
         "output": "I baked the cake."}
