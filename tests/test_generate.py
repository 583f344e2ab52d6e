import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import get_tokenizer
from generate import generate, generate_responses, sample_next
from gpt import GPTModel, model_config, save_model
from child_io import FRESH_TORCH_S, LineReader, quiet_env, terminal_ctrl_c

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"vocab_size": 101, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
EOS = 100  # the last token id of SMALL's vocabulary


def lively_model(seed: int = 0, cfg: dict = SMALL) -> GPTModel:
    """A random model whose greedy output depends on position and context (GPT-2's init repeats
    one token forever, which would make cached == uncached a weak test)."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.pos_emb.weight.normal_(0, 1.0)
        model.tok_emb.weight.normal_(0, 1.0)
        for block in model.trf_blocks:
            for layer in (block.att.qkv, block.att.out_proj, block.ff.fc, block.ff.proj):
                layer.weight.normal_(0, 0.3)
    return model


def successor_model() -> GPTModel:
    """A crafted model whose greedy next token is always last token + 1 (so EOS comes on cue):
    the blocks add nothing, positions are zero, and the head row of token j matches token j-1."""
    torch.manual_seed(0)
    model = GPTModel(SMALL).eval()
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        for block in model.trf_blocks:
            for layer in (block.att.out_proj, block.ff.proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.tok_emb.weight.normal_(0, 1.0)
        normed = model.final_norm(model.tok_emb.weight)  # what the head sees after token i
        model.out_head.weight = torch.nn.Parameter(10 * torch.roll(normed, shifts=1, dims=0))
    return model


def test_cached_equals_uncached_for_one_prompt():
    model = lively_model()
    for seed in range(3):
        prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(seed))
        cached = generate(model, prompt, 15)
        assert torch.equal(cached, generate(model, prompt, 15, use_cache=False))
        assert cached.shape == (1, 20)


def test_cached_batch_of_mixed_lengths_equals_each_prompt_alone():
    """Left padding and the pad mask change nothing: each row equals the book's loop on it alone."""
    model = lively_model(1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [7, 7, 30, 31, 2]]
    cached = generate(model, prompts, 12)
    alone = [generate(model, torch.tensor([p]), 12, use_cache=False)[0].tolist() for p in prompts]
    assert cached == alone
    assert cached == generate(model, prompts, 12, use_cache=False)
    assert [row[:len(p)] for row, p in zip(cached, prompts)] == prompts


def test_cached_equals_uncached_for_a_tensor_batch():
    model = lively_model(2)
    idx = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, idx, 10), generate(model, idx, 10, use_cache=False))


def test_past_the_context_both_paths_crop_from_the_left_alike():
    """Prompts longer than the context (24) and generation far past it: the window slides."""
    model = lively_model(3)
    prompts = [list(range(30)), [5, 6, 7], list(range(40, 60))]
    cached = generate(model, prompts, 30)
    assert cached == generate(model, prompts, 30, use_cache=False)
    assert [len(row) for row in cached] == [60, 33, 50]
    short = generate(model, prompts, 30, context_size=8)  # a smaller window than the model's
    assert short == generate(model, prompts, 30, context_size=8, use_cache=False)
    with pytest.raises(ValueError, match="context length"):
        generate(model, prompts, 3, context_size=25)


