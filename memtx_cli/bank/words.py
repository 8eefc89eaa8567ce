"""A bank's words: a lexical index beside its attention memories, and BM25 over it.

Every stored token keeps the hash of the word (`\\w+`, lowercased) that starts within its
characters, 0 if none (`words.bin`, aligned with the keys, values and provenance). A question's
words then find the blocks that state them, however the model's attention ranks those blocks:
a 135M model's attention tells which document a question is about far better than which lines,
and rare words (a name, a defined term, a number) tell the lines.

Blocks are scored with BM25 (Robertson and Zaragoza 2009; k1 = 1.2, b = 0.75) over a window of
neighbouring blocks of the same document (a block is 32 tokens, about one sentence; a fact and
the words that ask for it are often a sentence apart), the block's own words counted twice so
that the blocks of one window rank by what each holds. The scores are hashed-word counts, so a
search reads 4 bytes per stored token and no text."""

from __future__ import annotations

import re
import weakref
import zlib
from typing import Any

import numpy as np

from memtx_cli.bank.format import B_VALID

WORD = re.compile(r"\w+")
WINDOW = 2  # blocks either side of the scored block that count as its text
K1, B = 1.2, 0.75


def word_hash(word: str) -> int:
    """A word's id in `words.bin`: crc32 of its lowercased UTF-8, never 0 (0 = no word)."""
    return zlib.crc32(word.lower().encode("utf-8")) or 1


def token_words(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """(tokens,) uint32: for each token (its [start, end) characters in `text`), the hash of the
    first word that starts inside it, 0 when none does."""
    found = [(m.start(), word_hash(m.group())) for m in WORD.finditer(text)]
    out = np.zeros(len(offsets), dtype=np.uint32)
    if not found or not offsets:
        return out
    starts = np.fromiter((s for s, _ in found), dtype=np.int64, count=len(found))
    hashes = np.fromiter((h for _, h in found), dtype=np.uint32, count=len(found))
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    i = np.searchsorted(starts, spans[:, 0], side="left")
    ok = i < len(starts)
    ok[ok] = starts[i[ok]] < np.maximum(spans[ok, 1], spans[ok, 0] + 1)
    # tokens sharing characters (byte pieces of one character) claim a word once, the first
    claim = np.nonzero(ok)[0]
    ok[claim[1:][i[claim[1:]] == i[claim[:-1]]]] = False
    out[ok] = hashes[i[ok]]
    return out


def query_words(text: str) -> np.ndarray:
    """The distinct word hashes of a question."""
    return np.unique(np.fromiter((word_hash(w) for w in WORD.findall(text)), dtype=np.uint32))


def document_order(bank: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Live blocks in document order: (blocks, first position of each block's document, one
    past its last), positions indexing the returned order."""
    order, lo, hi = [], [], []
    for d in sorted(bank.docs.values(), key=lambda d: d.id):
        n0 = len(order)
        order += d.blocks
        lo += [n0] * len(d.blocks)
        hi += [len(order)] * len(d.blocks)
    return np.asarray(order, np.int64), np.asarray(lo, np.int64), np.asarray(hi, np.int64)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(bank: Any, words: np.ndarray) -> tuple[np.ndarray, ...]:
    """(blocks in document order, their documents' first and last positions, valid entries,
    word rows) of a bank: computed once per reader (a bank opened for reading does not change)."""
    got = _LAYOUTS.get(bank)
    if got is None:
        order, lo, hi = document_order(bank)
        rows = np.asarray(words.reshape(-1, bank.geo.block_size)[order])
        got = (order, lo, hi, bank.blocks[order, B_VALID], rows)
        if not bank.writer:
            _LAYOUTS[bank] = got
    return got


def _window_sum(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, w: int) -> np.ndarray:
    """Sum of rows [i - w, i + w] of `x` (blocks in document order), clipped to each document."""
    cs = np.concatenate([np.zeros((1, *x.shape[1:]), x.dtype), np.cumsum(x, axis=0)])
    pos = np.arange(len(x))
    a, b = np.maximum(pos - w, lo), np.minimum(pos + w + 1, hi)
    return cs[b] - cs[a]


def bm25_blocks(bank: Any, question: str, top: int, window: int = WINDOW) -> dict[int, float]:
    """The `top` live blocks with the highest BM25 score for `question`'s words (each block
    scored with the words of `window` blocks either side in its document); {} when the bank
    has no words, or the question no word the bank holds."""
    words = bank.words_array()
    q = query_words(question)
    if words is None or not len(q) or not len(bank.docs):
        return {}
    bs = bank.geo.block_size
    order, lo, hi, valid, rows = _layout(bank, words)  # rows: (blocks in document order, block_size)
    keep = np.arange(bs)[None, :] < valid[:, None]
    present = (rows != 0) & keep
    # the block's own words count twice: blocks sharing a window rank by what they hold themselves
    own_len = present.sum(1).astype(np.float64)
    length = _window_sum(own_len, lo, hi, window) + own_len
    tf = np.stack([((rows == h) & keep).sum(1) for h in q], 1).astype(np.float64)  # (blocks, words)
    hit = tf.any(1)
    if not hit.any():
        return {}
    tf = _window_sum(tf, lo, hi, window) + tf
    n = len(order)
    df = (tf > 0).sum(0)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    norm = K1 * (1 - B + B * length / max(length.mean(), 1e-9))
    score = (idf[None, :] * tf * (K1 + 1) / (tf + norm[:, None])).sum(1)
    best = np.argsort(-score, kind="stable")[:top]
    best = best[score[best] > 0]
    bank.verify_read(order[hit], ["words.bin"])  # the blocks whose words were counted
    return {int(order[i]): float(score[i]) for i in best}


def fuse_ranks(*rankings: tuple[dict[int, float], float], k: int = 60) -> dict[int, float]:
    """Weighted reciprocal rank fusion (Cormack et al. 2009): a block scores the sum over the
    (scores, weight) rankings it appears in of weight / (k + rank), rank 1 the highest score.
    k = 60, the paper's constant."""
    out: dict[int, float] = {}
    for scores, weight in rankings:
        for r, b in enumerate(sorted(scores, key=lambda b: -scores[b])):
            out[b] = out.get(b, 0.0) + weight / (k + r + 1)
    return out
