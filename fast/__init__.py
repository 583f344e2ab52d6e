"""How the training step runs faster than the book's, with the same arithmetic: step.py (what
train.py's default run uses: the head on targets only, bf16 where native, the sliced head loss on
CPU), cuda_graphs.py (the step as a CUDA graph) and tricks.py (opt-in tricks, measured)."""
