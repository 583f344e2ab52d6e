import csv
import json
from pathlib import Path

import pytest
from evals_helpers import run_evaluate as run_cli
from evals_helpers import run_here, save_forced_model

from evals import mmlu


def write_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def test_read_mmlu_csv_parses_quoted_commas_and_refuses_bad_rows(tmp_path):
    write_csv(tmp_path / "ok.csv", [["What is 1, 2?", "x", "y", "z", "w", " b"]])
    rows = mmlu.read_mmlu_csv(tmp_path / "ok.csv")
    assert rows == [("What is 1, 2?", ["x", "y", "z", "w"], "B")]
    for name, rows, line in [("short", [["q", "a", "b", "A"]], 1),
                             ("letter", [list("qabcdA"), list("qabcdE")], 2),
                             ("header", [["question", "A", "B", "C", "D", "answer"]], 1)]:
        write_csv(tmp_path / f"{name}.csv", rows)
        with pytest.raises(ValueError, match=rf"{name}.csv:{line}: expected question, A, B, C, D"):
            mmlu.read_mmlu_csv(tmp_path / f"{name}.csv")
    with pytest.raises(ValueError, match=r"got answer 'E'"):
        mmlu.read_mmlu_csv(tmp_path / "letter.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no questions"):
        mmlu.read_mmlu_csv(tmp_path / "empty.csv")
    (tmp_path / "latin1.csv").write_bytes("Qu\xe9?,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv: not a UTF-8 CSV file"):
        mmlu.read_mmlu_csv(tmp_path / "latin1.csv")


def test_find_mmlu_subjects_in_split_and_flat_layouts(tmp_path):
    write_csv(tmp_path / "split" / "test" / "astronomy_test.csv", [["q", "a", "b", "c", "d", "A"]])
    write_csv(tmp_path / "split" / "dev" / "astronomy_dev.csv", [["q", "a", "b", "c", "d", "A"]])
    write_csv(tmp_path / "flat" / "high_school_physics_test.csv", [["q", "a", "b", "c", "d", "A"]])
    split = mmlu.find_mmlu_subjects(tmp_path / "split")
    assert split == {"astronomy": (tmp_path / "split/test/astronomy_test.csv",
                                   tmp_path / "split/dev/astronomy_dev.csv")}
    assert mmlu.find_mmlu_subjects(tmp_path / "flat") == {
        "high_school_physics": (tmp_path / "flat/high_school_physics_test.csv", None)}
    with pytest.raises(FileNotFoundError, match="no \\*_test.csv"):
        mmlu.find_mmlu_subjects(tmp_path / "split" / "dev")
    with pytest.raises(FileNotFoundError):
        mmlu.find_mmlu_subjects(tmp_path / "missing")


