"""data/tfidf_pairs.py: the book's measure (hand-computed values and scikit-learn's own
numbers) and the fast search against brute force."""
import random
import re

import numpy as np
import pytest
import torch

from script_loader import load_script

tp = load_script("data/tfidf_pairs.py")


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


def test_equal_to_scikit_learn_on_small_files():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    rng = random.Random(0)
    for _ in range(5):
        texts = [" ".join(rng.choice(["the", "cat", "Cat!", "sat", "é", "a\t", "  on", "mat."])
                          for _ in range(rng.randint(1, 12))) for _ in range(30)]
        book = [re.sub(r"[^\w\s]", "", t.lower()) for t in texts]  # the book's preprocess_text
        vectorizer = sklearn_text.TfidfVectorizer(analyzer="char", ngram_range=(1, 3))
        theirs = pairwise.cosine_similarity(vectorizer.fit_transform(book))
        m = tp.tfidf_matrix([tp.preprocess_text(t) for t in texts])
        assert np.abs(m.dense() @ m.dense().T - theirs).max() < 1e-12
        assert m.n_features == len(vectorizer.vocabulary_)


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
