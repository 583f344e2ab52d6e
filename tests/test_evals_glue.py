import json
import math
from pathlib import Path

import pytest
import torch

import evaluate
from data import cli_main, get_tokenizer
from evals import glue
from evals.classify import Item, expected_value, few_shot_prefix, next_token_logprobs, option_scores
from evals.common import continuation_logprobs
from evals.metrics import (accuracy, average_ranks, f1_score, macro_f1, matthews_corrcoef,
                           pearson, spearman)
from gpt import GPTModel, save_model

CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}
YES, NO, POSITIVE, FIVE = 3763, 645, 3967, 642  # " yes", " no", " positive", " 5"


def constant_model(logits: dict[int, float]) -> GPTModel:
    """A real GPTModel whose next-token logits are the same at every position: the final
    LayerNorm's weight is 0 and its bias e0, so the head gives token t the logit W[t, 0]."""
    model = GPTModel(CFG).eval()
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0
        model.out_head.weight[:, 0] = 0.0
        for token, value in logits.items():
            model.out_head.weight[token, 0] = value
    return model


# ---- metrics, against hand computation --------------------------------------------------------
def test_accuracy_f1_and_matthews_hand_worked():
    pred, gold = [1, 1, 0, 1, 0], [1, 0, 1, 1, 0]
    # TP = 2 (items 0, 3), FP = 1 (item 1), FN = 1 (item 2), TN = 1 (item 4)
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    assert f1_score(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(pred, gold) == pytest.approx(1 / 6)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: undefined -> 0
    assert f1_score([0, 0], [1, 1]) == 0.0


def test_macro_f1_hand_worked():
    pred, gold = [0, 0, 1, 2, 2], [0, 1, 1, 2, 0]
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 1, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 2/3
    assert macro_f1(pred, gold, [0, 1, 2]) == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_pearson_and_spearman_with_ties_hand_worked():
    # x, y centred: (-1, 0, 1), (-1, 1, 0): covariance 1, each norm sqrt(2) -> 1/2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert average_ranks([5, 1, 5]) == [2.5, 1.0, 2.5]
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), centred (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5):
    # covariance 4.5, norms sqrt(4.5) and sqrt(5) -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0


def test_expected_value_over_label_words():
    # weights exp(logp) proportional to (1, 1, 1, 1, 1, 4): (1+2+3+4+5*4) / 9 = 30/9
    logps = [0.0] * 5 + [math.log(4)]
    assert expected_value([v - 7 for v in logps]) == pytest.approx(30 / 9)


# ---- scoring on a model whose outputs the test controls ---------------------------------------
def test_label_with_the_higher_log_likelihood_wins():
    model, tok = constant_model({YES: 3.0, NO: 1.0}), get_tokenizer()
    z = math.log(50255 + math.exp(3) + math.exp(1))  # log-sum-exp of all 50257 logits
    items = [Item("Is it?\nAnswer:", [" no", " yes"], 1), Item("Short", [" yes", " no"], 0)]
    scores = option_scores(model, tok, items)  # single tokens: one forward pass per item
    assert scores[0] == pytest.approx([1 - z, 3 - z], abs=1e-4)
    assert scores[1] == pytest.approx([3 - z, 1 - z], abs=1e-4)
    # multi-token: " yes yes" costs 2 * (3 - z) = -15.65 < " no" at 1 - z = -9.83 ...
    two = [Item("Q:", [" yes yes", " no"], 0)]
    assert option_scores(model, tok, two)[0] == pytest.approx([2 * (3 - z), 1 - z], abs=1e-4)
    # ... but per character (7 and 2: the space before an option is not counted, as
    # lm-evaluation-harness's acc_norm divides by len("no")) " yes yes" wins: -2.24 > -4.91
    normed = option_scores(model, tok, two, length_norm=True)[0]
    assert normed == pytest.approx([2 * (3 - z) / 7, (1 - z) / 2], abs=1e-4)
    assert normed[0] > normed[1]


def test_one_pass_scores_equal_the_pairwise_scores():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    contexts = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4], [2, 2]]  # lengths differ: padding exercised
    options = [[11, 12], [13, 14], [15, 11], [12, 13]]
    fast = next_token_logprobs(model, contexts, options, batch_size=3)
    slow = continuation_logprobs(model, [(c, [o]) for c, opts in zip(contexts, options)
                                         for o in opts], batch_size=3)
    assert [v for row in fast for v in row] == pytest.approx(slow, abs=1e-5)


def test_few_shot_prefix_shows_solved_examples():
    train = [Item(f"Q{i}\nAnswer:", [" no", " yes"], i % 2) for i in range(3)]
    prefix = few_shot_prefix(train, 2, seed=0)
    blocks = prefix.split("\n\n")[:-1]
    assert len(blocks) == 2 and len(set(blocks)) == 2
    for block in blocks:  # "Q1\nAnswer: yes": the gold label word follows each context
        i = int(block[1])
        assert block == f"Q{i}\nAnswer:" + (" yes" if i % 2 else " no")
    with pytest.raises(ValueError, match="only 3 examples"):
        few_shot_prefix(train, 4, seed=0)