class CharTokenizer:
    """One token per character: prompt lengths are easy to count by hand."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_mmlu_prompt_format_and_cropping():
    tok = CharTokenizer()
    shots = [("1+1?", ["1", "2", "3", "4"], "B"), ("2+2?", ["4", "5", "6", "7"], "A")]
    q = ("3+3?", ["6", "7", "8", "9"], "A")
    header = ("The following are multiple choice questions (with answers) about "
              "high school math.\n\n")
    shot1 = "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    shot2 = "2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
    question = "3+3?\nA. 6\nB. 7\nC. 8\nD. 9\nAnswer:"
    full = header + shot1 + shot2 + question
    ids = mmlu.mmlu_prompt_ids(tok, "high_school_math", shots, q, max_len=1000)
    assert tok.decode(ids) == full
    # one token short of the full prompt: the last shot goes first
    ids = mmlu.mmlu_prompt_ids(tok, "high_school_math", shots, q, max_len=len(full) - 1)
    assert tok.decode(ids) == header + shot1 + question
    # too short even for zero shots: crop from the left, keep the end ("Answer:")
    ids = mmlu.mmlu_prompt_ids(tok, "high_school_math", shots, q, max_len=20)
    assert tok.decode(ids) == (header + question)[-20:]


@pytest.fixture(scope="module")
def forced_b_model(tmp_path_factory):
    """A tiny model whose next token is always " B", so it answers B to every question."""
    return save_forced_model(tmp_path_factory.mktemp("model") / "model.pt", " B")


def write_mmlu(root: Path):
    q = lambda text, answer: [text, "red", "green", "blue", "black", answer]  # noqa: E731
    write_csv(root / "test" / "astronomy_test.csv",
              [q("Color of Mars?", "A"), q("Sky?", "C"), q("Grass?", "B"), q("Night?", "D")])
    write_csv(root / "dev" / "astronomy_dev.csv", [q("Leaf?", "B"), q("Blood?", "A")])
    write_csv(root / "test" / "botany_test.csv", [q("Moss?", "B"), q("Fern?", "B")])


def test_mmlu_accuracy_with_a_model_forced_to_answer_b(forced_b_model, tmp_path):
    from data import get_tokenizer
    from gpt import load_model
    write_mmlu(tmp_path)
    model, cfg = load_model(forced_b_model)
    subjects = mmlu.load_mmlu(tmp_path, shots=5)
    answers = mmlu.mmlu_answers(model, get_tokenizer(), subjects, cfg["context_length"],
                                progress=False)
    assert answers == {"astronomy": ["B"] * 4, "botany": ["B"] * 2}
    results = mmlu.mmlu_results(subjects, answers)
    # astronomy: only "Grass?" is B -> 1/4; botany: both B -> 2/2
    assert results == {"astronomy": (1, 4), "botany": (2, 2)}
    table = mmlu.render_mmlu(results)
    assert "| astronomy | 4 | 25.0 |" in table and "| **overall** | 6 | 50.0 |" in table
    # a missing answer counts as wrong
    assert mmlu.mmlu_results(subjects, {"botany": ["B"]}) == {"astronomy": (0, 4),
                                                             "botany": (1, 2)}


def test_cli_mmlu(forced_b_model, tmp_path):
    write_mmlu(tmp_path)
    r = run_cli("mmlu", tmp_path, "--model-path", forced_b_model, "--shots", "1",
                "--json", tmp_path / "s.json", "--output", tmp_path / "p.json", "--limit", "3")
    assert r.returncode == 0, r.stderr
    # --limit 3: astronomy's first three (A, C, B) -> 1/3, botany 2/2, overall 3/5
    assert "| botany | 2 | 100.0 |" in r.stdout and "| **overall** | 5 | 60.0 |" in r.stdout
    assert "mmlu astronomy: 3 questions" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(60.0)
    assert json.loads((tmp_path / "p.json").read_text()) == {"astronomy": ["B"] * 3,
                                                             "botany": ["B"] * 2}


def test_cli_mmlu_bad_csv_is_one_line_exit_2(forced_b_model, tmp_path, capsys):
    write_csv(tmp_path / "test" / "x_test.csv", [["q", "a", "b", "c", "d", "Z"]])
    r = run_here(capsys, "mmlu", tmp_path, "--model-path", forced_b_model)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "x_test.csv:1: expected question, A, B, C, D, answer letter (got answer 'Z')" in r.stderr


def test_old_mmlu_flag_is_gone(tmp_path, capsys):
    r = run_here(capsys, "--mmlu", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "nor a benchmark (squad, triviaqa, bigbench, openai-evals, mmlu," in r.stderr


def test_predictions_mode_scores_without_a_model(tmp_path, capsys):
    write_mmlu(tmp_path)
    preds = tmp_path / "p.json"
    # astronomy answers A, C, D, D: right, right, wrong, right -> 3/4; botany missing -> 0/2
    preds.write_text(json.dumps({"astronomy": ["A", "C", "D", "D"]}))
    r = run_here(capsys, "mmlu", tmp_path, "--predictions", preds)
    assert r.returncode == 0, r.stderr
    assert "| astronomy | 4 | 75.0 |" in r.stdout and "| **overall** | 6 | 50.0 |" in r.stdout
    preds.write_text(json.dumps({"astronomy": ["A", 2]}))
    r = run_here(capsys, "mmlu", tmp_path, "--predictions", preds)
    assert r.returncode == 2 and "p.json: astronomy[1]: expected a string" in r.stderr


def test_mmlu_answers_read_the_last_position_of_each_own_prompt(tmp_path):
    """A random model with lively weights answers by the prompt (not always one letter); each
    expected letter comes from the book's full forward pass on the prompt written out by hand."""
    import torch

    from data import get_tokenizer
    from gpt import GPTModel, model_config
    torch.manual_seed(3)
    model = GPTModel(model_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    tok = get_tokenizer()
    questions = [(f"Which color is thing number {k}?", "A") for k in range(8)]
    write_csv(tmp_path / "test" / "astronomy_test.csv",
              [[q, "red", "green", "blue", "black", a] for q, a in questions])
    answers = mmlu.mmlu_answers(model, tok, mmlu.load_mmlu(tmp_path, shots=0), 256,
                                progress=False)["astronomy"]
    letter_ids = [tok.encode(f" {c}")[0] for c in "ABCD"]
    expected = []
    for q, _ in questions:
        text = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                f"{q}\nA. red\nB. green\nC. blue\nD. black\nAnswer:")
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(text)]))[0, -1]
        expected.append("ABCD"[int(logits[letter_ids].argmax())])
    assert answers == expected
    assert len(set(expected)) >= 2  # the answer depends on the question
