import json
import re

import pytest
from evals_helpers import run_evaluate, run_here, save_forced_model, write_json

from evals import bigbench

ARITHMETIC = {"name": "arithmetic", "task_prefix": "Answer.\n", "example_input_prefix": "Q: ",
              "example_output_prefix": " A: ", "few_shot_example_separator": "\n\n",
              "examples": [{"input": "1+1", "target": "2"},
                           {"input": "2+2", "target": ["4", "four"]},
                           {"input": "3+3", "target": "6"}]}
COLORS = {"examples": [{"input": "Sky?", "target_scores": {"red": 0, "blue": 1}},
                       {"input": "Grass?", "target_scores": {"green": 1, "blue": 0}}]}


def read(tmp_path, task, name="task.json", metric="auto"):
    return bigbench.read_task(write_json(tmp_path / name, task), metric)


def test_prompt_layout_with_prefixes_and_shots(tmp_path):
    task = read(tmp_path, ARITHMETIC)
    assert task["metric"] == "exact_str_match"
    assert bigbench.build_prompt(task, 2, shots=2) == \
        "Answer.\nQ: 1+1 A: 2\n\nQ: 2+2 A: 4\n\nQ: 3+3 A: "
    # the shots are the first examples other than the one asked
    assert bigbench.build_prompt(task, 0, shots=1) == "Answer.\nQ: 2+2 A: 4\n\nQ: 1+1 A: "


def test_multiple_choice_layout_uses_json_task_defaults(tmp_path):
    task = read(tmp_path, COLORS)
    assert task["metric"] == "multiple_choice_grade"
    # default input prefix "\nQ: ", choices appended with "\n  choice: ", output prefix "\nA: "
    assert bigbench.build_prompt(task, 0, shots=0) == \
        "\nQ: Sky?\n  choice: red\n  choice: blue\nA: "
    # a shot shows the best-scored choice as its answer
    assert bigbench.build_prompt(task, 1, shots=1).startswith(
        "\nQ: Sky?\n  choice: red\n  choice: blue\nA: blue\n\nQ: Grass?")


def test_big_bench_hard_cot_prompt_layout(tmp_path):
    task = read(tmp_path, {"examples": [{"input": "3+3", "target": "6"}]})
    cot_file = "BBH canary GUID\n-----\nQ: 1+1\nA: Let's think step by step. So the answer is 2.\n"
    task = bigbench.with_prompt_options(task, cot_file, cot=True)
    # BBH: "<cot prompt>\n\nQ: <input>\nA: Let's think step by step."
    assert bigbench.build_prompt(task, 0, shots=0) == (
        "Q: 1+1\nA: Let's think step by step. So the answer is 2.\n\nQ: 3+3\n"
        "A: Let's think step by step.")


def test_exact_str_match_and_cot_extraction(tmp_path):
    task = read(tmp_path, ARITHMETIC)
    # " 2 \n" strips to "2": right; "four" is the second target: right; "7" is wrong
    assert bigbench.grade(task, [" 2 \n", "four", "7"]) == [1.0, 1.0, 0.0]
    cot = ["1 and 1 make 2. So the answer is 2.", "So The Answer Is four", "the answer: 6"]
    # CoT: the first line after the last "the answer is", one final "." dropped;
    # the third has no "the answer is", so the whole text is compared and fails
    assert bigbench.grade(task, cot, cot=True) == [1.0, 1.0, 0.0]
    regex = read(tmp_path, dict(ARITHMETIC, output_regex="[0-9]+", stop_string="."), "r.json")
    assert bigbench.grade(regex, ["it is 2. or 3", "no digits", "6"]) == [1.0, 0.0, 1.0]


def test_multiple_choice_grade_uses_target_scores_and_chance(tmp_path):
    task = read(tmp_path, {"examples": [
        {"input": "q1", "target_scores": {"a": 1, "b": 0.5, "c": 0}},
        {"input": "q2", "target_scores": {"x": 1, "y": 0}}]})
    # q1 picks "b" -> its score 0.5; q2's "z" is no option -> 0
    assert bigbench.grade(task, ["b", "z"]) == [0.5, 0.0]
    # a uniform guess: q1 (1 + 0.5 + 0) / 3 = 0.5, q2 1/2 -> 50 %
    assert bigbench.chance_grade(task) == pytest.approx(50.0)


