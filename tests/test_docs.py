"""The documentation names only what exists: every script a command in README.md or docs/*.md runs
(`python PATH ...`, `torchrun ... PATH ...`, in ```bash blocks and in inline code), every
`--flag` such a command passes (found in that script's `--help`; `evaluate.py <benchmark>`: the
benchmark's own `--help`), and every relative link (the file, and a `#heading` in it).

Each distinct `--help` runs once, from the repository root with COLUMNS=200, in a child forked
from one interpreter that imported torch once (a few seconds for all of them). What is not
checked: a script named in inline code without `python` unless the path exists as written
(`train.py --keep-last` is checked, a stale `serve.py --host` is not), single-dash flags,
positional arguments."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# scripts of other projects that the docs tell the reader to run (llama.cpp's converter)
EXTERNAL = {"convert_hf_to_gguf.py"}
# `evaluate.py <benchmark> ...` (docs/evaluation.md) stands for the benchmarks with reference
# answers that generate (MMLU, which takes fewer flags, is said there to take the same except two)
GENERIC_BENCHMARKS = ("squad", "triviaqa", "bigbench", "openai-evals")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w-]*)")
SHELL = {"bash", "sh", "shell"}
SEPARATORS = {"&&", "||", ";", "|"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def benchmark_names() -> set[str]:
    from evaluate import BENCHMARKS
    return set(BENCHMARKS)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- reading the Markdown ------------------------------------------------------------------------
def split_fences(text: str) -> tuple[list[str], str]:
    """(the logical lines of shell blocks, the text outside every fenced block)."""
    shell, prose, fence, lang = [], [], None, ""
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if fence is None and m:
            fence, lang = m.group(1), m.group(2).lower()
            continue
        if fence is not None and line.strip().startswith(fence) and not line.strip(fence).strip():
            fence = None
            continue
        if fence is None:
            prose.append(line)
        elif lang in SHELL:
            if shell and shell[-1].endswith("\\"):
                shell[-1] = shell[-1][:-1] + " " + line.strip()
            else:
                shell.append(line.strip())
    return shell, "\n".join(prose)


def inline_code(prose: str) -> list[str]:
    """Inline code spans (which may run over a line break), as one line each."""
    prose = prose.replace("\\`", "")  # an escaped backtick opens no span
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def strip_comment(line: str) -> str:
    """The line without a shell comment (`#` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(line: str) -> list[list[str]]:
    """The commands of one shell line, split at && || ; | outside [optional] brackets."""
    words = shlex.split(strip_comment(line))
    out, current, depth = [], [], 0
    for word in words:
        if word in SEPARATORS and depth <= 0:
            out.append(current)
            current = []
            continue
        depth += word.count("[") - word.count("]")
        current.append(word)
    return [c for c in out + [current] if c]


def script_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) for `[ENV=..] [time] python SCRIPT ...` or `torchrun ... SCRIPT
    ...`; None for anything else (`python -m pytest`, `python -I -S`, pip, curl, ...)."""
    while words and (ENV.match(words[0]) or words[0] == "time"):
        words = words[1:]
    if len(words) < 2:
        return None
    if words[0] in ("python", "python3"):
        return None if words[1].startswith("-") else (words[1], words[2:])
    if words[0] == "torchrun":
        for i, word in enumerate(words):
            if word.endswith(".py"):
                return word, words[i + 1:]
    return None


def doc_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(the command as written, script, arguments) for every script call in one doc."""
    shell, prose = split_fences(path.read_text(encoding="utf-8"))
    found, benchmarks = [], benchmark_names()
    candidates = list(shell)
    for span in inline_code(prose):  # `python X.py ...`, `X.py --flag ...`, `squad FILE ...`
        first = span.split(" ")[0]
        if re.match(r"^((\w+=\S+|time) )*(python3?|torchrun) ", span):
            candidates.append(span)
        elif " " in span and first.endswith(".py") and (ROOT / first).is_file():
            candidates.append("python " + span)
        elif " " in span and first in benchmarks:
            candidates.append("python evaluate.py " + span)
    for line in candidates:
        try:
            parsed = commands(line)
        except ValueError:  # unbalanced quotes
            found.append((line, "", ["<cannot be parsed as a shell line>"]))
            continue
        for words in parsed:
            call = script_call(words)
            if call:
                found.append((line, *call))
    return found