def test_each_row_stops_at_its_own_eos_and_leaves_the_batch():
    model = successor_model()
    assert generate(model, [[3, 4]], 3) == [[3, 4, 5, 6, 7]]  # the crafted model counts up
    batch_sizes = []
    model.tok_emb.register_forward_hook(lambda module, args, out: batch_sizes.append(out.shape[0]))
    rows = generate(model, [[5, 97], [1, 2, 10]], 8, eos_id=EOS)
    assert rows == [[5, 97, 98, 99], [1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    assert batch_sizes == [2, 2, 2, 1, 1, 1, 1, 1]  # prefill, then one call a token
    assert generate(model, [[5, 97], [1, 2, 10]], 8, eos_id=EOS, use_cache=False) == rows
    # the book's tensor form: a finished row is padded with EOS
    idx = torch.tensor([[97], [10]])
    expected = torch.tensor([[97, 98, 99] + [EOS] * 6, list(range(10, 19))])
    assert torch.equal(generate(model, idx, 8, eos_id=EOS), expected)
    assert torch.equal(generate(model, idx, 8, eos_id=EOS, use_cache=False), expected)
    # when every row is done the call ends, and the EOS itself is not returned (as in the book)
    assert torch.equal(generate(model, torch.tensor([[97], [98]]), 8, eos_id=EOS),
                       torch.tensor([[97, 98, 99], [98, 99, EOS]]))
    assert generate(model, [[99]], 8, eos_id=EOS) == [[99]]


def test_sampling_is_reproducible_with_a_seed_and_varies_with_another():
    model = lively_model()
    prompts = [[1, 2, 3], [4, 5]]

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 20, temperature=1.5, generator=g, **kw)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7, top_k=20, top_p=0.9) == sample(7, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    first = generate(model, prompts, 20, temperature=1.5)
    torch.manual_seed(5)
    assert generate(model, prompts, 20, temperature=1.5) == first


def test_top_k_1_and_a_tiny_top_p_equal_greedy():
    model = lively_model(4)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    greedy = generate(model, prompts, 15)
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompts, 15, temperature=2.0, top_k=1, generator=g) == greedy
    assert generate(model, prompts, 15, temperature=2.0, top_p=1e-6, generator=g) == greedy


def test_top_p_keeps_the_fewest_tokens_that_reach_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_empty_prompt_and_bad_arguments_are_value_errors():
    model = lively_model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            generate(model, [[1]], 5, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], -1)
    assert generate(model, [[1, 2]], 0) == [[1, 2]]
    assert generate(model, [], 5) == []


# The prompts written out by hand (the book's Alpaca text, and phi-3's markers), so the expected
# answers below do not come from the code under test (format_input, encode_prompts, batching).
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}{}\n\n### Response:\n")
PHI3 = "<|user|>\n{}{}\n<|assistant|>:\n"


def hand_prompt(entry: dict, style: str = "alpaca") -> str:
    extra = entry.get("input", "")
    if style == "phi3":
        return PHI3.format(entry["instruction"], "\n" + extra if extra else "")
    return ALPACA.format(entry["instruction"], "\n\n### Input:\n" + extra if extra else "")


def book_answer(model: GPTModel, prompt: str, max_new_tokens: int) -> str:
    """The book's way: encode, the plain uncached greedy loop on one row, cut at EOS, decode."""
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt)
    new = generate(model, torch.tensor([ids]), max_new_tokens, use_cache=False)[0, len(ids):]
    new = new.tolist()
    return tokenizer.decode(new[:new.index(50256)] if 50256 in new else new).strip()


def lively_tiny(style: str = "alpaca") -> GPTModel:
    """tiny's shape with lively random weights: every prompt gets its own answer."""
    return lively_model(5, dict(model_config("tiny"), prompt_style=style))


ENTRIES = [{"instruction": "Name a color." * k, "input": "x" * k} for k in range(5)]


def test_generate_responses_keeps_order_and_decodes_only_the_new_tokens():
    tokenizer = get_tokenizer()
    model = lively_tiny().train()  # mode is restored after generating
    batched = generate_responses(model, ENTRIES, tokenizer, max_new_tokens=6, batch_size=2)
    assert model.training
    expected = [book_answer(model, hand_prompt(e), 6) for e in ENTRIES]
    assert batched == expected
    assert len(set(batched)) == len(ENTRIES)  # answers differ, so a swapped order would show
    assert all("### Response" not in r and "Below is" not in r for r in batched)


def test_each_style_puts_its_own_header_before_the_answer():
    tokenizer = get_tokenizer()
    model = lively_tiny()
    answers = {}
    for style in ("alpaca", "phi3"):
        answers[style] = generate_responses(model, ENTRIES[:3], tokenizer, style=style,
                                            max_new_tokens=5)
        assert answers[style] == [book_answer(model, hand_prompt(e, style), 5)
                                  for e in ENTRIES[:3]]
    assert answers["alpaca"] != answers["phi3"]


# ---- command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> Path:
    model = lively_tiny("phi3")  # the CLI must read the style from the file, not assume alpaca
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, model.cfg, path)
    return path


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT,
                          timeout=FRESH_TORCH_S)