def test_cli_model_multiple_choice_by_log_likelihood(tmp_path, capsys):
    model = save_forced_model(tmp_path / "model.pt", " Blue")
    task = {"example_output_prefix": "\nA:", "examples": [
        {"input": "Sky?", "target_scores": {" Red": 0, " Blue": 1}},
        {"input": "Grass?", "target_scores": {" Green": 1, " Blue": 0}},
        {"input": "Sea?", "target_scores": {" Blue": 1, " Black": 0, " Red": 0}}]}
    path = write_json(tmp_path / "task.json", task)
    r = run_here(capsys, "bigbench", path, "--model-path", model, "--output", tmp_path / "p.json",
                     "--json", tmp_path / "s.json", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    # the model always puts " Blue" first: right, wrong, right; a guess: (1/2 + 1/2 + 1/3) / 3
    assert json.loads((tmp_path / "p.json").read_text()) == [" Blue"] * 3
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["multiple_choice_grade"] == pytest.approx(200 / 3)
    assert scores["chance"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert "scored 3/3 examples" in r.stderr
    # the predictions written score the same without the model
    r = run_here(capsys, "bigbench", path, "--predictions", tmp_path / "p.json")
    assert r.returncode == 0 and "| 3 | 66.7 | 44.4 |" in r.stdout


def test_cli_model_generative_with_limit_and_shots(tmp_path):
    model = save_forced_model(tmp_path / "model.pt", " 4")
    path = write_json(tmp_path / "task.json", ARITHMETIC)
    r = run_evaluate("bigbench", path, "--model-path", model, "--max-new-tokens", "1",
                     "--limit", "2", "--shots", "2", "--output", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    # " 4" for "1+1" (wrong) and "2+2" (right) -> 50 %
    assert json.loads((tmp_path / "p.json").read_text()) == [" 4", " 4"]
    assert "| arithmetic | 2 | 50.0 |" in r.stdout


@pytest.mark.parametrize("task,message", [
    ({"name": "x"}, r"task.json: missing 'examples'"),
    ({"examples": []}, r"task.json: 'examples' is empty"),
    ({"examples": [{"input": "a", "target": "b"}, {"input": "c"}]},
     r"task.json: examples\[1\]: missing 'target'"),
    ({"examples": [{"input": "a", "target_scores": {"b": "yes"}}]},
     r"examples\[0\]: target_scores\['b'\] should be a number"),
    ({"examples": [{"input": 3, "target": "b"}]}, r"examples\[0\]: 'input' should be str"),
    ({"examples": [{"input": "a", "target": "b"}], "example_input_prefix": 1},
     r"'example_input_prefix' should be str"),
])
def test_cli_bad_task_is_one_line_exit_2(tmp_path, task, message, capsys):
    path = write_json(tmp_path / "task.json", task)
    r = run_here(capsys, "bigbench", path, "--predictions", write_json(tmp_path / "p.json", ["b"]))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and re.search(message, r.stderr), r.stderr


def test_cli_bad_predictions_and_shots(tmp_path, capsys):
    path = write_json(tmp_path / "task.json", ARITHMETIC)
    r = run_here(capsys, "bigbench", path, "--predictions", write_json(tmp_path / "p.json", ["2"]))
    assert r.returncode == 2 and "p.json: 1 predictions for 3 examples" in r.stderr
    r = run_here(capsys, "bigbench", path, "--predictions", write_json(tmp_path / "q.json", [2]))
    assert r.returncode == 2 and "q.json[0]: expected a string" in r.stderr
    r = run_here(capsys, "bigbench", path, "--predictions", tmp_path / "p.json", "--shots", "3")
    assert r.returncode == 2 and "--shots 3: the task has 3 examples" in r.stderr
