import json

import pytest
import torch

from evals.common import (append_report, continuation_logprobs, cut_at_stops, field, group_rows,
                          markdown_table, overlap_f1, read_json_file, styled_prompt,
                          truncate_tokens)
from gpt import GPTModel

CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}


def test_cut_at_stops_takes_the_earliest_stop():
    assert cut_at_stops("a\nb\ndef c", ["\ndef", "\n"]) == "a"
    assert cut_at_stops("no stop here", ["\n"]) == "no stop here"


def test_continuation_logprobs_equal_a_direct_computation_per_pair():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    pairs = [([5, 6, 7], [8]), ([1], [2, 3, 4]), ([9, 9, 9, 9, 9], [1, 2])]
    got = continuation_logprobs(model, pairs, batch_size=2)
    for (context, cont), value in zip(pairs, got):
        seq = torch.tensor([context + cont])
        with torch.no_grad():
            logp = model(seq[:, :-1]).log_softmax(-1)[0]
        expected = sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-5)


def test_markdown_table_and_report_sections(tmp_path):
    table = markdown_table(["task", "n", "acc"], [["a", 3, 50.0]])
    assert table == "| task | n | acc |\n| --- | ---: | ---: |\n| a | 3 | 50.0 |\n"
    report = tmp_path / "r.md"
    append_report(report, "One", table)
    append_report(report, "Two", "text\n")
    assert report.read_text() == f"## One\n\n{table}\n## Two\n\ntext\n"


def test_read_json_file_names_the_file_on_bad_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=r"x\.json: not JSON \(line 1"):
        read_json_file(bad, "a SQuAD file")
    good = tmp_path / "y.json"
    good.write_text(json.dumps({"a": 1}))
    assert read_json_file(good, "x") == {"a": 1}


class CharTokenizer:
    """One token per character: lengths are easy to count by hand."""

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_truncate_tokens_keeps_the_first_tokens():
    tok = CharTokenizer()
    assert truncate_tokens(tok, "abcdef", 4) == "abcd"
    assert truncate_tokens(tok, "abc", 4) == "abc"
    assert truncate_tokens(tok, "abc", -2) == ""


def test_styled_prompt_uses_the_fine_tuning_format_or_raw_text():
    alpaca = styled_prompt("alpaca", "Answer.", "Q?", raw="Q?\nA:")
    assert alpaca.endswith("### Instruction:\nAnswer.\n\n### Input:\nQ?\n\n### Response:\n")
    assert styled_prompt("raw", "Answer.", "Q?", raw="Q?\nA:") == "Q?\nA:"


def test_field_names_the_entry_and_the_problem():
    assert field({"a": "x"}, "a", str, "f.json: data[0]") == "x"
    with pytest.raises(ValueError, match=r"^f.json: data\[0\]: missing 'b'$"):
        field({"a": "x"}, "b", str, "f.json: data[0]")
    with pytest.raises(ValueError, match=r"'a' should be int, got bool"):
        field({"a": True}, "a", int, "w")
    with pytest.raises(ValueError, match=r"w: expected an object, got list"):
        field([], "a", str, "w")


def test_group_rows_means_in_percent_overall_and_per_group():
    overall, rows = group_rows(["x", "overall", "x"], {"em": [1.0, 0.0, 0.0]})
    assert overall == {"n": 3, "em": pytest.approx(100 / 3)}
    # a group may be called "overall" without touching the real overall
    assert rows == {"x": {"n": 2, "em": 50.0}, "overall": {"n": 1, "em": 0.0}}


def test_overlap_f1_by_hand():
    # 2 shared of 3 predicted and 2 gold: P 2/3, R 1 -> 0.8; nothing shared (or empty) -> 0
    assert overlap_f1(["a", "b", "c"], ["a", "b"]) == pytest.approx(0.8)
    assert overlap_f1([], []) == 0.0


def test_generate_texts_answers_repeated_prompts_once(monkeypatch):
    import evals.common as common
    from data import get_tokenizer
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    tok = get_tokenizer()
    real, seen = common.generate_batched, []

    def spy(model, ids, *args, **kwargs):  # the real generation, with the prompts it was given
        seen.append(len(ids))
        return real(model, ids, *args, **kwargs)
    monkeypatch.setattr(common, "generate_batched", spy)
    out = common.generate_texts(model, tok, ["xy", "z", "xy"], max_new_tokens=3)
    assert seen == [2]  # "xy" and "z" only
    alone = common.generate_texts(model, tok, ["xy", "z"], max_new_tokens=3)
    assert out == [alone[0], alone[1], alone[0]]
