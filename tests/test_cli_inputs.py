"""Every bad input to every script is one line on stderr naming the option, exit 2, before any
work and with nothing written. The parsers themselves are walked (a new option is covered the day
it is added): each number outside its range, each file missing, empty or a folder, each folder
missing or a file, each device that is not here, fed to the script's main in this process as
`python SCRIPT` runs it. Then the cases the issue named, the rules between flags, and the help
that explains every option."""
import argparse
import functools
import importlib
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import evaluate
import generate
import gpt
import train
from data import cli_main, input_file, load_data
from evals import common, humaneval, report
from extras import dpo, export
from script_loader import load_script
from serve import server
from training import checkpoint, run

ROOT = Path(__file__).resolve().parent.parent
# the scripts run by path, each with its flags' parser and its main (argv -> None)
TOP = {"train.py": (run.build_parser, train.main), "generate.py": (generate.build_parser,
       generate.main), "evaluate.py": (evaluate.build_parser, evaluate.main),
       "extras/dpo.py": (dpo.build_parser, dpo.main), "extras/export.py": (export.build_parser,
       export.main), "serve/server.py": (server.build_parser, server.main)}
BY_PATH = ("data/generate_entries.py", "data/pretrain_tiny.py", "data/make_dataset.py",
           "data/make_preferences.py", "data/near_duplicates.py", "benchmarks/bench.py",
           "benchmarks/bench_generate.py", "benchmarks/bench_lora.py", "benchmarks/book_job.py",
           "benchmarks/job_flops.py", "benchmarks/near_duplicates_52k.py",
           "benchmarks/reading_budget.py", "benchmarks/tiny_families.py")
NAMES = [*TOP, *(f"evaluate.py {b}" for b in evaluate.BENCHMARKS), *BY_PATH]


@functools.cache
def script(name: str):
    """(build_parser, main) of a script named as a user types it."""
    if name in TOP:
        return TOP[name]
    if name.startswith("evaluate.py "):
        benchmark = name.split()[1]
        module = importlib.import_module(evaluate.BENCHMARKS[benchmark])
        return module.build_parser, lambda argv: evaluate.main([benchmark, *argv])
    module = load_script(name)
    return module.build_parser, module.main


# ---- what counts as out of range, by the option's type --------------------------------------
UNUSABLE = ["tpu"] + [d for d, ok in (("cuda", torch.cuda.is_available()),
                                      ("mps", torch.backends.mps.is_available())) if not ok]
FILE_TYPES = {input_file, evaluate.responses_file, run.data_file_or_url}
FOLDER_TYPES = {common.input_folder}
OTHER_TYPES = {  # types of their own: values each refuses
    gpt.usable_device: UNUSABLE, checkpoint.parse_every: ["-1", "x", "nanm"],
    run.parse_fields: ["prompt", "answer=x"], humaneval.k_values: ["0", "1,x"],
    report.task_spec: ["nope", "ref", "ref:missing.json", "mc:empty.json", "mc:folder"]}
PLAIN_TYPES = {None, Path}  # text, and paths the script writes (checked before any work)


def bad_values(action) -> list[str]:
    """Values of `action` that must be refused, from its type."""
    if action.type in FILE_TYPES:
        return ["missing.json", "empty.json", "folder"]
    if action.type in FOLDER_TYPES:
        return ["missing", "empty.json"]
    if action.type in OTHER_TYPES:
        return OTHER_TYPES[action.type]
    kind, low, high, above = action.type.bounds  # data.number's types
    step = 1 if kind is int else 0.5
    values = [low if above else low - step, "x"] + ([high + step] if high < math.inf else [])
    return [str(v) for v in values] + (["nan", "inf"] if kind is float else [])


