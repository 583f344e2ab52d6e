"""data/near_duplicates.py and data/tfidf_pairs.py: the book's measure (hand-computed values and
scikit-learn's own numbers), the fast search against brute force, and the command line."""
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from child_io import FRESH_TORCH_S
from data import cli_main
from script_loader import REPO, load_script

nd = load_script("data/near_duplicates.py")
tp = load_script("data/tfidf_pairs.py")


def entries_of(instructions, inputs=None, outputs=None):
    n = len(instructions)
    outputs = outputs or [f"out {k}" for k in range(n)]
    return [{"instruction": a, "input": b, "output": c}
            for a, b, c in zip(instructions, inputs or [""] * n, outputs)]


def pairs_of(texts, threshold=0.9):
    i, j, s = tp.similar_pairs(tp.tfidf_matrix([tp.preprocess_text(t) for t in texts]), threshold)
    return list(zip(i.tolist(), j.tolist())), s


# ---- the measure --------------------------------------------------------------------------------
def test_preprocess_follows_the_book_then_scikit_learns_char_analyzer():
    assert tp.preprocess_text("What's THE capital?!") == "whats the capital"
    assert tp.preprocess_text("Café_1, naïve—x") == "café_1 naïvex"  # \w: Unicode, keeps _
    # a run of whitespace becomes one space, a lone newline stays
    assert tp.preprocess_text("a \t b\nc\n\nd e") == "a b\nc d e"
    assert tp.preprocess_text("?!") == ""


def test_two_texts_by_hand():
    # "aab" and "ab", n = 2. n-grams: "aab": a x2, b, aa, ab, aab; "ab": a, b, ab.
    # df: a 2, b 2, ab 2 -> idf ln(3/3) + 1 = 1; aa 1, aab 1 -> idf ln(3/2) + 1 = 1.405465 (r).
    # v1 = (a 2, b 1, ab 1, aa r, aab r): |v1|^2 = 4 + 1 + 1 + 2 r^2 = 9.950664
    # v2 = (a 1, b 1, ab 1): |v2|^2 = 3;  v1.v2 = 2 + 1 + 1 = 4
    # cos = 4 / sqrt(9.950664 * 3) = 0.732105
    m = tp.tfidf_matrix(["aab", "ab"])
    assert sorted(m.data[:5] * np.sqrt(9.950664340218989)) == pytest.approx(
        sorted([2, 1, 1, 1.4054651081081644, 1.4054651081081644]))
    assert (m.dense() @ m.dense().T)[0, 1] == pytest.approx(0.7321049202512239, abs=1e-12)


def test_three_entries_by_hand_through_field_pairs():
    # instructions "AAB!" -> "aab", "ab", "b." -> "b" (two characters before preprocessing: kept)
    # n = 3. df: a 2, b 3, ab 2, aa 1, aab 1. idf = ln(4 / (1 + df)) + 1:
    #   a, ab: ln(4/3) + 1 = 1.287682;  b: ln(4/4) + 1 = 1;  aa, aab: ln(4/2) + 1 = 1.693147
    # v1 = (a 2 * 1.287682, b 1, ab 1.287682, aa 1.693147, aab 1.693147): |v1|^2 = 15.024119
    # v2 = (a 1.287682, b 1, ab 1.287682): |v2|^2 = 4.316250;  v3 = (b 1): |v3| = 1
    # v1.v2 = 3.316250 + 1 + 1.658125 = 5.974375 -> cos 5.974375 / (3.876096 * 2.077559) = 0.741899
    # cos(1, 3) = 1 / 3.876096 = 0.257992;  cos(2, 3) = 1 / 2.077559 = 0.481334
    entries = entries_of(["AAB!", "ab", "b."])
    found = {(p.i, p.j): p.similarity for p in nd.field_pairs(entries, "instruction", 0.25)}
    assert found == pytest.approx({(0, 1): 0.7418988031007129, (0, 2): 0.25799154486720605,
                                   (1, 2): 0.48133416873660545}, abs=1e-12)
    assert [(p.i, p.j) for p in nd.field_pairs(entries, "instruction", 0.7)] == [(0, 1)]


def test_equal_to_scikit_learn_on_small_files():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    rng = random.Random(0)
    for _ in range(5):
        words = ["the", "cat", "Cat!", "sat", "é", "a\t", "  on", "mat.", "日本語", "𝔘𝔫", "x_y\n"]
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(30)]
        book = [re.sub(r"[^\w\s]", "", t.lower()) for t in texts]  # the book's preprocess_text
        vectorizer = sklearn_text.TfidfVectorizer(analyzer="char", ngram_range=(1, 3))
        theirs = pairwise.cosine_similarity(vectorizer.fit_transform(book))
        m = tp.tfidf_matrix([tp.preprocess_text(t) for t in texts])
        assert np.abs(m.dense() @ m.dense().T - theirs).max() < 1e-12
        assert m.n_features == len(vectorizer.vocabulary_)


