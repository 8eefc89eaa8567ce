"""A bank's words (the lexical index): token alignment, BM25 exact against a reference computed
from the documents' text, rank fusion, and the words kept through merge, compaction and damage."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_bank import build, make_corpus

from memtx_cli.bank.ops import compact, merge_banks, remove_documents
from memtx_cli.bank.store import Bank
from memtx_cli.bank.words import WORD, bm25_blocks, fuse_ranks, token_words, word_hash
from memtx_cli.errors import MemtxError

NEEDLE = "The zanzibar quorum number is 73104."


@pytest.fixture(scope="module")
def bank_dir(tiny_lm, tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    corpus = make_corpus(root / "corpus", n_docs=3, words=300)
    doc1 = corpus / "doc1.txt"
    lines = doc1.read_text().splitlines()
    doc1.write_text("\n".join([*lines[:12], NEEDLE, *lines[12:]]) + "\n")
    build(tiny_lm, tiny_gguf, corpus, root / "b.idx")
    return root / "b.idx", corpus


def test_each_word_is_kept_once_at_the_token_it_starts_in(tiny_lm):
    text = "Walter Elliot, born March 1, 1760, married (July 15) luaH_getint's key.\n  x=y café 東京 naïve 🙂 end"
    ids, offsets = tiny_lm.tokenizer.encode_with_offsets(text)
    got = token_words(text, offsets)
    assert got.shape == (len(ids),) and got.dtype == np.uint32
    want = collections.Counter(word_hash(w) for w in WORD.findall(text))
    assert collections.Counter(got[got != 0].tolist()) == want
    starts = {m.start(): m.group() for m in WORD.finditer(text)}
    claimed = set()
    for (s, e), h in zip(offsets, got.tolist(), strict=True):
        first = min((p for p in starts if s <= p < max(e, s + 1) and p not in claimed), default=None)
        if first is not None and h:
            claimed.add(first)
        assert h == (0 if first is None else word_hash(starts[first]))
    assert word_hash("Pass") == word_hash("pass") != 0


def _reference_bm25(bank: Bank, question: str, window: int = 2) -> dict[int, float]:
    """BM25 straight from the documents' text: each block's words are those starting between
    its first token's character and the next block's, counted over `window` blocks each side and its own once more."""
    bs = bank.geo.block_size
    prov = bank.provenance()
    block_words, order = {}, []
    for d in sorted(bank.docs.values(), key=lambda d: d.id):
        text = Path(d.path).read_text()
        starts = [int(prov[b * bs, 2]) for b in d.blocks] + [len(text)]
        for i, b in enumerate(d.blocks):
            block_words[b] = [m.group().lower() for m in WORD.finditer(text) if starts[i] <= m.start() < starts[i + 1]]
        order.append(d.blocks)
    windows = {}
    for blocks in order:
        for i, b in enumerate(blocks):
            near = range(max(0, i - window), min(len(blocks), i + window + 1))
            windows[b] = [w for j in near for w in block_words[blocks[j]]] + block_words[b]  # its own twice
    n, avg = len(windows), sum(len(w) for w in windows.values()) / len(windows)
    q = {w.lower() for w in WORD.findall(question)}
    df = {t: sum(t in w for w in windows.values()) for t in q}
    out = {}
    for b, w in windows.items():
        c, s = collections.Counter(w), 0.0
        for t in q:
            if c[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * c[t] * 2.2 / (c[t] + 1.2 * (0.25 + 0.75 * len(w) / avg))
        if s > 0:
            out[b] = s
    return out


def test_bm25_equals_a_reference_from_the_text_and_finds_the_needle(bank_dir):
    out, corpus = bank_dir
    question = "What is the zanzibar quorum number of the document?"
    with Bank.open(out, verify=False) as bank:
        assert bank.has_words and bank.info()["words"]
        got = bm25_blocks(bank, question, top=10_000)
        want = _reference_bm25(bank, question)
        assert set(got) == set(want)
        for b in want:
            assert got[b] == pytest.approx(want[b], rel=1e-9)
        top = max(got, key=got.get)
        doc = bank.docs[int(bank.blocks[top, 0])]
        assert doc.path.endswith("doc1.txt")
        assert bm25_blocks(bank, "qqqq zzzz", top=5) == {}
        assert list(bm25_blocks(bank, question, top=3)) == sorted(got, key=lambda b: -got[b])[:3]


def test_rank_fusion_adds_reciprocal_ranks():
    fused = fuse_ranks(({1: 9.0, 2: 5.0}, 0.5), ({2: 0.3, 3: 0.2}, 1.0), k=60)
    assert fused[2] == pytest.approx(0.5 / 62 + 1 / 61)
    assert fused[1] == pytest.approx(0.5 / 61) and fused[3] == pytest.approx(1 / 62)


def test_words_survive_merge_and_compaction(bank_dir, tmp_path):
    out, _ = bank_dir
    question = "zanzibar quorum"
    merged = tmp_path / "m.idx"
    merge_banks([out], merged)
    with Bank.open(merged, writer=True) as w:
        remove_documents(w, [next(d.path for d in w.docs.values() if d.path.endswith("doc0.txt"))])
        compact(w)
    with Bank.open(merged, verify=True) as bank:
        assert bank.has_words
        after = bm25_blocks(bank, question, 10_000)
        want = _reference_bm25(bank, question)
        assert after and all(bank.docs[int(bank.blocks[b, 0])].path.endswith("doc1.txt") for b in after)
    assert after == pytest.approx(want, rel=1e-9)  # the words moved with their blocks


def test_a_bank_without_words_recalls_by_attention_alone(tiny_lm, tiny_gguf, tmp_path):
    """Banks made before the lexical index keep working: no words file, BM25 finds nothing."""
    from test_bank import tiny_cfg

    from memtx_cli.bank.format import Geometry
    from memtx_cli.bank.ingest import ingest, model_identity
    from memtx_cli.engine import plan

    corpus = make_corpus(tmp_path / "c", n_docs=2, words=120)
    cfg = tiny_cfg(tiny_gguf)
    a = tiny_lm.args
    geo = Geometry(list(plan.heads_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads)), a.n_kv_heads, a.head_dim, 8)
    bank = Bank.create(tmp_path / "old.idx", model_identity(tiny_lm), geo, cfg.to_dict(), {"capacity": 0}, words=False)
    try:
        ingest(tiny_lm, bank, sorted(corpus.glob("*.txt")), cfg)
    finally:
        bank.close()
    assert not (tmp_path / "old.idx/words.bin").exists()
    with Bank.open(tmp_path / "old.idx", verify=True) as b:
        assert not b.has_words and b.words_array() is None
        assert bm25_blocks(b, "document", 5) == {}


def test_damaged_words_are_never_read(bank_dir, tmp_path):
    import shutil

    out, _ = bank_dir
    copy = tmp_path / "d.idx"
    shutil.copytree(out, copy)
    with Bank.open(copy, verify=False) as bank:
        b = int(bank.docs[0].blocks[0])  # a block without the needle now claims its word
    raw = bytearray((copy / "words.bin").read_bytes())
    raw[b * 8 * 4 : (b + 1) * 8 * 4] = np.full(8, word_hash("zanzibar"), np.uint32).tobytes()
    (copy / "words.bin").write_bytes(bytes(raw))
    with Bank.open(copy, verify=False) as bank, pytest.raises(MemtxError, match=r"words\.bin is damaged"):
        bm25_blocks(bank, "zanzibar quorum", 5)
    with pytest.raises(MemtxError, match="words.bin"):
        Bank.open(copy, verify=True)


def test_question_words_are_whole_words():
    assert re.findall(WORD, "pass-key 12,345") == ["pass", "key", "12", "345"]


def test_a_prompts_words_pin_bank_blocks_that_every_chunk_reads(tiny_lm, tiny_gguf, bank_dir):
    import dataclasses

    from test_bank import tiny_cfg

    from memtx_cli.engine.generate import Sampling, generate
    from memtx_cli.tasks.chat import BankTrace

    out, _ = bank_dir
    cfg = tiny_cfg(tiny_gguf, bank_blocks=1)
    ids = tiny_lm.tokenizer.encode("Tell me the zanzibar quorum number.")
    with Bank.open(out, verify=False) as bank:
        pinned = set(bm25_blocks(bank, "Tell me the zanzibar quorum number.", cfg.bank_words))
        assert len(pinned) == cfg.bank_words == 4
        seen = []

        def trace(block_ids, mass):
            seen.append(set(block_ids.reshape(-1).tolist()))

        generate(tiny_lm, ids, cfg, Sampling(max_tokens=3, temperature=0), bank, trace=trace)
        assert seen and all(pinned <= s for s in seen)
        plain = BankTrace()
        off = dataclasses.replace(cfg, bank_words=0)
        generate(tiny_lm, ids, off, Sampling(max_tokens=3, temperature=0), bank, trace=plain)
        assert not pinned <= set(plain.mass)
        # pin-bias raises the attention the pinned blocks get (their share of the bank's mass)
        share = {}
        for bias in (0.0, 4.0):
            tr = BankTrace()
            c = dataclasses.replace(cfg, pin_bias=bias)
            generate(tiny_lm, ids, c, Sampling(max_tokens=3, temperature=0), bank, trace=tr)
            share[bias] = sum(tr.mass.get(b, 0.0) for b in pinned) / sum(tr.mass.values())
        assert 1 - share[4.0] < (1 - share[0.0]) / 5  # the blocks not pinned lose most of theirs