# ---- the commands, on files in the downloaded layouts -----------------------------------------
@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.pt"
    save_model(constant_model({YES: 3.0, POSITIVE: 3.0, FIVE: math.log(4)}), CFG, path)
    return str(path)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_glue_command_reads_the_tsv_layouts_and_scores(tmp_path, model_path):
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngreat \"fun\t1\ndull\t0\nfine\t1\n")
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    write(tmp_path / "STS-B" / "dev.tsv",
          "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
          "0\tg\tf\ty\t0\ts\ts\tA man.\tA man.\t5.000\n1\tg\tf\ty\t1\ts\ts\tA.\tB.\t0.5\n")
    out, scores = tmp_path / "pred.json", tmp_path / "scores.json"
    evaluate.main(["glue", "sst2,cola,stsb", str(tmp_path), "--model-path", model_path,
                   "--output", str(out), "--json", str(scores), "--quiet"])
    pred, got = json.loads(out.read_text()), json.loads(scores.read_text())
    # the model always prefers " positive" and " yes"; STS-B's expectation is 30/9 (see above)
    assert pred == {"sst2": [1, 1, 1], "cola": [1, 1], "stsb": [3.3333, 3.3333]}
    assert got["tasks"]["sst2"]["acc"] == pytest.approx(200 / 3)
    assert got["tasks"]["cola"]["mcc"] == 0.0  # a constant answer has no correlation
    assert got["tasks"]["stsb"]["pearson"] == 0.0
    assert got["average"] == pytest.approx((200 / 3 + 0 + 0) / 3)
    # always the most frequent gold label: SST-2's 1 (2 of 3); CoLA's tie and STS-B's constant: 0
    assert got["tasks"]["sst2"]["majority"] == pytest.approx(200 / 3)
    assert got["tasks"]["cola"]["majority"] == 0.0 and got["tasks"]["stsb"]["majority"] == 0.0


def test_glue_readers_follow_each_files_columns(tmp_path):
    mrpc = tmp_path / "MRPC" / "dev.tsv"  # label first; its header's names are not used
    write(mrpc, "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tA cat.\tThe cat.\n")
    [item] = glue.TASKS["mrpc"].read(mrpc)
    assert item.context == ("Sentence 1: A cat.\nSentence 2: The cat.\n"
                            "Question: Do both sentences mean the same thing?\nAnswer:")
    assert item.options == [" no", " yes"] and item.answer == 1
    mnli = tmp_path / "MNLI" / "dev_matched.tsv"  # the label is the last column, gold_label
    write(mnli, "index\tsentence1\tsentence2\tlabel1\tgold_label\n"
                "0\tIt rains.\tIt is dry.\tneutral\tcontradiction\n")
    [item] = glue.TASKS["mnli"].read(mnli)
    assert item.context == "It rains.\nQuestion: It is dry. True, False or Neither?\nAnswer:"
    assert item.options[item.answer] == " False"
    qqp = tmp_path / "QQP" / "train.tsv"  # a broken row (5 columns) is skipped, not fatal
    write(qqp, "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
               "0\t1\t2\tWhy?\tHow?\t0\n1\t3\t4\tbroken\t1\n2\t5\t6\tWho?\tWho?\t1\n")
    assert [it.answer for it in glue.TASKS["qqp"].read(qqp)] == [0, 1]
    with pytest.raises(ValueError, match=r"no column\(s\) \['is_duplicate'"):
        glue.TASKS["qqp"].read(mrpc)


def test_superglue_command_jsonl_copa_and_multirc(tmp_path, model_path):
    rows = [{"passage": "P", "question": "is it", "idx": 0, "label": True},
            {"passage": "Q", "question": "is it not", "idx": 1, "label": False}]
    write(tmp_path / "BoolQ" / "val.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # every token but " yes"/" positive"/" 5" costs the same, so the shorter choice wins:
    # " the sun was rising." is 5 tokens, " it rained." 4
    copa = {"premise": "The ground was wet.", "choice1": "The sun was rising.",
            "choice2": "It rained.", "question": "cause", "label": 1, "idx": 0}
    write(tmp_path / "COPA" / "val.jsonl", json.dumps(copa) + "\n")
    multirc = {"idx": 0, "passage": {"text": "T", "questions": [
        {"idx": 0, "question": "q0", "answers": [{"text": "a", "label": 1, "idx": 0},
                                                   {"text": "b", "label": 0, "idx": 1}]},
        {"idx": 1, "question": "q1", "answers": [{"text": "c", "label": 1, "idx": 2}]}]}}
    write(tmp_path / "MultiRC" / "val.jsonl", json.dumps(multirc) + "\n")
    out, scores = tmp_path / "pred.json", tmp_path / "scores.json"
    evaluate.main(["superglue", "all", str(tmp_path), "--model-path", model_path,
                   "--output", str(out), "--json", str(scores), "--quiet"])
    pred, got = json.loads(out.read_text()), json.loads(scores.read_text())["tasks"]
    assert pred == {"boolq": [True, True], "copa": [1], "multirc": [1, 1, 1]}
    assert got["boolq"]["acc"] == 50.0 and got["copa"]["acc"] == 100.0
    # all answers "yes": TP 2, FP 1 -> F1a = 4/5; question 0 has a wrong answer -> EM 1/2
    assert got["multirc"]["f1a"] == pytest.approx(80.0) and got["multirc"]["em"] == 50.0
    assert got["multirc"]["score"] == pytest.approx(65.0)
    # most frequent gold answer is "correct" (2 of 3): the same predictions, the same 65
    assert got["multirc"]["majority"] == pytest.approx(65.0)
    assert got["boolq"]["majority"] == 50.0  # a tie: either label is right half the time


def test_bad_row_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\nno label here\n")
    (tmp_path / "unread.pt").write_bytes(b"x")  # a file, never read
    argv = ["glue", "sst2", str(tmp_path / "SST-2"), "--model-path", str(tmp_path / "unread.pt")]
    with pytest.raises(SystemExit) as exit_:  # the file fails before the model is looked for
        cli_main(lambda: evaluate.main(argv))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'SST-2' / 'dev.tsv'}:3: expected 2 tab-separated columns, got 1"]
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\tmaybe\n")
    with pytest.raises(SystemExit):
        cli_main(lambda: evaluate.main(argv))
    assert "dev.tsv:2: label 'maybe' is not one of [0, 1]" in capsys.readouterr().err