PINNED_TEXTS = ["What is the capital of Italy?", "What's the capital city of Italy?",
                "Identify the main verb: 'The cat sleeps.'",
                "Identify the verb in: The cat sleeps.", "Café  au\tlait\n\nor tea?",
                "日本語のテキスト"]
# scikit-learn 1.9.1, so that the check runs where it is not installed (CI):
#   t = [re.sub(r"[^\w\s]", "", x.lower()) for x in PINNED_TEXTS]   # the book's preprocess_text
#   s = cosine_similarity(TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform(t))
#   [round(float(v), 12) for v in s[np.triu_indices(6, 1)]]
PINNED_SIMILARITIES = [0.85946611674, 0.402981605735, 0.416637924685, 0.288772383447, 0.0,
                       0.390138102722, 0.397149253858, 0.280497878207, 0.0, 0.912779476783,
                       0.233789070405, 0.0, 0.213397997214, 0.0, 0.0]


def test_equal_to_pinned_scikit_learn_values():
    m = tp.tfidf_matrix([tp.preprocess_text(t) for t in PINNED_TEXTS])
    sims = (m.dense() @ m.dense().T)[np.triu_indices(6, 1)]
    assert sims.tolist() == pytest.approx(PINNED_SIMILARITIES, abs=1e-11)


def test_counting_in_chunks_changes_nothing():
    texts = ["abc abc", "", "b", "xyz", "", "aaaa", "the cat sat"]
    whole = tp.count_matrix(texts)
    for chunk in (1, 3, 7, 100):
        part = tp.count_matrix(texts, chunk_chars=chunk)
        for name in ("indptr", "indices", "data"):
            assert np.array_equal(getattr(part, name), getattr(whole, name))


def test_the_rule_is_strictly_above_except_identical():
    assert not tp.is_similar(np.array([0.9 + 1e-15]), 0.9)[0]  # float noise never decides
    assert tp.is_similar(np.array([0.9 + 1e-9]), 0.9)[0]
    assert tp.is_similar(np.array([1 - 1e-15]), 1.0)[0]  # 1.0: identical after preprocessing
    assert not tp.is_similar(np.array([0.999]), 1.0)[0]


