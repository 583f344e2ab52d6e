"""The run around train.py's loop: its settings and what they build and write (run.py), its
checkpoints (checkpoint.py) and the files it fetches (files.py). train.py's `main` uses these;
the book's functions in train.py need none of them."""
