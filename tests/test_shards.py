"""Shard sets: banks read together as one equal the one bank holding all their documents (the
same NLL for score, the same answer and sources for ask), locally through faiss.IndexShards and
with a shard served by a Ray actor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import memtx
from test_bank import build, make_corpus, tiny_cfg

from memtx_cli.bank.ingest import ingest, open_or_create_bank
from memtx_cli.bank.shards import SHARDS_FILE, ShardedBank, make_shard_set
from memtx_cli.engine.generate import Sampling
from memtx_cli.engine.score import score_file
from memtx_cli.errors import MemtxError
from memtx_cli.tasks.chat import ask_bank

QUESTION = "what is the memory bank index?"
FLAGS_KEYS = {"segment": 64, "block_size": 8, "blocks": 4, "block_chunk": 16, "dtype": "float32"}


def build_from(tiny_lm, tiny_gguf, files, out):
    """A bank of exactly `files` (their paths as given: sources compare by path)."""
    cfg = tiny_cfg(tiny_gguf)
    bank = open_or_create_bank(out, tiny_lm, cfg, 0, "fifo")
    try:
        ingest(tiny_lm, bank, files, cfg)
    finally:
        bank.close()


@pytest.fixture(scope="module")
def banks(tiny_lm, tiny_gguf, tmp_path_factory):
    """One bank of five documents, and the same documents in two shards (3 + 2)."""
    root = tmp_path_factory.mktemp("shards")
    corpus = make_corpus(root / "corpus", n_docs=6, words=400)
    files = sorted(corpus.glob("doc[0-4].txt"))
    build_from(tiny_lm, tiny_gguf, files, root / "one.idx")
    build_from(tiny_lm, tiny_gguf, files[:3], root / "a.idx")
    build_from(tiny_lm, tiny_gguf, files[3:], root / "b.idx")
    return root, corpus / "doc5.txt"


def flags(tiny_gguf) -> dict:
    return {"model": str(tiny_gguf), **FLAGS_KEYS}


def doc_paths(bank) -> list[str]:
    return sorted(d.path for d in bank.docs.values())


def test_a_shard_set_searches_like_one_bank(banks):
    root, _ = banks
    make_shard_set(root / "set1", [str(root / "a.idx"), str(root / "b.idx")], [])
    from memtx_cli.bank.store import Bank

    with ShardedBank.open(root / "set1") as sb, Bank.open(root / "one.idx") as one:
        assert sb.entries == one.entries and len(sb.docs) == len(one.docs) == 5
        assert [d.tokens for d in sorted(sb.docs.values(), key=lambda d: d.path)] == [
            d.tokens for d in sorted(one.docs.values(), key=lambda d: d.path)
        ]
        rng = np.random.default_rng(0)
        layer = one.geo.layers[0]
        q = rng.standard_normal((4, one.geo.head_dim)).astype(np.float32)
        for h in range(one.geo.n_kv):
            d1, i1 = (x[0] for x in one.search_heads(layer, [h], q[None], 5))
            d2, i2 = (x[0] for x in sb.search_heads(layer, [h], q[None], 5))
            np.testing.assert_allclose(d2, d1, rtol=1e-6)
            # the same blocks: their keys equal, whatever their ids
            k1 = one.keys(layer).gather(i1[None] * one.geo.block_size, [h])
            k2 = sb.keys(layer).gather(i2[None] * sb.geo.block_size, [h])
            np.testing.assert_array_equal(k1, k2)
        # provenance maps a block back to its own document
        for g, rec in sb.docs.items():
            assert int(sb.block_provenance(rec.blocks[0])[0, 0]) == g


def test_score_and_ask_through_shards_equal_one_bank(banks, tiny_gguf):
    root, held_out = banks
    set_dir = root / "set2"
    make_shard_set(set_dir, [str(root / "a.idx"), str(root / "b.idx")], [])
    one = score_file(str(held_out), flags(tiny_gguf), bank_path=str(root / "one.idx"))
    got = score_file(str(held_out), flags(tiny_gguf), bank_path=str(set_dir))
    r1, r2 = one.results["main"], got.results["main"]
    assert r2.bank["entries"] == r1.bank["entries"]
    assert r2.nll == pytest.approx(r1.nll, rel=1e-5)
    alone = score_file(str(held_out), flags(tiny_gguf)).results["main"]
    assert abs(alone.nll - r1.nll) > 1e-4  # the bank is read: it changes the score
    sampling = Sampling(max_tokens=8, temperature=0)
    a1 = ask_bank(QUESTION, flags(tiny_gguf), None, None, str(root / "one.idx"), sampling, 3, 2, None, lambda t: None)
    a2 = ask_bank(QUESTION, flags(tiny_gguf), None, None, str(set_dir), sampling, 3, 2, None, lambda t: None)
    assert a2.generation.text == a1.generation.text and len(a1.sources) >= 2
    assert [(s.path, s.lines, s.text) for s in a2.sources] == [(s.path, s.lines, s.text) for s in a1.sources]
    assert [s.weight for s in a2.sources] == pytest.approx([s.weight for s in a1.sources], rel=1e-4)


def test_shard_set_cli_info_and_refusals(banks, tiny_gguf, tmp_path):
    root, _ = banks
    out = tmp_path / "set.idx"
    r = memtx("bank", "shards", str(root / "a.idx"), str(root / "b.idx"), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 5 and (out / SHARDS_FILE).stat().st_mode & 0o077 == 0
    r = memtx("bank", "info", str(out), "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and len(info["shards"]) == 2 and info["entries"] > 0
    r = memtx("bank", "shards", str(root / "a.idx"), "--out", str(out))  # never replaces
    assert r.returncode == 1 and "exists" in r.stderr
    r = memtx("bank", "shards", str(root / "a.idx"), str(tmp_path / "none"), "--out", str(tmp_path / "bad"))
    assert r.returncode == 1 and "not a memtx bank" in r.stderr and not (tmp_path / "bad").exists()
    r = memtx("chat", "--model", str(tiny_gguf), "--memory", str(out), "--remember", stdin="hi\n")
    assert r.returncode == 2 and "shard set" in r.stderr
    bad = tmp_path / "bad2"
    bad.mkdir()
    (bad / SHARDS_FILE).write_text("shards: [{path: 1, run: x}]\n")
    with pytest.raises(MemtxError, match="each shard is"):
        ShardedBank.open(bad)


def test_shards_of_another_geometry_are_refused(banks, tiny_lm, tiny_gguf, tmp_path):
    root, _ = banks
    corpus = make_corpus(tmp_path / "c", n_docs=1, words=100)
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "other.idx", block_size=16)
    with pytest.raises(MemtxError, match="geometry"):
        make_shard_set(tmp_path / "set", [str(root / "a.idx"), str(tmp_path / "other.idx")], [])
    assert not (tmp_path / "set").exists()


def test_a_remote_shard_on_ray_equals_one_bank(banks, tiny_gguf):
    ray = pytest.importorskip("ray")
    root, held_out = banks
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        node = ray.util.get_node_ip_address()
        set_dir = root / "set3"
        make_shard_set(set_dir, [str(root / "a.idx")], [f"{node}={root / 'b.idx'}"], ray="local")
        with ShardedBank.open(set_dir) as sb:
            assert type(sb.shards[1]).__name__ == "RemoteShard" and len(sb.docs) == 5
        one = score_file(str(held_out), flags(tiny_gguf), bank_path=str(root / "one.idx"))
        got = score_file(str(held_out), flags(tiny_gguf), bank_path=str(set_dir))
        assert got.results["main"].nll == pytest.approx(one.results["main"].nll, rel=1e-5)
        sampling = Sampling(max_tokens=8, temperature=0)
        a1 = ask_bank(
            QUESTION, flags(tiny_gguf), None, None, str(root / "one.idx"), sampling, 3, 2, None, lambda t: None
        )
        a2 = ask_bank(QUESTION, flags(tiny_gguf), None, None, str(set_dir), sampling, 3, 2, None, lambda t: None)
        assert a2.generation.text == a1.generation.text
        assert [(s.path, s.lines, s.text) for s in a2.sources] == [(s.path, s.lines, s.text) for s in a1.sources]
        bad = root / "set4"
        with pytest.raises(MemtxError, match="not a memtx bank|shard"):
            make_shard_set(bad, [], [f"{node}={root / 'nothing.idx'}"], ray="local")
    finally:
        ray.shutdown()