def test_cli_answers_one_prompt(tiny_model_path):
    result = run_cli("--model-path", tiny_model_path, "--prompt", "Name a color.",
                     "--input", "red or blue", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    expected = book_answer(lively_tiny(), PHI3.format("Name a color.", "\nred or blue"), 5)
    assert result.stdout == expected + "\n" and expected


def test_cli_answers_a_file_and_keeps_every_field(tiny_model_path, tmp_path):
    entries = [{"instruction": f"Count to {k}.", "input": "", "output": str(k), "id": k}
               for k in range(3)] + [{"instruction": "No output field here."}]
    (tmp_path / "in.json").write_text(json.dumps(entries))
    result = run_cli("--model-path", tiny_model_path, "--input-file", tmp_path / "in.json",
                     "--output", tmp_path / "out.json", "--max-new-tokens", "4",
                     "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert [{k: v for k, v in e.items() if k != "model_response"} for e in out] == entries
    model = lively_tiny()
    assert [e["model_response"] for e in out] == [book_answer(model, hand_prompt(e, "phi3"), 4)
                                                   for e in entries]


def test_cli_interactive_loop_reads_stdin_until_end(tiny_model_path):
    result = run_cli("--model-path", tiny_model_path, "--max-new-tokens", "3",
                     stdin="Name a color.\n\n  \nWhat is 2+2?\n")  # blank lines are skipped
    assert result.returncode == 0, result.stderr
    model = lively_tiny()
    expected = [book_answer(model, PHI3.format(q, ""), 3)
                for q in ("Name a color.", "What is 2+2?")]
    assert result.stdout == "".join(r + "\n" for r in expected) and expected[0] != expected[1]


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', None])
def test_cli_bad_input_file_is_one_line_exit_2_and_no_output(tiny_model_path, tmp_path, content):
    source = tmp_path / "in.json"
    if content is not None:
        source.write_text(content)
    result = run_cli("--model-path", tiny_model_path, "--input-file", source,
                     "--output", tmp_path / "out.json")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_cli_missing_model_or_unwritable_output_is_exit_2(tiny_model_path, tmp_path):
    result = run_cli("--model-path", tmp_path / "nope.pt", "--prompt", "hi")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "in.json").write_text(json.dumps([{"instruction": "hi"}]))
    result = run_cli("--model-path", tiny_model_path, "--input-file", tmp_path / "in.json",
                     "--output", tmp_path / "no-such-folder" / "out.json")
    assert result.returncode == 2 and "no-such-folder" in result.stderr
    result = run_cli("--model-path", tiny_model_path, "--prompt", "hi", "--top-p", "0")
    assert result.returncode == 2 and "argument --top-p" in result.stderr


def test_cli_ctrl_c_during_a_file_run_leaves_no_output(tiny_model_path, tmp_path):
    entries = [{"instruction": f"Tell a story number {k}.", "input": ""}
               for k in range(40)]
    (tmp_path / "in.json").write_text(json.dumps(entries))
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--model-path",
                             str(tiny_model_path), "--input-file", str(tmp_path / "in.json"),
                             "--output", str(tmp_path / "out.json"), "--batch-size", "1",
                             "--max-new-tokens", "200"],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=terminal_ctrl_c, env=quiet_env())
    try:  # the progress line arrives while the run goes on: generate.py flushes it itself
        LineReader(proc.stderr).wait_for(lambda line: "generated 1/40" in line)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=FRESH_TORCH_S)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == ["in.json"]


def test_generate_runs_the_books_own_model_with_the_books_arguments():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from book_model import from_gpt
    finally:
        sys.path.pop(0)
    ours = lively_model(3)
    book = from_gpt(ours).eval()
    assert not hasattr(book, "cfg") and not hasattr(book, "hidden")
    idx = torch.tensor([[3, 4, 5], [7, 8, 9]])
    # the book's call: generate(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id)
    got = generate(book, idx, 6, ours.cfg["context_length"], 0.0, None, None)
    want = generate(ours, idx, 6)
    assert torch.equal(got, want) and len(set(want[:, 3:].flatten().tolist())) > 1
    with pytest.raises(ValueError, match="context_size is needed"):
        generate(book, idx, 4)


def test_default_batch_size_is_16_off_the_gpu_and_for_models_without_a_config():
    from generate import default_batch_size
    model = GPTModel(model_config("tiny"))
    assert default_batch_size(model, 300) == 16
    book_like = torch.nn.Linear(2, 2)  # no cfg: the size of its cache is unknown
    assert default_batch_size(book_like, 300) == 16
