"""Tests for data/tiny_corpus.py (the pretraining text, held out from the instruction set),
data/tiny_rounds.py (the continued pretraining's passages) and
data/pretrain_tiny.py (the pretraining run that writes the `tiny` model's starting weights)."""
import json
import re
from pathlib import Path

import pytest
import torch

from gpt import load_model, model_config
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]


tiny_corpus = load_script("data/tiny_corpus.py")
tiny_rounds = load_script("data/tiny_rounds.py")
pretrain_tiny = load_script("data/pretrain_tiny.py")


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return json.loads((REPO / "data" / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus() -> str:
    return tiny_corpus.build_corpus(7, 5000)


def test_corpus_is_deterministic_per_seed():
    a = tiny_corpus.build_corpus(1, 300)
    assert a == tiny_corpus.build_corpus(1, 300)
    assert a != tiny_corpus.build_corpus(2, 300)
    assert a.count(tiny_corpus.SEP) == 299  # one separator between each two passages


def test_corpus_covers_the_tables_and_avoids_the_alpaca_template(corpus):
    for country, capital in tiny_corpus.md.CAPITALS:
        assert country in corpus and capital in corpus
    assert "### Instruction" not in corpus and "### Response" not in corpus
    # the copying passages: a word with its letters, a list and the same list sorted
    assert "Its letters are " in corpus and "In alphabetical order they are: " in corpus


def test_real_corpus_holds_no_instruction_triple(corpus, entries):
    tiny_corpus.check_held_out(corpus, entries)  # raises if any (instruction, input, output) is in it


@pytest.mark.parametrize("with_input", [False, True])
def test_held_out_check_fails_on_an_injected_entry(corpus, entries, with_input):
    entry = next(e for e in entries if bool(e["input"]) == with_input)
    triple = f"{entry['instruction']}\n{entry['input']}\n{entry['output']}"
    leaked = corpus[:100_000] + tiny_corpus.SEP + triple
    assert tiny_corpus.leaked_entries(leaked, entries) == [entry]
    with pytest.raises(ValueError, match="1 instruction-set entries"):
        tiny_corpus.check_held_out(leaked, entries)


def test_held_out_allows_the_facts_alone():
    entry = {"instruction": "What is the capital of Peru?", "input": "",
             "output": "The capital of Peru is Lima."}
    assert tiny_corpus.leaked_entries("The capital of Peru is Lima.", [entry]) == []
    # the question far from its answer (more than the 200-character window) is not the triple either
    far = "What is the capital of Peru?" + " x" * 200 + " The capital of Peru is Lima."
    assert tiny_corpus.leaked_entries(far, [entry]) == []
    assert tiny_corpus.leaked_entries("Q: What is the capital of Peru?\nA: The capital of Peru is Lima.",
                                      [entry]) == [entry]


def test_get_batch_shifts_targets_by_one():
    inputs, targets = pretrain_tiny.get_batch(torch.arange(10), torch.tensor([0, 3]), 4)
    assert inputs.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert targets.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7]]


def test_lr_warms_up_then_decays_to_a_tenth():
    lr = lambda step: pretrain_tiny.lr_at(step, steps=110, peak=1.0, warmup=10)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)    # (0 + 1) / 10
    assert lr(9) == pytest.approx(1.0)    # end of warm-up
    assert lr(10) == pytest.approx(1.0)   # cosine at progress 0: 0.1 + 0.9 * 1
    assert lr(60) == pytest.approx(0.55)  # progress 0.5: 0.1 + 0.9 * 0.5
    assert lr(110) == pytest.approx(0.1)  # progress 1: 0.1 + 0.9 * 0


def test_split_keeps_the_last_tokens_out_and_refuses_tiny_corpora():
    train, val = pretrain_tiny.split_tokens(torch.arange(100), 0.2, 4)
    assert train.tolist() == list(range(80)) and val.tolist() == list(range(80, 100))
    with pytest.raises(ValueError, match="too few"):
        pretrain_tiny.split_tokens(torch.arange(8), 0.2, 4)


def run(tmp_path, name, *extra):
    out = tmp_path / name
    pretrain_tiny.main(["--device", "cpu", "--passages", "300", "--steps", "5", "--batch-size", "2",
                        "--window", "16", "--warmup", "2", "--eval-every", "5", "--eval-batches", "1",
                        "--log-every", "5", "--out", str(out), *extra])
    return out


