"""The book's near-duplicate measure at scale: which texts have TF-IDF cosine above a threshold.

`tfidf_matrix` computes scikit-learn's TfidfVectorizer(analyzer="char", ngram_range=(1, 3)) with
numpy alone; `similar_pairs` finds every pair above the threshold without the n x n matrix, exactly:
an upper bound of every pair's similarity comes from one int8 matrix product of short per-row
vectors (exact integer arithmetic), and only pairs whose bound reaches the threshold are computed
in float64. `brute_force_pairs` is the book's n x n way, for small inputs and for checking.
Why not prefix filtering (All-Pairs, Bayardo et al. 2007)? With character n-grams the weight of
a text sits in common characters, so the prefix that must be indexed reaches features shared by
thousands of texts: on benchmarks/near_duplicates_52k.py's outputs (52,000 rows) the index yields
4.3e9 candidate (pair, feature) hits, 3.2 times the number of pairs. The bound here leaves 1.0-1.1
times the true pairs as candidates.
Used by data/near_duplicates.py; imports no project file.
"""
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")  # what the book removes as punctuation
WHITESPACE_RUN = re.compile(r"\s\s+")  # scikit-learn's char analyzer makes each run one space
ROUND = 12  # similarities are compared at 12 decimals: float noise (~1e-16) never decides a pair
MARGIN = 1e-4  # far above the float32 rounding in scaling the bound (~1e-6): no pair is lost


def preprocess_text(text: str) -> str:
    """The string whose n-grams are counted: the book's preprocess_text (lowercase, then drop
    every character that is neither \\w nor whitespace), then what TfidfVectorizer does to it
    (lowercase again, which changes nothing, and each run of 2+ whitespace characters becomes one
    space; a lone tab or newline stays as it is)."""
    return WHITESPACE_RUN.sub(" ", NOT_WORD_OR_SPACE.sub("", text.lower()).lower())