# ---- the fast search equals brute force ---------------------------------------------------------
def random_texts(rng, n):
    """Random texts with many near-copies: edits of earlier texts, repeats, empties, one letter."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "pi", "rho", "x", "yy", "zzz", "café"]
    texts = []
    for _ in range(n):
        kind = rng.random()
        if texts and kind < 0.3:  # an earlier text, one word changed or dropped
            words_of = rng.choice(texts).split() or ["x"]
            words_of[rng.randrange(len(words_of))] = rng.choice(words + [""])
            texts.append(" ".join(words_of))
        elif texts and kind < 0.4:
            texts.append(rng.choice(texts))
        elif kind < 0.45:
            texts.append(rng.choice(["", "?", "a", "a" * rng.randint(1, 30)]))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))))
    return texts


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_search_equals_brute_force_on_random_texts(threshold):
    rng = random.Random(int(threshold * 100))
    for n in (1, 2, 17, 150):
        m = tp.tfidf_matrix([tp.preprocess_text(t) for t in random_texts(rng, n)])
        fast, brute = tp.similar_pairs(m, threshold, block=32), tp.brute_force_pairs(m, threshold)
        assert np.array_equal(fast[0], brute[0]) and np.array_equal(fast[1], brute[1])
        assert np.allclose(fast[2], brute[2], rtol=0, atol=1e-12)


def test_search_equals_brute_force_with_a_loose_bound_and_without_integer_products(monkeypatch):
    # 2 groups: nearly every feature shares a group, the bound is loose, candidates are many
    rng = random.Random(7)
    m = tp.tfidf_matrix([tp.preprocess_text(t) for t in random_texts(rng, 120)])
    brute = tp.brute_force_pairs(m, 0.6)
    monkeypatch.setattr(tp, "group_count", lambda m: 2)
    assert np.array_equal(np.stack(tp.similar_pairs(m, 0.6, block=16)[:2]), np.stack(brute[:2]))
    monkeypatch.delattr(torch, "_int_mm")  # a torch without int8 products: float64, same pairs
    assert np.array_equal(np.stack(tp.similar_pairs(m, 0.6)[:2]), np.stack(brute[:2]))


def test_adversarial_inputs():
    # identical texts, a text and its repetition, empty and punctuation-only texts, one letter
    texts = ["abc", "abc", "abcabc", "ABC!", "", "?!", "a", "a", "abd", "xyz " * 50, "xyz " * 51]
    pairs, sims = pairs_of(texts, 0.9)
    m = tp.tfidf_matrix([tp.preprocess_text(t) for t in texts])
    assert pairs == list(zip(*(x.tolist() for x in tp.brute_force_pairs(m, 0.9)[:2])))
    assert (0, 1) in pairs and (0, 3) in pairs and (6, 7) in pairs and (9, 10) in pairs
    assert not any(4 in p or 5 in p for p in pairs)  # a text without characters is similar to none
    assert pairs_of(texts, 1.0)[0] == [(0, 1), (0, 3), (1, 3), (6, 7)]


# ---- the book's rules per field -----------------------------------------------------------------
def test_empty_fields_take_no_part_and_indices_name_the_entries():
    inputs = ["The quick brown fox.", "", "the quick brown fox", "Other words here"]
    base = entries_of(["a"] * 4, inputs)
    more = base + entries_of(["b"] * 3)  # more empty inputs: the idf (of non-empty texts) stays
    pairs = nd.field_pairs(base, "input")
    assert [(p.i, p.j) for p in pairs] == [(0, 2)]  # entry indices, not positions among non-empty
    assert nd.field_pairs(more, "input") == pairs
    del more[0]["input"]  # a missing input is an empty one
    assert nd.field_pairs(more, "input") == []


def test_one_character_texts_are_never_pairs_as_in_the_book():
    entries = entries_of(["x", "x", "xx", "xx"])
    assert [(p.i, p.j) for p in nd.field_pairs(entries, "instruction")] == [(2, 3)]


def test_find_near_duplicates_orders_by_field_then_index():
    entries = entries_of(["Say hi.", "say hi", "Other."], ["", "", ""],
                         ["Hello there.", "Different answer", "hello there"])
    got = [(p.field, p.i, p.j) for p in nd.find_near_duplicates(entries)]
    assert got == [("instruction", 0, 1), ("output", 0, 2)]


def test_remove_drops_the_second_entry_of_input_then_output_pairs():
    entries = entries_of(
        ["Same instruction."] * 5,
        ["red green blue", "", "red green blue!", "", ""],
        ["first answer here", "second answer", "first answer here", "second answer.", "third one"])
    # instruction pairs remove nothing; input: (0, 2) drops 2; output then among 0, 1, 3, 4:
    # (1, 3) drops 3 ((0, 2) is gone with entry 2)
    kept, removed = nd.remove_near_duplicates(entries)
    assert removed == [2, 3] and kept == [entries[k] for k in (0, 1, 4)]
    known = nd.find_near_duplicates(entries)
    assert nd.remove_near_duplicates(entries, known=known) == (kept, removed)


def test_find_leaks_needs_every_field():
    train = entries_of(["Name a colour.", "Add 2 and 3.", "Sort: b, a."], ["", "", "b a"],
                       ["Red.", "5", "a b"])
    test = [{"instruction": "name a colour", "input": "", "output": "red"},  # copy: leak
            {"instruction": "Add 2 and 3.", "output": "Five"},  # another answer: no leak
            {"instruction": "Sort: b, a!", "input": "b a", "output": "a b."},  # copy: leak
            {"instruction": "Sort: b, a.", "input": "c d", "output": "a b"}]  # another input
    leaks = nd.find_leaks(train, test)
    assert [(leak.test_index, leak.train_index) for leak in leaks] == [(0, 0), (2, 2)]
    assert leaks[0].similarity["input"] == 1.0 and min(leaks[1].similarity.values()) > 0.9
    assert nd.find_leaks(train, train[:1] + [{"instruction": "new", "output": "new"}]) == \
        [nd.Leak(0, 0, {"instruction": 1.0, "input": 1.0, "output": 1.0})]


# ---- the command line ---------------------------------------------------------------------------
def write(tmp_path, entries, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def run_main(capsys, *argv):
    """(exit code, stdout, stderr) of the command run in this process, as cli_main runs it."""
    try:
        cli_main(lambda: nd.main([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def leaky_file(tmp_path):
    """20 entries: train 0-16, test 17-18, validation 19 (data.split_data). Entry 17 copies 3's
    instruction (train/test), 19 copies 18's output (validation/test), 5 and 6 pair within train."""
    topics = "abcdefghijklmnopqrst"
    entries = entries_of([f"Task number {k} about {w}." for k, w in enumerate(topics)],
                         outputs=[f"Answer {k * 7919 % 1000} xq{k}" for k in range(20)])
    entries[17]["instruction"] = entries[3]["instruction"].upper()
    entries[19]["output"] = entries[18]["output"] + "!"
    entries[6]["instruction"] = entries[5]["instruction"] + "?"
    return write(tmp_path, entries), entries


