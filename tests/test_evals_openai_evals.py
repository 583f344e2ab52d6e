import json
import re

import pytest
from evals_helpers import run_evaluate, run_here, save_forced_model, write_json

from evals import openai_evals as oe


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(text):
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]


def test_match_is_a_prefix_of_the_stripped_completion():
    assert oe.match("  Paris is the capital", ["Paris"]) == 1.0
    assert oe.match("The answer is Paris", ["Paris"]) == 0.0   # not at the start
    assert oe.match("paris", ["Paris"]) == 0.0                  # case counts
    assert oe.match("four.", ["4", "four"]) == 1.0             # any ideal answer


def test_includes_is_containment_optionally_case_blind():
    assert oe.includes("I think it is Paris.", ["Paris"]) == 1.0
    assert oe.includes("I think it is paris.", ["Paris"]) == 0.0
    assert oe.includes("I think it is paris.", ["Paris"], ignore_case=True) == 1.0


def test_fuzzy_match_accuracy_and_f1_by_hand():
    samples = [{"ideal": ["eiffel tower in paris"]}, {"ideal": ["x"]}, {"ideal": ["the"]},
               {"ideal": ["cat", "dog"]}]
    completions = ["The Eiffel Tower!", "", "a", "concatenate"]
    # 1: "eiffel tower" is inside "eiffel tower in paris" -> 1; F1: P 2/2, R 2/4 -> 2/3
    # 2: "" matches only "" -> 0; F1 0
    # 3: "a" and "the" both normalise to "" -> a match, yet F1 0 (nothing shared)
    # 4: "cat" is a substring of "concatenate" -> 1; F1 0 (different tokens)
    assert [oe.fuzzy_match(c, s["ideal"])[0] for s, c in zip(samples, completions)] == \
        [1.0, 0.0, 1.0, 1.0]
    scores = oe.score_samples(samples, completions, "fuzzy_match")
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["f1_score"] == pytest.approx(100 * (2 / 3) / 4)


def test_chat_prompt_as_text_for_a_completion_model():
    assert oe.chat_to_text([{"role": "user", "content": "Hi"}]) == "Hi"
    assert oe.chat_to_text(chat("2+2?")) == "Answer briefly.\nUser: 2+2?\nAssistant: "
    shots = [{"role": "system", "name": "example_user", "content": "1+1?"},
             {"role": "system", "name": "example_assistant", "content": "2"},
             {"role": "user", "content": "2+2?"}]
    assert oe.chat_to_text(shots) == "User: 1+1?\nAssistant: 2\nUser: 2+2?\nAssistant: "


REGISTRY = """# an eval and its alias, as in evals/registry/evals/*.yaml
arith:
  id: arith.dev.v0
  description: Arithmetic  # a comment
  metrics: [accuracy]
arith.dev.v0:
  class: evals.elsuite.basic.includes:Includes
  args:
    samples_jsonl: arith/samples.jsonl
    ignore_case: true
"""


def test_registry_yaml_gives_class_and_args(tmp_path):
    parsed = oe.parse_registry(REGISTRY)
    assert parsed["arith"] == {"id": "arith.dev.v0", "description": "Arithmetic",
                               "metrics": ["accuracy"]}
    registry = tmp_path / "arith.yaml"
    registry.write_text(REGISTRY)
    samples = tmp_path / "data" / "arith" / "samples.jsonl"
    args = {"samples_jsonl": "arith/samples.jsonl", "ignore_case": "true"}
    assert oe.registry_eval(registry, samples, None) == ("includes", args)
    assert oe.registry_eval(registry, samples, "arith") == ("includes", args)
    with pytest.raises(ValueError, match="no eval 'nope'"):
        oe.registry_eval(registry, samples, "nope")
    with pytest.raises(ValueError, match="0 evals read other.jsonl"):
        oe.registry_eval(registry, tmp_path / "other.jsonl", None)


def test_cli_predictions_with_registry(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "data" / "arith" / "samples.jsonl",
                          [{"input": chat("2+2?"), "ideal": "Four"},
                           {"input": "3+3?", "ideal": ["6", "six"]}])
    (tmp_path / "arith.yaml").write_text(REGISTRY)
    preds = write_json(tmp_path / "p.json", ["it is four", "7"])
    r = run_evaluate("openai-evals", samples, "--registry", tmp_path / "arith.yaml",
                     "--predictions", preds, "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    # includes, case-blind from the registry: "four" in "it is four" -> 1; "7" -> 0
    assert "| includes | 2 | 50.0 |" in r.stdout
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(50.0)
    r = run_here(capsys, "openai-evals", samples, "--eval-class", "match", "--predictions", preds)
    assert "| match | 2 | 0.0 |" in r.stdout


def test_cli_model_match(tmp_path, capsys):
    model = save_forced_model(tmp_path / "model.pt", " Paris")
    samples = write_jsonl(tmp_path / "samples.jsonl",
                          [{"input": chat("Capital of France?"), "ideal": "Paris"},
                           {"input": chat("Capital of England?"), "ideal": "London"}])
    r = run_here(capsys, "openai-evals", samples, "--model-path", model, "--max-new-tokens", "2",
                     "--output", tmp_path / "p.json", "--report", tmp_path / "r.md")
    assert r.returncode == 0, r.stderr
    # the completion " Paris Paris" starts with "Paris" once stripped: 1 of 2
    assert json.loads((tmp_path / "p.json").read_text()) == [" Paris Paris"] * 2
    assert "| match | 2 | 50.0 |" in r.stdout
    assert "## OpenAI Evals (match): " in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("lines,message", [
    (['{"input": "a", "ideal": "b"}', "{oops"], r"samples.jsonl:2: not JSON"),
    (['{"input": "a"}'], r"samples.jsonl:1: expected an object with 'input' and 'ideal'"),
    (['{"input": [{"role": "user"}], "ideal": "b"}'], r":1: input\[0\] should be"),
    (['{"input": "a", "ideal": []}'], r":1: 'ideal' is an empty list"),
    (['{"input": "a", "ideal": ["b", 3]}'], r":1: ideal\[1\]: expected a string"),
    (["", "  "], r"samples.jsonl: no samples"),
])
def test_cli_bad_samples_are_one_line_exit_2(tmp_path, lines, message, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = run_here(capsys, "openai-evals", path, "--predictions", write_json(tmp_path / "p.json", []))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and re.search(message, r.stderr), r.stderr


def test_cli_unsupported_registry_class(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"input": "a", "ideal": "b"}])
    (tmp_path / "r.yaml").write_text("x:\n  class: evals.elsuite.modelgraded.classify:Classify\n")
    r = run_here(capsys, "openai-evals", samples, "--registry", tmp_path / "r.yaml", "--eval", "x",
                     "--predictions", write_json(tmp_path / "p.json", ["b"]))
    assert r.returncode == 2 and "Classify is not one of the basic evals" in r.stderr