def walked() -> list[tuple[str, list[str], str]]:
    """(script, argv, the option's name in the message) for every bad value of every option."""
    cases = []
    for name in NAMES:
        before = []  # a positional comes after those before it ("evaluate.py glue TASK DIR")
        for action in script(name)[0]()._actions:
            if action.type in PLAIN_TYPES or action.help == argparse.SUPPRESS:
                before += [] if action.option_strings else ["x"]
                continue
            flag = "/".join(action.option_strings) or action.metavar or action.dest
            for value in bad_values(action):
                argv = [action.option_strings[0], value] if action.option_strings else [*before,
                                                                                         value]
                cases.append((name, argv, flag))
    return cases


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder but for the bad files: outputs' defaults (out/, ...) land here."""
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(capsys, workdir, name: str, argv: list[str]) -> str:
    """The one line `python NAME ARGV` gives, after checking exit 2 and that nothing was written."""
    before = sorted(workdir.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: script(name)[1](argv))
    out, err = capsys.readouterr()
    assert stop.value.code == 2, (name, argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, argv, err)
    assert "Traceback" not in err and not out.strip(), (name, argv, out)
    assert sorted(workdir.rglob("*")) == before, (name, argv)
    return err


def test_every_script_that_reads_flags_is_walked():
    walked_files = {*TOP, *BY_PATH, *(f"{m.replace('.', '/')}.py"
                                      for m in evaluate.BENCHMARKS.values())}
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for path in tracked:
        text = (ROOT / path).read_text(encoding="utf-8")
        if not path.startswith("tests/") and "__main__" in text and "add_argument(" in text:
            assert path in walked_files, f"{path} reads flags: add it to BY_PATH"


def test_every_parser_is_walked_and_every_type_is_known():
    for name in NAMES:
        for action in script(name)[0]()._actions:
            known = action.type in PLAIN_TYPES | FILE_TYPES | FOLDER_TYPES | set(OTHER_TYPES)
            assert known or hasattr(action.type, "bounds"), (name, action.dest, action.type)
    assert len(walked()) > 500  # numbers, files, folders and devices of 31 parsers


def test_every_bad_number_file_or_device_is_one_line_naming_the_option(capsys, workdir):
    for name, argv, flag in walked():
        err = refused(capsys, workdir, name, argv)
        assert f"argument {flag}: " in err, (name, argv, err)


# ---- the cases the issue named ----------------------------------------------------------------
NAMED = [
    ("train.py", ["--eval-every", "0"], "--eval-every"),
    ("extras/dpo.py", ["--eval-every", "0"], "--eval-every"),
    ("train.py", ["--epochs", "-1"], "--epochs"),
    ("train.py", ["--max-steps", "-3"], "--max-steps"),
    ("train.py", ["--max-length", "-5"], "--max-length"),
    ("train.py", ["--warmup-steps", "-5"], "--warmup-steps"),
    ("train.py", ["--max-new-tokens", "-1"], "--max-new-tokens"),
    ("train.py", ["--model", "tiny", "--max-length", "300"], "tiny's context length 256"),
    ("generate.py", ["--model-path", "empty.json"], "empty.json: is empty"),
    ("extras/export.py", ["empty.json", "--to", "model", "x.pt"], "empty.json: is empty"),
    ("serve/server.py", ["empty.json"], "empty.json: is empty"),
    ("evaluate.py report", ["empty.json"], "empty.json: is empty"),
    ("evaluate.py", ["--worst", "-3", "x.json"], "--worst"),
    ("evaluate.py pairwise", ["--annotations", "missing.json"], "missing.json: no such file"),
    ("evaluate.py", ["mmlux", "folder"], "nor a benchmark (squad, triviaqa,"),
    ("evaluate.py", ["--quiet", "squad", "missing.json"], "argument file: missing.json"),
    ("evaluate.py", ["--limit", "3", "squad", "x.json"], "options go after its name"),
    ("generate.py", ["--model-path", "empty.json", "--input", "x"], "empty.json"),
    *[(name, ["--device", device], f"{device}: not usable here (usable: ")
      for name in ("train.py", "generate.py", "serve/server.py", "extras/dpo.py",
                   "evaluate.py report") for device in UNUSABLE],
]


@pytest.mark.parametrize("name, argv, message", NAMED)
def test_the_named_cases_are_one_line_and_exit_2(capsys, workdir, name, argv, message):
    assert message in refused(capsys, workdir, name, argv)


def test_rules_between_flags_are_checked_before_any_work(capsys, workdir):
    (workdir / "model.pt").write_bytes(b"x")
    for name, argv, message in [
            ("generate.py", ["--model-path", "model.pt", "--input", "x"], "--input needs --prompt"),
            ("generate.py", ["--model-path", "model.pt", "--input-file", "model.pt"],
             "--input-file and --output go together"),
            ("evaluate.py", ["model.pt", "--write-scores"], "--write-scores needs --judge"),
            ("evaluate.py arena", ["model.pt", "model.pt", "--rounds", "2"], "--rounds needs"),
            ("evaluate.py glue", ["sst2", "folder", "--model-path", "model.pt", "--shots", "1",
                                  "--split", "train"], "--shots with --split train")]:
        assert message in refused(capsys, workdir, name, argv)