def test_json_lines(tmp_path, capsys):
    path, _ = leaky_file(tmp_path)
    code, out, err = run_main(capsys, path, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and err == ""
    assert [(r["field"], r["i"], r["j"]) for r in records] == \
        [("instruction", 3, 17), ("instruction", 5, 6), ("output", 18, 19)]
    assert all(set(r) == {"field", "i", "j", "similarity"} and 0.9 < r["similarity"] <= 1
               for r in records)


def test_split_reports_leaks_labelled(tmp_path, capsys):
    path, _ = leaky_file(tmp_path)
    code, out, _ = run_main(capsys, path, "--split", "--json")
    assert [(r["i"], r["j"], r["parts"]) for r in map(json.loads, out.splitlines())] == \
        [(3, 17, "train/test"), (18, 19, "validation/test")]
    code, out, _ = run_main(capsys, path, "--split")
    lines = out.splitlines()
    assert lines[0].startswith("[train/test] instruction 3 17 1.0000  ")
    assert lines[-1] == ("2 leaks (pairs across parts) with similarity above 0.9: instruction 1, "
                         "input 0, output 1 (20 entries); train/test 1, train/validation 0, "
                         "validation/test 1")


def test_remove_writes_atomically_and_only_where_asked(tmp_path, capsys):
    entries = entries_of(["Do it."] * 3, ["", "", ""], ["one answer", "One answer!", "two"])
    path = write(tmp_path, entries)
    out_path = tmp_path / "clean.json"
    code, out, _ = run_main(capsys, path, "--remove", out_path, "--quiet")
    assert code == 0 and json.loads(out_path.read_text()) == [entries[0], entries[2]]
    assert "removed 1 entries" in out and json.loads(path.read_text()) == entries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.json", "d.json"]  # no temp file
    code, _, err = run_main(capsys, path, "--remove", tmp_path / "no" / "x.json")
    assert code == 2 and err.count("\n") == 1 and "not a file in an existing folder" in err
    code, out, _ = run_main(capsys, path, "--remove", path)  # the input itself, given explicitly
    assert code == 0 and json.loads(path.read_text()) == [entries[0], entries[2]]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    path, _ = leaky_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": 1}]')
    two = write(tmp_path, entries_of(["a", "b"]), "two.json")
    cases = [([path, "--threshold", "0"], "argument --threshold: must be a finite number > 0 "
                                          "and <= 1, got '0'"),
             ([path, "--threshold", "1.5"], "<= 1"), ([path, "--threshold", "x"], "got 'x'"),
             ([tmp_path / "none.json"], "argument file: "),
             ([bad], "entry 0"), ([two, "--split"], "too few"),
             ([path, "--split", "--remove", "o.json"], "one at a time")]
    for argv, message in cases:
        code, out, err = run_main(capsys, *argv)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err


def test_progress_lines_and_quiet(tmp_path, capsys, monkeypatch):
    path, _ = leaky_file(tmp_path)
    monkeypatch.setattr(nd, "PROGRESS_EVERY_S", 0.0)
    _, _, err = run_main(capsys, path)
    assert "instruction: TF-IDF, texts 20/20 (100 %)" in err
    assert "output: pairs, rows 20/20 (100 %)" in err
    _, _, err = run_main(capsys, path, "--quiet")
    assert err == ""


def test_runs_by_path_from_the_repository_root(tmp_path):
    path, _ = leaky_file(tmp_path)
    result = subprocess.run([sys.executable, "data/near_duplicates.py", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=FRESH_TORCH_S)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("3 near-duplicate")


def test_the_benchmarks_generator_is_seeded_and_its_check_passes():
    bench = load_script("benchmarks/near_duplicates_52k.py")
    entries = bench.make_entries(400, seed=3)
    assert entries == bench.make_entries(400, seed=3) != bench.make_entries(400, seed=4)
    assert sum(bool(e["input"]) for e in entries) in range(100, 220)  # about 40 % have an input
    assert "the same as brute force" in bench.check_subsample(entries, 300, seed=0)


def test_the_embedded_data_has_no_test_or_validation_entry_copying_a_training_entry():
    """train.py skips the leak check for its own data set: this test makes that safe."""
    from data import load_data, split_data
    train, val, test = split_data(load_data(REPO / "data" / "instruction-data.json"))
    assert nd.find_leaks(train, test) == [] and nd.find_leaks(train, val) == []

