"""What a reader must read to follow a run: the project's functions that run, and their lines.

Profiles `python train.py ARGS` in this process (sys.setprofile) and counts, per project file,
the lines spanned by the functions that ran (nested functions counted once); separately, those
that ran inside train.train_model (the loop, from the loop function down). Prints a table, or
JSON with --json. Usage: python benchmarks/reading_budget.py -- --model tiny --max-steps 2 --no-generate
"""
import argparse
import contextlib
import io
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import ArgumentParser  # noqa: E402


FUNCTION = inspect.CO_OPTIMIZED | inspect.CO_NEWLOCALS  # the flags of a function's code


def last_line(code) -> int:
    return max((line for _, _, line in code.co_lines() if line is not None),
               default=code.co_firstlineno)


def profile_run(train_args: list[str]) -> dict:
    """{"run": {file: set of lines}, "loop": {...}, "functions": n}: the lines of the project's
    functions that ran during train.main(train_args), and of those that ran inside the loop."""
    import train
    run, loop, functions, depth, loop_functions = {}, {}, set(), [0], set()

    def record(into: dict, code) -> None:
        into.setdefault(code.co_filename, set()).update(range(code.co_firstlineno,
                                                              last_line(code) + 1))

    def profiler(frame, event, arg):
        code = frame.f_code
        if event not in ("call", "return") or not code.co_filename.startswith(str(ROOT)) \
                or code.co_flags & FUNCTION != FUNCTION:  # a module's or class's body: not a function
            return
        if code is train.train_model.__code__:
            depth[0] += 1 if event == "call" else -1
        if event == "call":
            functions.add((code.co_filename, code.co_firstlineno, code.co_name))
            record(run, code)
            if depth[0]:
                record(loop, code)
                loop_functions.add((code.co_filename, code.co_name))

    sys.setprofile(profiler)
    try:
        train.main(train_args)
    finally:
        sys.setprofile(None)
    return {"run": run, "loop": loop, "functions": len(functions),
            "loop_functions": sorted(loop_functions)}


def summary(result: dict) -> dict:
    rel = lambda f: os.path.relpath(f, ROOT)  # noqa: E731
    per_file = {rel(f): len(lines) for f, lines in sorted(result["run"].items())}
    return {"functions": result["functions"], "lines": sum(per_file.values()),
            "files": per_file, "loop_files": sorted(rel(f) for f in result["loop"]),
            "loop_lines": sum(len(v) for v in result["loop"].values())}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__, prog="reading_budget.py")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("train_args", nargs="*", help="train.py's arguments, after -- (default: "
                                                 "--model tiny --max-steps 2 --no-generate)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    train_args = args.train_args or ["--model", "tiny", "--max-steps", "2", "--no-generate"]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        s = summary(profile_run([*train_args, "--out-dir", out]))  # as run: --quiet adds a lambda
    if args.json:
        print(json.dumps(s, indent=2))
        return
    print(f"{s['functions']} functions spanning {s['lines']} lines in {len(s['files'])} files")
    for name, n in s["files"].items():
        print(f"  {name:24s} {n:5d}")
    print(f"the loop: {len(s['loop_files'])} files ({', '.join(s['loop_files'])}), "
          f"{s['loop_lines']} lines")


if __name__ == "__main__":
    main()