def test_five_steps_write_a_loadable_reproducible_model(tmp_path, capsys):
    first, second = run(tmp_path, "a.pt"), run(tmp_path, "b.pt")
    model, cfg = load_model(first)
    assert {k: cfg[k] for k in model_config("tiny")} == model_config("tiny")
    assert first.stat().st_size < 16 * 2**20  # ~7.26M fp16 parameters, the tied head stored once
    assert torch.load(first, weights_only=True)["state_dict"]["tok_emb.weight"].dtype == torch.float16
    assert model.tok_emb.weight.dtype == torch.float32  # loaded into fp32 for training
    again, _ = load_model(second)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    log = capsys.readouterr().err
    assert "step 5/5  loss " in log and "held-out" in log and "sha256 " in log
    torch.manual_seed(pretrain_tiny.SEED)  # the weights the run started from: it did train them
    start = pretrain_tiny.GPTModel(model_config("tiny")).state_dict()
    assert not torch.equal(start["trf_blocks.0.ff.proj.weight"],
                           again.state_dict()["trf_blocks.0.ff.proj.weight"])


def test_corpus_only_writes_the_text(tmp_path):
    out = tmp_path / "corpus.txt"
    pretrain_tiny.main(["--passages", "50", "--corpus-only", str(out)])
    assert out.read_text(encoding="utf-8") == tiny_corpus.build_corpus(pretrain_tiny.SEED, 50)
    pretrain_tiny.main(["--passages", "50", "--compare", "40", "--corpus-only", str(out)])
    text = out.read_text(encoding="utf-8")
    assert text == tiny_rounds.round_corpus(pretrain_tiny.SEED, 50, comparisons=40)
    assert text.count(" is greater than ") + text.count(" is less than ") >= 40
    pretrain_tiny.main(["--passages", "50", "--forms", "30", "--corpus-only", str(out)])
    assert out.read_text(encoding="utf-8") == tiny_rounds.round_corpus(pretrain_tiny.SEED, 50, forms=30)


@pytest.mark.parametrize("flag", ["--drill", "--compare", "--forms"])
def test_a_negative_drill_or_comparison_count_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain_tiny.parse_args([flag, "-1"])
    assert stop.value.code == 2 and f"argument {flag}: must be a whole number >= 0" in \
        capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_asked_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain_tiny.main(["--device", "cuda", "--steps", "1"])
    assert stop.value.code == 2
    assert "argument --device: cuda: not usable here" in capsys.readouterr().err


def test_unwritable_out_fails_before_any_work(tmp_path):
    with pytest.raises(OSError, match="cannot write .*missing or read-only"):
        pretrain_tiny.main(["--out", str(tmp_path / "missing" / "tiny.pt")])


def test_tokenize_joins_passages_with_the_real_endoftext_token():
    from data import ENDOFTEXT, get_tokenizer
    tokenizer = get_tokenizer()
    text = tiny_corpus.build_corpus(3, 20)
    ids = pretrain_tiny.tokenize(text, tokenizer)
    assert ids.tolist() == tokenizer.encode(text, allowed_special={ENDOFTEXT})
    assert ids.tolist().count(50256) == 19


def test_the_first_stage_corpus_is_unchanged():
    # the shipped weights were pretrained on build_corpus(1234, 200_000): its text must not move
    # when the builders are reorganised (digest taken before the number drill was added)
    import hashlib
    text = tiny_corpus.build_corpus(1, 3000)
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "49002e3531a63d47d583b434b88d95e6bd65a6cca480b07d9588b95c0f327930")
    assert tiny_rounds.round_corpus(1, 3000) == text


def test_number_facts_hold_every_sum_product_and_conversion_once():
    import random
    items = tiny_rounds.number_facts(random.Random(0))
    assert len(items) == 60 * 60 + 11 * 11 + 10 * 11  # sums 1..60, products 2..12, 10 units x 2..12
    found = {(int(n[0]), int(n[1])): a for q, a, _ in items  # (a, b) of each sum's question
             if len(n := re.findall(r"\d+", q)) == 2 and ("+" in q or "plus" in q or "sum" in q
                                                           or "add" in q)}
    assert len(found) == 3600 and found[47, 38] == "85" and found[1, 60] == "61"
    for q, a, statement in items:  # the question's numbers copied into the stated answer
        assert a in statement or tiny_corpus.spoken(int(a)) in statement
        for n in re.findall(r"\d+", q):
            assert n in statement or tiny_corpus.spoken(int(n)) in statement.lower()


def test_drill_passages_state_each_fact_once_a_round_and_mix_into_the_corpus(entries):
    one = tiny_rounds.drill_passages(5, 1)
    text = "\n".join(one)
    # 47 + 38 once per round, in one of its five phrasings
    forms = ["47 plus 38 equals 85.", "47 + 38 = 85.", "Forty-seven plus thirty-eight is eighty-five.",
             "If you add 47 and 38, you get 85.", "The sum of 47 and 38 is 85."]
    assert sum(text.count(f) for f in forms) == 1
    assert sum("\n".join(tiny_rounds.drill_passages(5, 3)).count(f) for f in forms) == 3
    assert all(3 <= p.count(".") for p in one[:-1])  # 3-8 facts a passage (the last may be short)
    mixed = tiny_rounds.round_corpus(4, 200, drill_rounds=1)  # its drill is drill_passages(5, 1)
    assert mixed.count(tiny_corpus.SEP) == 200 + len(one) - 1
    tiny_corpus.check_held_out(mixed, entries)  # the drill avoids the instruction set's phrasings