# ---- what the scripts accept --------------------------------------------------------------------
def flags_of(args: list[str]) -> list[str]:
    """The `--flags` among a command's arguments ([--flag] counts; --flag=value is --flag)."""
    out = []
    for arg in args:
        word = arg.strip("[]")
        if word.startswith("--") and len(word) > 2:
            out.append(word.split("=", 1)[0])
    return out


def help_keys(script: str, args: list[str], benchmarks: set[str]) -> list[tuple[str, ...]]:
    """Which `--help` outputs a command's flags are read against: (script,) or (script, sub)."""
    if script == "evaluate.py" and args:
        if args[0] in benchmarks:
            return [(script, args[0])]
        if args[0] == "<benchmark>":
            return [(script, name) for name in GENERIC_BENCHMARKS]
    return [(script,)]


# One interpreter imports torch once and forks a child per --help, which runs the script as
# `python SCRIPT ... --help` would (argv, sys.path[0], __main__): 26 of them in a few seconds
# instead of a minute of importing torch again and again.
RUNNER = r"""
import json, os, runpy, sys, traceback
import torch  # noqa: F401
out = []
for key in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        script = os.path.abspath(key[0])
        sys.argv, sys.path[0], code = [key[0], *key[1:], "--help"], os.path.dirname(script), 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read, errors="replace") as f:
        text = f.read()
    out.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text])
print(json.dumps(out))
"""


def run_helps(keys: list[tuple[str, ...]]) -> list[str]:
    """Each key's `--help` output, or a line saying why there is none."""
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(keys)], cwd=ROOT, env=env,
                          check=False, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"the --help runner failed: {done.stderr[-2000:]}"
    return [text if code == 0 else f"<--help exited {code}: {text.strip()[-300:]}>"
            for code, text in json.loads(done.stdout.splitlines()[-1])]


def script_problem(script: str) -> str | None:
    if Path(script).name in EXTERNAL:
        return "external"
    if any(ch in script for ch in "*?["):
        return None if list(ROOT.glob(script)) else f"no file matches {script}"
    path = (ROOT / script).resolve()
    if not path.is_file() or ROOT not in path.parents:
        return f"{script} does not exist in the repository"
    return None


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], str]:
    benchmarks = benchmark_names()
    keys = set()
    for doc in DOCS:
        for _, script, args in doc_commands(doc):
            if script and script_problem(script) is None and "*" not in script:
                keys.update(help_keys(script, args, benchmarks))
    keys = sorted(keys)
    return dict(zip(keys, run_helps(keys)))


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_commands_name_scripts_and_flags_that_exist(doc, helps):
    benchmarks, problems = benchmark_names(), []
    for line, script, args in doc_commands(doc):
        line = " ".join(strip_comment(line).split())
        if not script:
            problems.append(f"`{line}`: {args[0]}")
            continue
        problem = script_problem(script)
        if problem == "external" or (problem is None and "*" in script):
            continue
        if problem:
            problems.append(f"`{line}`: {problem}")
            continue
        for key in help_keys(script, args, benchmarks):
            text = helps[key]
            shown = "python " + " ".join(key) + " --help"
            if text.startswith("<--help"):
                problems.append(f"`{shown}` failed: {text}")
                continue
            for flag in flags_of(args):
                if not has_flag(text, flag):
                    problems.append(f"`{line}`: {flag} is not in `{shown}`")
    assert not problems, f"{rel(doc)}:\n  " + "\n  ".join(dict.fromkeys(problems))


# ---- links -------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    seen, out = {}, set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """Link and image targets outside code."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    prose = re.sub(r"`[^`]+`", "", prose.replace("\\`", ""))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_point_to_files_and_headings_that_exist(doc):
    problems = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if ROOT != path and ROOT not in path.parents:
            problems.append(f"({target}): outside the repository")
        elif not path.exists():
            problems.append(f"({target}): {rel(path)} does not exist")
        elif anchor and path.suffix == ".md" and anchor.lower() not in anchors(path):
            problems.append(f"({target}): no heading #{anchor} in {rel(path)}")
    assert not problems, f"{rel(doc)}:\n  " + "\n  ".join(problems)
