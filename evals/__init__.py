"""Benchmarks run as `python evaluate.py <benchmark> ...`, one small file each.

They import the core (data.py, gpt.py, generate.py, evaluate.py); the core never imports them:
evaluate.py only looks a benchmark's module up by name when its command is given.
"""
