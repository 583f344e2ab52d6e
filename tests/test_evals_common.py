import json

import pytest
import torch

from evals.common import (append_report, continuation_logprobs, cut_at_stops, markdown_table,
                          read_json_file)
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