def is_similar(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """The book's rule, similarity > threshold, on similarities rounded to 12 decimals; a pair
    of identical vectors (similarity 1) always counts, so threshold 1.0 means "identical after
    preprocessing" (the book's > would leave that to rounding noise)."""
    rounded = np.round(similarity, ROUND)
    return (rounded > threshold) | (rounded >= 1.0)


@dataclass
class Rows:
    """A sparse matrix in CSR form: row r has columns indices[indptr[r]:indptr[r + 1]]
    (ascending) with values data[...] (float64)."""
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_features: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def dense(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop as a dense float64 array."""
        stop = self.n_rows if stop is None else stop
        out = np.zeros((stop - start, self.n_features))
        lo, hi = self.indptr[start], self.indptr[stop]
        row = np.repeat(np.arange(stop - start), np.diff(self.indptr[start:stop + 1]))
        out[row, self.indices[lo:hi]] = self.data[lo:hi]
        return out


# ---- TF-IDF -------------------------------------------------------------------------------------
def char_codes(texts: list[str]) -> tuple[np.ndarray, int]:
    """All texts' characters as small codes 1..K-1 (0 is never used), concatenated, and K."""
    points = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    table = np.zeros(0x110000, np.int32)
    present = np.flatnonzero(np.bincount(points, minlength=0x110000))
    table[present] = np.arange(1, len(present) + 1)
    return table[points], len(present) + 1


def ngram_ids(codes: np.ndarray, doc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(document, id) of every 1-, 2- and 3-gram in `codes` that stays inside one document.
    A 1-gram's id is c, a 2-gram's c1*k + c2, a 3-gram's (c1*k + c2)*k + c3: with codes >= 1,
    grams of different lengths never share an id, and k**3 < 2**63 for any Unicode text."""
    codes = codes.astype(np.int64)
    docs, ids, gram = [doc], [codes], codes
    for n in (2, 3):
        gram = gram[:-1] * k + codes[n - 1:]
        inside = doc[:1 - n] == doc[n - 1:]
        docs.append(doc[:1 - n][inside])
        ids.append(gram[inside])
    return np.concatenate(docs), np.concatenate(ids)


def text_chunks(lengths: np.ndarray, chunk_chars: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, stop, first character, end character) of runs of texts with about `chunk_chars`
    characters together (one text at least), so that no step holds all n-grams at once."""
    ends = np.cumsum(lengths)
    start = 0
    while start < len(lengths):
        begin = ends[start] - lengths[start]
        stop = max(start + 1, int(np.searchsorted(ends, begin + chunk_chars, side="right")))
        yield start, stop, begin, ends[stop - 1]
        start = stop


def count_matrix(texts: list[str], chunk_chars: int = 1 << 20,
                 progress: Callable[[int, int], None] | None = None) -> Rows:
    """Each text's n-gram counts (CSR; column c is the c-th smallest n-gram id). Two passes over
    the texts, a chunk at a time: the vocabulary first, then each text's (column, count) runs."""
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    codes, k = char_codes(texts)
    chunks = list(text_chunks(lengths, chunk_chars))

    def grams(start, stop, lo, hi):  # (text - start, id) of the chunk's n-grams
        return ngram_ids(codes[lo:hi], np.repeat(np.arange(stop - start), lengths[start:stop]), k)

    vocabulary = np.unique(np.concatenate([np.zeros(0, np.int64)] +
                                          [np.unique(grams(*c)[1]) for c in chunks]))
    size, per_text, columns, counts = len(vocabulary), np.zeros(len(texts), np.int64), [], []
    for start, stop, lo, hi in chunks:
        doc, gram = grams(start, stop, lo, hi)
        key = np.sort(doc * size + np.searchsorted(vocabulary, gram))
        first = np.flatnonzero(np.diff(key, prepend=-1))  # one run per (text, n-gram)
        per_text[start:stop] = np.bincount(key[first] // max(size, 1), minlength=stop - start)
        columns.append((key[first] % max(size, 1)).astype(np.int32))
        counts.append(np.diff(np.append(first, len(key))).astype(np.float64))
        if progress:
            progress(stop, len(texts))
    indptr = np.concatenate([[0], np.cumsum(per_text)])
    return Rows(indptr, np.concatenate(columns), np.concatenate(counts), size)


def row_sums(m: Rows, values: np.ndarray) -> np.ndarray:
    """Sum of `values` (one per entry) over each row; 0 for an empty row."""
    sums = np.zeros(m.n_rows)
    filled = np.diff(m.indptr) > 0
    if filled.any():
        sums[filled] = np.add.reduceat(values, m.indptr[:-1][filled])
    return sums


def tfidf_matrix(texts: list[str], progress: Callable[[int, int], None] | None = None) -> Rows:
    """TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform(texts), texts already
    preprocessed: raw counts times idf = ln((1 + n) / (1 + df)) + 1, each row scaled to length 1
    (a text without characters stays a zero row, similar to nothing)."""
    matrix = count_matrix(texts, progress=progress)
    df = np.bincount(matrix.indices, minlength=matrix.n_features)
    matrix.data *= (np.log((1 + len(texts)) / (1 + df)) + 1)[matrix.indices]
    norms = np.sqrt(row_sums(matrix, matrix.data ** 2))
    matrix.data /= np.repeat(norms, np.diff(matrix.indptr))
    return matrix


# ---- all pairs above a threshold ----------------------------------------------------------------
@dataclass
class Bounds:
    """Per row a short int8 vector q (n, groups) and a scale: q_x . q_y * inv_scale_x * inv_scale_y
    is at least the similarity of rows x and y."""
    q: torch.Tensor
    inv_scale: torch.Tensor


def bound_vectors(m: Rows, groups: int, chunk: int = 4096) -> Bounds:
    """Features are dealt into `groups` groups round-robin in order of their total weight (so the
    weightiest features, spaces and common letters, each lead a group, and each group holds a mix
    of rarer ones). Then x.y = sum over groups G of x_G.y_G <= sum |x_G| |y_G| (Cauchy-Schwarz),
    tight unless two rows hold different features of one group; q rounds each |x_G| up to an
    integer step of |x|'s largest group / 127, which keeps it an upper bound."""
    mass = np.bincount(m.indices, weights=m.data ** 2, minlength=m.n_features)
    group = np.empty(m.n_features, np.int64)
    group[np.argsort(-mass, kind="stable")] = np.arange(m.n_features) % groups
    q = np.zeros((m.n_rows, groups), np.int8)
    inv_scale = np.ones(m.n_rows)
    for start in range(0, m.n_rows, chunk):
        stop = min(m.n_rows, start + chunk)
        lo, hi = m.indptr[start], m.indptr[stop]
        row = np.repeat(np.arange(stop - start), np.diff(m.indptr[start:stop + 1]))
        norms = np.sqrt(np.bincount(row * groups + group[m.indices[lo:hi]],
                                    weights=m.data[lo:hi] ** 2, minlength=(stop - start) * groups))
        norms = norms.reshape(stop - start, groups)
        top = norms.max(axis=1, initial=0.0)
        scale = 127 * (1 - 1e-9) / np.where(top > 0, top, 1.0)  # so that ceil stays <= 127
        q[start:stop] = np.ceil(norms * scale[:, None])
        inv_scale[start:stop] = 1 / scale
    return Bounds(torch.from_numpy(q), torch.from_numpy(inv_scale.astype(np.float32)))


def int8_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for int8 matrices, exactly: torch's integer product (int32 sums), or float64
    (exact for these integers, slower) where a torch build has none."""
    try:
        return torch._int_mm(a, b.T)
    except (AttributeError, RuntimeError):
        return a.double() @ b.double().T


def candidates(bounds: Bounds, start: int, stop: int, threshold: float) -> tuple[np.ndarray, ...]:
    """Pairs (i, j), start <= i < stop, i < j, whose upper bound reaches the threshold, less a
    margin for the float32 rounding in scaling it (so no pair above it is ever left out)."""
    u = int8_products(bounds.q[start:stop], bounds.q[start:]).float()  # (B, n - start)
    u.mul_(bounds.inv_scale[None, start:])  # the bound times scale_i, compared with that below
    u[:, :stop - start].diagonal().zero_()  # a row with itself is no pair
    hit = u >= (threshold - MARGIN) / bounds.inv_scale[start:stop, None]
    rows = hit.any(dim=1).nonzero()[:, 0]  # most rows have no candidate at all
    r, c = hit[rows].nonzero().T
    i, j = start + rows[r].numpy(), start + c.numpy()
    return i[j > i], j[j > i]


def dots_with_block(m: Rows, block: np.ndarray, lo: int, i: np.ndarray,
                    j: np.ndarray) -> np.ndarray:
    """x_i . x_j for rows i in the dense `block` (rows lo...) and rows j walked entry by entry."""
    lengths = m.indptr[j + 1] - m.indptr[j]
    first = m.indptr[j] - np.cumsum(lengths) + lengths  # row j's first entry, less its offset
    entry = np.repeat(first, lengths) + np.arange(lengths.sum())
    products = m.data[entry] * block[np.repeat(i - lo, lengths), m.indices[entry]]
    return np.bincount(np.repeat(np.arange(len(i)), lengths), weights=products, minlength=len(i))


def exact_similarities(m: Rows, i: np.ndarray, j: np.ndarray,
                       max_cells: int = 1 << 22) -> np.ndarray:
    """x_i . x_j in float64 for each pair: rows i gathered into dense blocks and pairs taken a
    chunk at a time, each at most `max_cells` floats (so a low threshold cannot exhaust memory)."""
    out = np.zeros(len(i))
    step = max(1, max_cells // max(1, m.n_features))
    for lo in range(int(i.min(initial=0)), int(i.max(initial=-1)) + 1, step):
        pick = np.flatnonzero((i >= lo) & (i < lo + step))
        if not len(pick):
            continue
        block = m.dense(lo, min(m.n_rows, lo + step))
        work = np.cumsum(m.indptr[j[pick] + 1] - m.indptr[j[pick]])
        cuts = np.searchsorted(work, np.arange(max_cells, work[-1], max_cells))
        for part in np.split(pick, cuts):
            out[part] = dots_with_block(m, block, lo, i[part], j[part])
    return out


def group_count(m: Rows) -> int:
    """Groups in the bound: ~8 per feature of an average row (so unrelated rows seldom share a
    group), a power of two from 256 to 2048; only speed depends on it, never the result."""
    per_row = len(m.data) / max(1, m.n_rows)
    return int(min(2048, max(256, 2 ** np.ceil(np.log2(8 * per_row + 1)))))


def similar_pairs(m: Rows, threshold: float, block: int = 512,
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) arrays of every pair i < j of rows with similarity above `threshold`
    (is_similar), ordered by i then j: the same pairs as brute_force_pairs, without n x n memory."""
    bounds = bound_vectors(m, group_count(m))
    found = []
    for start in range(0, m.n_rows, block):
        stop = min(m.n_rows, start + block)
        i, j = candidates(bounds, start, stop, threshold)
        sim = exact_similarities(m, i, j)
        keep = is_similar(sim, threshold)
        found.append((i[keep], j[keep], sim[keep]))
        if progress:
            progress(stop, m.n_rows)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*found))


def brute_force_pairs(m: Rows, threshold: float,
                      progress: Callable[[int, int], None] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The book's way: the full n x n similarity matrix (small inputs and checks only)."""
    dense = m.dense()
    sims = dense @ dense.T
    i, j = np.triu_indices(m.n_rows, 1)
    keep = is_similar(sims[i, j], threshold)
    if progress:
        progress(m.n_rows, m.n_rows)
    return i[keep], j[keep], sims[i, j][keep]