def test_the_comparison_round_asks_whether_the_first_is_larger_and_answers_right(entries):
    import random
    rng = random.Random(0)
    assert tiny_rounds.compare_item(rng, 62, 57)[1:] == ("Yes", "Yes, 62 is greater than 57.")
    assert tiny_rounds.compare_item(rng, 57, 62)[1:] == ("No", "No, 57 is less than 62.")
    passages = tiny_rounds.compare_passages(7, 2000)
    pairs = [(int(a), int(b), verdict, int(c), int(d)) for p in passages for a, b, verdict, c, d in
             re.findall(r"(\d+) \D+ (\d+)\?\n\w+: (Yes|No), (\d+) is \w+ than (\d+)\.", p)]
    assert len(pairs) == 2000 and all(3 <= p.count("?") <= 8 for p in passages[:-1])
    for a, b, verdict, c, d in pairs:  # the reply copies the question's numbers, verdict first
        assert a != b and 1 <= min(a, b) and max(a, b) <= 99 and (c, d) == (a, b)
        assert verdict == ("Yes" if a > b else "No")
    close = sum(abs(a - b) <= 9 for a, b, *_ in pairs) / len(pairs)
    assert 0.52 <= close <= 0.66  # half drawn 1-9 apart, plus random ones that fall so (~17 %)
    assert tiny_rounds.compare_passages(7, 2000) == passages
    mixed = tiny_rounds.round_corpus(4, 200, comparisons=300)  # its round is compare_passages(6, 300)
    assert mixed.count(tiny_corpus.SEP) == 200 + len(tiny_rounds.compare_passages(6, 300)) - 1
    tiny_corpus.check_held_out(mixed, entries)  # asked in other words than the instruction set's


def test_the_answer_form_round_answers_at_the_start_of_a_line(entries):
    import random
    rng = random.Random(0)
    assert tiny_rounds.form_reply(rng, "No", "No, 5 is less than 9.") == "No, 5 is less than 9."
    assert {tiny_rounds.form_reply(rng, "lamb", "A baby sheep is called a lamb.") for _ in range(60)} == {
        "lamb", '"lamb"', '"lamb" is the answer.'}
    passages = tiny_rounds.form_passages(8, 3000)
    lines = [line for p in passages for line in p.split("\n")]
    questions, replies = lines[0::2], lines[1::2]
    assert len(questions) == len(replies) == 3000 and all(q.endswith(("?", ".")) for q in questions)
    labels = tuple(reply for _, reply in tiny_corpus.QA_LABELS)
    assert not any(r.startswith(labels) or r.startswith(" ") for r in replies)  # nothing before the answer
    odd = [(q, r) for q, r in zip(questions, replies) if "does not fit" in q]
    assert len(odd) > 400  # the odd one out, weighted up (7 of the 39 makers, plus list items)
    for q, r in odd:  # the reply names one of the four, the one from another group
        items = q.split(": ", 2)[-1].rstrip("?").split(", ")
        assert r.split('"')[1 if r.startswith('"') else 0] in items
    verdicts = [(q, r) for q, r in zip(questions, replies) if r.startswith(("Yes, ", "No, "))]
    for q, r in verdicts:
        a, b = map(int, re.findall(r"\d+", q)[-2:])
        assert r == (f"Yes, {a} is greater than {b}." if a > b else f"No, {a} is less than {b}.")
    assert len(verdicts) > 400 and tiny_rounds.form_passages(8, 3000) == passages
    mixed = tiny_rounds.round_corpus(4, 200, forms=300)  # its round is form_passages(7, 300)
    assert mixed.count(tiny_corpus.SEP) == 200 + len(tiny_rounds.form_passages(7, 300)) - 1
    tiny_corpus.check_held_out(mixed, entries)


def test_init_continues_from_given_weights_and_refuses_another_size(tmp_path):
    from gpt import GPTModel, save_model
    cfg = model_config("tiny")
    start = GPTModel(cfg)
    with torch.no_grad():
        start.trf_blocks[0].ff.proj.weight.fill_(0.5)  # far from any random init (std 0.02)
    save_model(start, cfg, tmp_path / "start.pt")
    continued = run(tmp_path, "b.pt", "--init", str(tmp_path / "start.pt"), "--drill", "1")
    w = load_model(continued)[0].trf_blocks[0].ff.proj.weight
    # AdamW moves a weight by at most about lr per step: 5 steps, lr <= 2e-3 -> |w - 0.5| <= ~0.01
    assert (w - 0.5).abs().max() < 0.02
    other = dict(cfg, n_layers=1)
    save_model(GPTModel(other), other, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="--init .*small.pt: not a tiny model"):
        pretrain_tiny.main(["--init", str(tmp_path / "small.pt"), "--out", str(tmp_path / "d.pt")])