@pytest.mark.parametrize("name, argv", [
    ("generate.py", ["--model-path", "text.pt", "--prompt", "Hi"]),
    ("generate.py", ["--model-path", "cut.pt", "--prompt", "Hi"]),
    ("extras/export.py", ["text.pt", "--to", "model", "out.pt"]),
    ("serve/server.py", ["text.pt"]),
    ("evaluate.py report", ["text.pt", "--limit", "1"])])
def test_a_text_or_truncated_file_given_as_a_model_is_one_line(capsys, workdir, name, argv):
    (workdir / "text.pt").write_text("hello\n")
    (workdir / "cut.pt").write_bytes((ROOT / "data" / "tiny-pretrained.pt").read_bytes()[:4000])
    err = refused(capsys, workdir, name, argv)
    assert ("text.pt: not a PyTorch checkpoint: a text file" in err
            or "cut.pt: not a PyTorch checkpoint this project can load safely: truncated" in err)


# ---- values that are legitimate: the help says what they mean, the run does it ----------------
def test_eval_batches_0_means_all_and_eval_every_past_the_end_means_start_and_end(
        tmp_path, monkeypatch):
    seen, real = [], train.evaluate_model
    monkeypatch.setattr(train, "evaluate_model",
                        lambda *a, **k: (seen.append(a[4]), real(*a, **k))[1])
    data = tmp_path / "slice.json"
    data.write_text(json.dumps(load_data(ROOT / "data" / "instruction-data.json")[:40]))
    train.main(["--model", "tiny", "--data", str(data), "--batch-size", "4", "--max-steps", "2",
                "--eval-every", "1000", "--eval-batches", "0", "--no-generate", "--quiet",
                "--no-checkpoint", "--out-dir", str(tmp_path / "out")])
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2] and seen == [None, None]  # None: every batch
    for build in (run.build_parser, dpo.build_parser):
        helps = {a.dest: a.help for a in build()._actions}
        assert "0: all of them" in helps["eval_batches"]
        assert "more than the run's steps: only then" in helps["eval_every"]


# ---- help that explains -----------------------------------------------------------------------
def test_every_option_has_help_with_its_default_and_every_description_is_whole():
    for name in NAMES:
        parser = script(name)[0]()
        assert parser.description and parser.description.rstrip().endswith((".", ")")), name
        parser.format_help()  # every %(default)s and %% in the help strings expands
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help and action.help.strip(), (name, action.dest)
            default = action.default
            if not (default is None or default is False or default == argparse.SUPPRESS):
                assert "default" in action.help, (name, action.dest)


def test_the_defaults_that_differ_by_preset_say_each_presets_value():
    helps = {a.dest: a.help for a in run.build_parser()._actions}
    for key in run.BOOK_DEFAULTS:  # each preset's value, and its name where they differ
        differ = len({str(d[key]) for d in run.PRESETS.values()}) > 1
        for name, defaults in run.PRESETS.items():
            value = defaults[key]
            shown = "on" if value is True else "off" if value is False else str(value)
            assert shown in helps[key] and (name in helps[key] or not differ), (key, helps[key])
    assert "gpt2-* 20, tiny 0, tiny --from-scratch 6" in helps["patience"]


def test_evaluate_names_its_benchmarks_in_the_usage_and_each_dir_help_its_own_folders():
    usage = evaluate.build_parser().format_usage()
    assert "BENCHMARK" in usage and "RESPONSES" in usage
    assert ", ".join(evaluate.BENCHMARKS) in " ".join(evaluate.build_parser().format_help().split())
    glue, superglue = (script(f"evaluate.py {b}")[0]() for b in ("glue", "superglue"))
    glue_dir, superglue_dir = ({a.dest: a.help for a in p._actions}["dir"]
                               for p in (glue, superglue))
    assert "SST-2/" in glue_dir and "BoolQ" not in glue_dir
    assert "BoolQ/" in superglue_dir and "SST-2" not in superglue_dir
