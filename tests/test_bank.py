"""Memory banks: round trips, durability (kill + resume, damaged files), eviction alignment,
model mismatch, management commands and bad input. A tiny random-weight GGUF model keeps
these fast; the real model's numbers are in docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny, signal_after_documents, write_gguf
from typer.testing import CliRunner

from memtx_cli.bank.format import DocRecord, Geometry
from memtx_cli.bank.ingest import ingest, open_or_create_bank
from memtx_cli.bank.ops import merge_banks, verify_bank
from memtx_cli.bank.store import Bank
from memtx_cli.cli.app import app
from memtx_cli.config import merge_config
from memtx_cli.errors import MemtxError
from memtx_cli.memory.bank import BankLayerMemory
from memtx_cli.memory.index import IndexSpec
from memtx_cli.memory.store import LayerMemory

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and to in memory bank token layer key value block index query".split()


def make_corpus(root: Path, n_docs: int = 4, words: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(words // 12)]
        (root / f"doc{i}.txt").write_text(f"document {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_cfg(tiny_gguf, **kw):
    base = {"model": str(tiny_gguf), "segment": 64, "dtype": "float32", "block_size": 8, "blocks": 4, "block_chunk": 16}
    base.update(kw)
    return merge_config(base)


def build(tiny_lm, tiny_gguf, corpus: Path, out: Path, capacity: int = 0, evict: str = "fifo", **kw):
    cfg = tiny_cfg(tiny_gguf, **kw)
    bank = open_or_create_bank(out, tiny_lm, cfg, capacity, evict)
    try:
        rep = ingest(tiny_lm, bank, sorted(corpus.glob("*.txt")), cfg)
    finally:
        bank.close()
    return rep, cfg


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "lock":
            h.update(p.relative_to(path).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Round trip


def test_ingest_round_trip_counts_and_verify(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c")
    rep, cfg = build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    assert len(rep.added) == 4
    with Bank.open(tmp_path / "b.idx") as b:
        info = b.info()
        assert info["documents"] == 4
        for d in b.docs.values():
            text = Path(d.path).read_text(encoding="utf-8")
            n_tok = len(tiny_lm.tokenizer.encode(text))
            assert d.tokens == n_tok and d.entries == n_tok - cfg.sinks  # sinks stay out
            assert d.sha256 == hashlib.sha256(Path(d.path).read_bytes()).hexdigest()
        assert info["entries"] == sum(d.entries for d in b.docs.values())
        assert b.check(full=True) == []
        # trimmed after the ingest: no free blocks at the end of the data files
        assert b.capacity_blocks == int(b.live_blocks.max()) + 1
        assert (tmp_path / "b.idx" / "provenance.bin").stat().st_size == b.capacity_blocks * 8 * 24
    assert verify_bank(tmp_path / "b.idx") == []


def test_bank_retrieval_equals_in_memory_retrieval(tiny_lm, tiny_gguf, tmp_path):
    """The bank's block search and gather return the same blocks, keys and values as an
    in-memory LayerMemory holding the same entries (float16 storage)."""
    corpus = make_corpus(tmp_path / "c", n_docs=1, words=600)
    _, cfg = build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    with Bank.open(tmp_path / "b.idx") as b:
        (doc,) = b.docs.values()
        layer = b.geo.layers[-1]
        bs = b.geo.block_size
        rows = np.concatenate([np.arange(x * bs, x * bs + b.blocks[x, 1]) for x in doc.blocks])
        keys = torch.from_numpy(np.asarray(b.keys(layer)[rows], np.float32)).transpose(0, 1)  # (KV, N, D)
        vals = torch.from_numpy(np.asarray(b.values(layer)[rows], np.float32)).transpose(0, 1)
        mem = LayerMemory(b.geo.n_kv, b.geo.head_dim, IndexSpec("flat"), block_size=bs)
        mem.add(keys, vals, torch.arange(keys.shape[1]))
        bm = BankLayerMemory(b, layer, torch.float32)
        torch.manual_seed(0)
        qsum = torch.randn(b.geo.n_kv, 3, b.geo.head_dim) * 5  # (KV, chunks, D)
        rel = mem.block_relevance(qsum)
        want = rel.topk(4, -1)
        scores, ids = bm.search(qsum, 4)
        local_ids = torch.tensor([doc.blocks.index(int(i)) for i in ids.reshape(-1)]).view(ids.shape)
        assert torch.equal(local_ids, want.indices)  # same blocks, same order
        torch.testing.assert_close(scores, want.values, rtol=1e-4, atol=1e-4)
        k, v, valid = bm.gather_blocks(ids)
        own = mem.gather_blocks(local_ids)
        assert torch.equal(valid.reshape(own.valid.shape), own.valid)
        torch.testing.assert_close(k.reshape(own.keys.shape), own.keys)
        torch.testing.assert_close(v.reshape(own.values.shape), own.values)


def test_score_with_bank_reads_it_and_never_modifies_it(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c")
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    before = tree_digest(tmp_path / "b.idx")
    target = corpus / "doc0.txt"
    common = ["--model", str(tiny_gguf), "--segment", "64", "--dtype", "float32", "--block-size", "8", "--json"]
    r = runner.invoke(app, ["score", str(target), "--memory", str(tmp_path / "b.idx"), *common])
    assert r.exit_code == 0, r.output
    import json

    got = json.loads(r.stdout)
    assert got["bank"]["documents"] == 4 and got["bank"]["entries"] > 0
    plain = json.loads(runner.invoke(app, ["score", str(target), *common]).stdout)
    assert got["ppl"] != plain["ppl"]  # the bank changed the attention
    # voters select the own memory's blocks; the bank is searched with their sum
    r = runner.invoke(
        app, ["score", str(target), "--memory", str(tmp_path / "b.idx"), "--set", "block-votes=4", *common]
    )
    assert r.exit_code == 0, r.output
    voted = json.loads(r.stdout)
    assert voted["memory"]["block_votes"] == 4 and math.isfinite(voted["ppl"]) and voted["ppl"] != got["ppl"]
    assert tree_digest(tmp_path / "b.idx") == before


def _stream_bank(lm, ids, cfg, bank, horizon):
    from memtx_cli.engine.stream import Streamer

    st = Streamer(lm.model, cfg, bank)
    st.horizon = horizon  # as if the trained context ended `horizon` tokens back
    with torch.no_grad():
        hs = [st.step(ids[s : s + cfg.segment]) for s in range(0, len(ids), cfg.segment)]
    return lm.model.logits(torch.cat(hs)[None])[0], st


def test_bank_tokens_are_each_querys_exact_top_k(tiny_lm, tiny_gguf, tmp_path):
    """answer-bank: a query's own top k of a bank's entries, searched within its best pages (all
    of them here: the exact top k over every valid entry), beside its own past's top k; an
    answering streamer with answer-bank reads them, one without does not."""
    from memtx_cli.engine.stream import Streamer
    from memtx_cli.memory.bank import CompositeMemory

    corpus = make_corpus(tmp_path / "c", n_docs=2)
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    with Bank.open(tmp_path / "b.idx") as b:
        layer = b.geo.layers[-1]
        mem = BankLayerMemory(b, layer, torch.float32, heads=[1])
        q = torch.randn(1, 5, b.geo.head_dim)
        got = mem.retrieve_tokens(q, 6, pages=mem.n_blocks)
        live = [(blk, n) for blk, n in ((int(i), int(b.blocks[i, 1])) for i in b.live_blocks)]
        slots = torch.tensor([blk * b.geo.block_size + j for blk, n in live for j in range(n)])
        keys = torch.from_numpy(b.keys(layer)[slots.numpy(), 1].astype("float32"))
        best = (q[0] @ keys.t()).topk(6, dim=-1).values
        torch.testing.assert_close((q[0, :, None] * got.keys[0]).sum(-1).sort(-1, descending=True).values, best)
        assert bool(got.valid.all()) and got.keys.shape == (1, 5, 6, b.geo.head_dim)
        own = LayerMemory(1, b.geo.head_dim, IndexSpec("flat"), block_size=b.geo.block_size)
        own.add(torch.randn(1, 40, b.geo.head_dim), torch.randn(1, 40, b.geo.head_dim), torch.arange(40))
        both = CompositeMemory(own, mem, 4).retrieve_every(q, 6, 40, pages=mem.n_blocks)
        assert both.keys.shape[2] == 12 and torch.equal(both.keys[:, :, 6:], got.keys)
        ids = torch.tensor(tiny_lm.tokenizer.encode("document 0 the bank")[:12])
        cfg = tiny_cfg(tiny_gguf, positions="clamped", answer_top_k=4)

        def answer(c):
            st = Streamer(tiny_lm.model, c, b, keep_all=True)
            st.answering = True
            with torch.no_grad():
                return tiny_lm.model.logits(st.feed(ids)[None])[0]

        plain, with_bank = answer(cfg), answer(dataclasses.replace(cfg, answer_bank=True))
        assert torch.isfinite(with_bank).all() and (with_bank - plain).abs().max() > 1e-4


def test_bank_with_clamped_positions_and_memory_heads(tiny_lm, tiny_gguf, tmp_path):
    """A bank read with --positions clamped: its blocks are far memories, so with everything
    past the horizon (one-token chunks) clamped equals fixed, bank included; with memory heads
    the bank is searched and gathered for those KV heads only."""
    corpus = make_corpus(tmp_path / "c")
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    ids = torch.tensor(tiny_lm.tokenizer.encode((corpus / "doc0.txt").read_text(encoding="utf-8"))[:200])
    base = dataclasses.replace(tiny_cfg(tiny_gguf), block_chunk=1, mem_distance=40, sinks=2, sink_positions="window")
    with Bank.open(tmp_path / "b.idx") as b:
        far, st = _stream_bank(tiny_lm, ids, dataclasses.replace(base, positions="clamped"), b, -1)
        assert len(st.bank_memories) > 0 and st.memory_entries > 0
        fixed, _ = _stream_bank(tiny_lm, ids, base, b, -1)
        torch.testing.assert_close(far, fixed, atol=1e-4, rtol=1e-4)
        near, _ = _stream_bank(tiny_lm, ids, dataclasses.replace(base, positions="clamped"), b, 10_000)
        assert (near - far).abs().max() > 1e-3  # the own memory moved to its real distances
        layer = b.geo.layers[-1]
        one = dataclasses.replace(base, memory_heads=f"{layer}.1")
        got, st = _stream_bank(tiny_lm, ids, one, b, -1)
        assert st.bank_memories[layer].heads == [1] and list(st.bank_memories) == [layer]
        assert torch.isfinite(got).all() and (got - fixed).abs().max() > 1e-3
        full = BankLayerMemory(b, layer, torch.float32)
        qsum = torch.randn(b.geo.n_kv, 2, b.geo.head_dim) * 5
        s_all, i_all = full.search(qsum, 3)
        s_one, i_one = st.bank_memories[layer].search(qsum[1:], 3)
        assert torch.equal(i_one[0], i_all[1])
        k_all, v_all, _ = full.gather_blocks(i_all)
        k_one, v_one, _ = st.bank_memories[layer].gather_blocks(i_one)
        assert torch.equal(k_one[0], k_all[1]) and torch.equal(v_one[0], v_all[1])
    with pytest.raises(MemtxError, match="fixed or clamped"):
        from memtx_cli.engine.stream import check_bank_settings

        with Bank.open(tmp_path / "b.idx") as b:
            check_bank_settings(b, dataclasses.replace(base, positions="true"), dict.fromkeys(b.geo.layers), b.geo.n_kv)


def test_banks_are_written_with_the_sinks_before_the_window(tiny_lm, tiny_gguf, tmp_path):
    """A bank's entries are read by other texts at the fixed distance, so with `sink-positions:
    auto` they are written as `window` writes them, not with the sinks at their real distance."""
    corpus = make_corpus(tmp_path / "c", n_docs=1, words=600)
    keys = {}
    for sp in ("auto", "window", "real"):
        build(tiny_lm, tiny_gguf, corpus, tmp_path / f"{sp}.idx", positions="clamped", sink_positions=sp)
        with Bank.open(tmp_path / f"{sp}.idx") as b:
            keys[sp] = np.asarray(b.keys(b.geo.layers[-1])[: b.entries], np.float32)
    assert np.array_equal(keys["auto"], keys["window"])
    assert np.abs(keys["auto"] - keys["real"]).max() > 1e-3


def test_a_bank_of_some_heads_stores_and_reads_those_heads_only(tiny_lm, tiny_gguf, tmp_path):
    """bank-heads: the bank stores the named memory heads only (smaller files, their entries and
    block-mean searches equal to a whole bank's), verifies and reopens; a reader's rows of other
    heads get nothing from it, and a layer it does not store reads its own memory only."""
    corpus = make_corpus(tmp_path / "c", n_docs=2)
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "all.idx")
    with Bank.open(tmp_path / "all.idx") as full:
        first, last = full.geo.layers[0], full.geo.layers[-1]
    spec = f"{first}.0,{last}.1"
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "some.idx", bank_heads=spec)
    assert verify_bank(tmp_path / "some.idx") == []
    with Bank.open(tmp_path / "all.idx") as full, Bank.open(tmp_path / "some.idx") as some:
        assert some.geo.layers == [first, last] and some.geo.pairs() == [(first, 0), (last, 1)]
        assert some.info()["stored_heads"] == 2 and some.info()["bytes_on_disk"] < full.info()["bytes_on_disk"]
        rows = np.arange(some.entries)
        for layer, h in some.geo.pairs():
            for kind in ("keys", "values"):
                mine = getattr(some, kind)(layer).gather(rows[None], [h])
                assert np.array_equal(mine, getattr(full, kind)(layer).gather(rows[None], [h]))
        q = np.random.default_rng(0).standard_normal((1, 3, full.geo.head_dim)).astype(np.float32)
        for a, b in zip(some.search_heads(last, [1], q, 4), full.search_heads(last, [1], q, 4), strict=True):
            assert np.array_equal(a, b)
        reader = BankLayerMemory(some, last, torch.float32)  # every KV head of the layer as rows
        qsum = torch.randn(some.geo.n_kv, 2, some.geo.head_dim)
        s_, ids = reader.search(qsum, 3)
        assert (ids[1] >= 0).all() and (ids[0] < 0).all() and torch.isinf(s_[0]).all()
        _, _, valid = reader.gather_blocks(ids.clamp(min=0))  # even asked for, other heads get nothing
        assert valid[1].any() and not valid[0].any()
        got = reader.retrieve_tokens(torch.randn(some.geo.n_kv, 2, some.geo.head_dim), 4)
        assert got.valid[1].all() and not got.valid[0].any()
        ids_ = torch.tensor(tiny_lm.tokenizer.encode((corpus / "doc0.txt").read_text(encoding="utf-8"))[:150])
        cfg = tiny_cfg(tiny_gguf, memory_layers=f"{first},{last}")
        with_some, st = _stream_bank(tiny_lm, ids_, cfg, some, -1)
        assert sorted(st.bank_memories) == [first, last] and torch.isfinite(with_some).all()
        other = tiny_cfg(tiny_gguf, memory_layers=f"{first},{last}", memory_heads=f"{first}.1,{last}.1")
        _, st = _stream_bank(tiny_lm, ids_, other, some, -1)
        assert list(st.bank_memories) == [last]  # layer `first` stores head 0 only: no bank there
        with pytest.raises(MemtxError, match="none of them"):
            _stream_bank(
                tiny_lm, ids_, tiny_cfg(tiny_gguf, memory_layers=str(first), memory_heads=f"{first}.1"), some, -1
            )
        from memtx_cli.engine.stream import Streamer

        answering = tiny_cfg(  # answering reads of a short prompt: the bank's tokens, no own past
            tiny_gguf, memory_layers=f"{first},{last}", positions="clamped", answer_top_k=4, answer_bank=True
        )
        st = Streamer(tiny_lm.model, answering, some, keep_all=True)
        st.answering = True
        with torch.no_grad():
            h = st.feed(ids_[:6])
        assert torch.isfinite(h).all()  # rows whose head the bank lacks read nothing, not NaN
    with pytest.raises(MemtxError, match="bank-heads"):
        build(tiny_lm, tiny_gguf, corpus, tmp_path / "none.idx", bank_heads="0.0", memory_layers=str(last))


def test_unchanged_duplicate_and_changed_documents(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=2)
    build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    with Bank.open(tmp_path / "b.idx") as b:
        gen, entries = b.manifest["generation"], b.entries
    rep, _ = build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")  # unchanged: no-op
    assert len(rep.unchanged) == 2 and not rep.added
    with Bank.open(tmp_path / "b.idx") as b:
        assert b.manifest["generation"] == gen and b.entries == entries
    shutil.copy(corpus / "doc0.txt", corpus / "copy.txt")  # identical content: an alias
    (corpus / "doc1.txt").write_text("a changed document\n" * 30, encoding="utf-8")
    rep, _ = build(tiny_lm, tiny_gguf, corpus, tmp_path / "b.idx")
    assert [Path(p).name for p in rep.aliased] == ["copy.txt"]
    assert [Path(p).name for p in rep.replaced] == ["doc1.txt"] and len(rep.added) == 1
    with Bank.open(tmp_path / "b.idx") as b:
        assert len(b.docs) == 2
        d0 = b.find_doc(str(corpus / "doc0.txt"))
        assert [Path(a).name for a in d0.aliases] == ["copy.txt"]
        assert b.check() == []


# ----------------------------------------------------------------------------------------------
# Durability


def ingest_cmd(tiny_gguf, corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "memtx_cli", "ingest", str(corpus), "--out", str(out), "--model", str(tiny_gguf),
        "--segment", "64", "--dtype", "float32", "--block-size", "8", "--quiet", "--json",
    ]  # fmt: skip


def bank_state(path: Path) -> dict:
    with Bank.open(path) as b:
        docs = {Path(d.path).name: (d.sha256, d.entries, tuple(d.blocks)) for d in b.docs.values()}
        live = b.live_blocks
        layer = b.geo.layers[0]
        bs = b.geo.block_size
        data = {int(x): np.asarray(b.keys(layer)[x * bs : (x + 1) * bs]).copy() for x in live}
        return {"docs": docs, "entries": b.entries, "live": live.tolist(), "keys": data}


def test_killed_ingest_resumes_to_the_same_bank(tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=6, words=2400)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = tmp_path / "ref.idx"
    subprocess.run(ingest_cmd(tiny_gguf, corpus, ref), check=True, env=env, capture_output=True)
    out = tmp_path / "killed.idx"
    proc = subprocess.Popen(ingest_cmd(tiny_gguf, corpus, out), env=env, stdout=subprocess.DEVNULL)
    killed_mid_doc = signal_after_documents(proc, out, 2, signal.SIGKILL)  # inside the third document
    proc.wait()
    assert killed_mid_doc, "ingest finished before it could be killed"
    assert verify_bank(out) == []  # the committed state is intact
    with Bank.open(out) as b:
        assert 2 <= len(b.docs) < 6
    subprocess.run(ingest_cmd(tiny_gguf, corpus, out), check=True, env=env, capture_output=True)
    a, b = bank_state(ref), bank_state(out)
    assert a["docs"] == b["docs"] and a["entries"] == b["entries"] and a["live"] == b["live"]
    for x in a["keys"]:
        np.testing.assert_array_equal(a["keys"][x], b["keys"][x])


DAMAGE = [
    ("manifest.yaml", "flip"),
    ("state/*/docs.json", "flip"),
    ("state/*/blocks.npy", "flip"),
    ("state/*/crc.npy", "truncate"),
    ("state/*/L2_H0.faiss", "flip"),
    ("L2.keys", "flip"),
    ("L1.values", "flip"),
    ("provenance.bin", "flip"),
    ("L2.keys", "truncate"),
]


@pytest.fixture(scope="module")
def good_bank(tiny_lm, tiny_gguf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good")
    corpus = make_corpus(root / "c", n_docs=2)
    build(tiny_lm, tiny_gguf, corpus, root / "good.idx")
    return root / "good.idx"


@pytest.mark.parametrize("pattern,how", DAMAGE)
def test_damaged_files_are_named_and_refused(good_bank, tiny_gguf, tmp_path, pattern, how):
    bank = tmp_path / "bank.idx"
    shutil.copytree(good_bank, bank)
    (target,) = list(bank.glob(pattern))
    data = bytearray(target.read_bytes())
    data_file = target.parent == bank and target.name != "manifest.yaml"
    if how == "flip" and data_file:  # every block: whichever a reader reads first is damaged
        for i in range(0, len(data), 128):
            data[i] ^= 0x5A
    elif how == "flip":
        i = len(data) // 2 if target.suffix != ".yaml" else data.index(b"entries:") + 9
        data[i] ^= 0x5A
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    problems = verify_bank(bank)
    assert problems and target.name in " ".join(problems), problems
    r = runner.invoke(app, ["bank", "verify", str(bank)])
    assert r.exit_code == 1 and target.name in r.stdout
    doc = good_bank.parent / "c" / "doc0.txt"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("segment: 64\nblock-size: 8\nblocks: 4\nblock-chunk: 16\n")
    common = ["--memory", str(bank), "--model", str(tiny_gguf), "--config", str(cfg)]
    # Opening checks the structure and state; a block's crc is checked when it is first read
    # (score reads keys and values, ask also the provenance of its sources).
    cmd = ["ask", "hello", *common, "--max-tokens", "2"] if target.name == "provenance.bin" else ["score", str(doc)]
    r = runner.invoke(app, [*cmd, *common] if cmd[0] == "score" else cmd)
    assert r.exit_code == 1 and "damaged" in r.stderr and target.name in r.stderr, r.stderr
    assert "Traceback" not in r.output


def test_bank_of_another_model_is_refused(good_bank, tmp_path):
    args, state = make_tiny()
    state = {k: v * 1.01 for k, v in state.items()}  # other weights, same architecture
    other = tmp_path / "other.gguf"
    write_gguf(other, args, state)
    doc = good_bank.parent / "c" / "doc0.txt"
    r = runner.invoke(app, ["score", str(doc), "--memory", str(good_bank), "--model", str(other), "--segment", "64"])
    assert r.exit_code == 1 and "was built with model" in r.stderr


def test_second_writer_is_locked_out(good_bank, tmp_path):
    bank = tmp_path / "b.idx"
    shutil.copytree(good_bank, bank)
    with Bank.open(bank, writer=True):
        with pytest.raises(MemtxError, match="being written by another"):
            Bank.open(bank, writer=True)
        Bank.open(bank).close()  # readers are not blocked


# ----------------------------------------------------------------------------------------------
# Capacity and eviction: ids stay aligned with data through many wrap-arounds


def synthetic_bank(path: Path, capacity: int, policy: str) -> Bank:
    geo = Geometry(layers=[0], n_kv=1, head_dim=4, block_size=4)
    model = {"name": "synthetic", "weights_fingerprint": "w", "tokenizer_fingerprint": "t"}
    return Bank.create(path, model, geo, {"positions": "fixed"}, {"capacity": capacity, "policy": policy, "seed": 1})


@pytest.mark.parametrize("policy", ["fifo", "lru", "reservoir"])
def test_eviction_keeps_ids_aligned_with_values(tmp_path, policy):
    bank = synthetic_bank(tmp_path / "b.idx", capacity=40, policy=policy)
    rng = np.random.default_rng(0)
    truth: dict[int, tuple[int, int]] = {}  # doc id -> n entries written
    for d in range(60):  # ~6 docs fit: dozens of wrap-arounds
        n = int(rng.integers(1, 15))
        blocks, valid = [], []
        for s in range(0, n, 4):
            t = min(4, n - s)
            offs = np.arange(s, s + t)
            # every number encodes (document, offset): misalignment cannot go unnoticed
            k = (d * 1000 + offs)[:, None, None] + np.zeros((t, 1, 4))
            (b,) = bank.allocate(1, set(blocks))
            prov = np.stack([np.full(t, d), offs, offs * 10], 1)
            bank.write_blocks([b], {0: (k.astype(np.float16) / 64, (k + 0.5).astype(np.float16) / 64)}, prov)
            blocks.append(b)
            valid.append(t)
        bank.attach_blocks(d, blocks, valid)
        bank.add_document(DocRecord(d, f"doc{d}", f"sha{d}", n, n, n, n, blocks, "now"))
        if policy == "lru" and d % 3 == 0 and len(bank.live_blocks):
            bank.touch([int(bank.live_blocks[0])])
        bank.evict_to_capacity(protect=set(blocks))
        bank.commit()
        truth[d] = n
        assert bank.entries <= 40 + 3  # capacity in whole blocks
        live = bank.live_blocks
        prov = bank.provenance()
        keys, vals = bank.keys(0), bank.values(0)
        for b in live:
            nv = int(bank.blocks[b, 1])
            rows = slice(b * 4, b * 4 + nv)
            doc, offs = prov[rows, 0], prov[rows, 1]
            assert (doc == bank.blocks[b, 0]).all()
            np.testing.assert_allclose(keys[rows][:, 0, 0] * 64, doc * 1000 + offs, rtol=1e-3)
            np.testing.assert_allclose(vals[rows][:, 0, 0] * 64, doc * 1000 + offs + 0.5, rtol=1e-3)
        # the FAISS index holds exactly the live blocks, each with its own block mean
        idx = bank.indexes[(0, 0)]
        for b in live:
            rep = idx.reconstruct(int(b))
            nv = int(bank.blocks[b, 1])
            np.testing.assert_allclose(rep, keys[b * 4 : b * 4 + nv, 0].astype(np.float32).mean(0), rtol=1e-5)
        assert bank.check(full=True) == []
    bank.close()
    if policy == "fifo":  # the newest documents survive
        with Bank.open(tmp_path / "b.idx") as b:
            assert max(b.docs) == 59 and min(b.docs) > 40


# ----------------------------------------------------------------------------------------------
# Management


def test_bank_rm_merge_and_info(tiny_lm, tiny_gguf, tmp_path):
    c1 = make_corpus(tmp_path / "c1", n_docs=2, seed=1)
    c2 = make_corpus(tmp_path / "c2", n_docs=3, seed=2)
    shutil.copy(c1 / "doc0.txt", c2 / "same.txt")  # in both banks
    build(tiny_lm, tiny_gguf, c1, tmp_path / "a.idx")
    build(tiny_lm, tiny_gguf, c2, tmp_path / "b.idx")
    rep = merge_banks([tmp_path / "a.idx", tmp_path / "b.idx"], tmp_path / "m.idx")
    assert rep["documents"] == 5  # 2 + 4 - 1 duplicate
    assert verify_bank(tmp_path / "m.idx") == []
    r = runner.invoke(app, ["bank", "info", str(tmp_path / "m.idx"), "--json"])
    import json

    info = json.loads(r.stdout)
    assert info["documents"] == 5 and info["bytes_per_token"] > 0
    with Bank.open(tmp_path / "a.idx") as a, Bank.open(tmp_path / "b.idx") as b:
        assert info["entries"] == a.entries + b.entries - a.find_doc(str(c1 / "doc0.txt")).entries
    r = runner.invoke(app, ["bank", "rm", str(tmp_path / "m.idx"), str(c2 / "doc1.txt")])
    assert r.exit_code == 0, r.output
    info2 = json.loads(runner.invoke(app, ["bank", "info", str(tmp_path / "m.idx"), "--json"]).stdout)
    assert info2["documents"] == 4 and info2["entries"] < info["entries"]
    assert verify_bank(tmp_path / "m.idx") == []
    r = runner.invoke(app, ["bank", "rm", str(tmp_path / "m.idx"), "nope.txt"])
    assert r.exit_code == 1 and "no document" in r.stderr


# ----------------------------------------------------------------------------------------------
# Bad input: a clear line each, and the bank stays intact


def test_bad_ingest_input_leaves_the_bank_intact(good_bank, tiny_gguf, tmp_path):
    bank = tmp_path / "b.idx"
    shutil.copytree(good_bank, bank)
    before = tree_digest(bank)
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    base = ["ingest", "--out", str(bank), "--model", str(tiny_gguf), "--segment", "64", "--block-size", "8"]
    cases = [
        ([str(tmp_path / "missing.txt")], "no such file"),
        ([str(tmp_path / "empty")], "no files to ingest"),
        ([str(bank)], "is the output bank"),
        ([str(bank / "L1.keys")], "is the output bank"),
        ([str(tmp_path / "loop")], "symlink loop"),
    ]
    for paths, needle in cases:
        r = runner.invoke(app, [*base[:1], *paths, *base[1:]])
        assert r.exit_code == 1 and needle in r.stderr, (paths, r.output)
        assert len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(bank) == before
    assert verify_bank(bank) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(good_bank, tiny_gguf, tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("hidden text\n")
    f.chmod(0)
    r = runner.invoke(app, ["ingest", str(f), "--out", str(tmp_path / "x.idx"), "--model", str(tiny_gguf)])
    assert r.exit_code == 1 and "permission denied" in r.stderr


def test_directory_walk_skips_binary_and_gitignored(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=2)
    (corpus / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (corpus / ".gitignore").write_text("ignored*.txt\nbuild/\n")
    (corpus / "ignored1.txt").write_text("should not be read\n")
    (corpus / "build").mkdir()
    (corpus / "build" / "out.txt").write_text("build output\n")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "note.md").write_text("a note in markdown\n" * 5)
    r = runner.invoke(
        app,
        ["ingest", str(corpus), "--out", str(tmp_path / "b.idx"), "--model", str(tiny_gguf), "--segment", "64",
         "--block-size", "8", "--exclude", "*.md", "-v", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    import json

    got = json.loads(r.stdout)
    assert got["added"] == 3  # doc0, doc1, .gitignore itself is text
    reasons = {Path(s["path"]).name: s["reason"] for s in got["skipped"]}
    assert reasons["blob.bin"] == "binary" and reasons["ignored1.txt"] == "gitignored"
    assert reasons["note.md"] == "excluded" and "out.txt" not in reasons  # build/ never entered
    assert "skipped" in r.stderr


def test_ingest_paths_from_stdin(tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=3)
    listing = "\n".join(str(p) for p in sorted(corpus.glob("doc[01].txt"))) + "\n"
    r = runner.invoke(
        app,
        ["ingest", "-", "--out", str(tmp_path / "b.idx"), "--model", str(tiny_gguf), "--segment", "64",
         "--block-size", "8", "--json"],
        input=listing,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with Bank.open(tmp_path / "b.idx") as b:
        assert sorted(Path(d.path).name for d in b.docs.values()) == ["doc0.txt", "doc1.txt"]


def test_config_dataclass_round_trip_in_manifest(good_bank):
    with Bank.open(good_bank) as b:
        cfg = merge_config(b.manifest["config"])
        assert dataclasses.asdict(cfg) == b.manifest["config"]


def test_int8_precision_halves_the_bytes_and_decodes_close(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=2)
    cfg = tiny_cfg(tiny_gguf)
    banks = {}
    for prec in ("float16", "int8"):
        bank = open_or_create_bank(tmp_path / f"{prec}.idx", tiny_lm, cfg, 0, "fifo", precision=prec)
        ingest(tiny_lm, bank, sorted(corpus.glob("*.txt")), cfg)
        bank.close()
        banks[prec] = Bank.open(tmp_path / f"{prec}.idx")
    f16, i8 = banks["float16"], banks["int8"]
    layer = f16.geo.layers[0]
    assert i8.precision == "int8" and verify_bank(tmp_path / "int8.idx") == []
    ratio = (tmp_path / "int8.idx" / f"L{layer}.keys").stat().st_size / (
        tmp_path / "float16.idx" / f"L{layer}.keys"
    ).stat().st_size
    assert ratio == pytest.approx((64 / 4 + 2) / (2 * 64 / 4), rel=1e-6)  # (D + 2) / 2D, D = 16
    live = f16.live_blocks
    a = np.asarray(f16.keys(layer)[: len(live) * 8], np.float32)
    b = np.asarray(i8.keys(layer)[: len(live) * 8], np.float32)
    err = np.abs(a - b).max(-1) / (np.abs(a).max(-1) + 1e-6)
    assert err.max() < 1 / 127 + 1e-2  # within one quantisation step of each row's absmax
    r = runner.invoke(
        app,
        ["score", str(corpus / "doc0.txt"), "--memory", str(tmp_path / "int8.idx"), "--model", str(tiny_gguf),
         "--segment", "64", "--block-size", "8", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for b_ in banks.values():
        b_.close()


def test_freed_blocks_are_not_reused_while_a_reader_is_open(tmp_path):
    bank = synthetic_bank(tmp_path / "b.idx", capacity=0, policy="fifo")
    k = np.ones((4, 1, 4), np.float16)
    prov = np.zeros((4, 3), np.int64)
    (b0,) = bank.allocate(1, set())
    bank.write_blocks([b0], {0: (k, k)}, prov)
    bank.attach_blocks(0, [b0], [4])
    bank.add_document(DocRecord(0, "a", "sha-a", 4, 4, 4, 4, [b0], "now"))
    bank.commit()
    reader = Bank.open(tmp_path / "b.idx")  # sees document 0 in block b0
    bank.remove_document(0)
    bank.commit()
    assert bank.allocate(1, set()) != [b0]  # a reader may still read b0: append instead
    reader.close()
    assert bank.allocate(1, set()) == [b0]
    bank.close()


def test_ingest_keeps_the_layers_with_memory_heads(tiny_lm, tiny_gguf, tmp_path):
    """With --memory-heads, a bank holds the layers that have a memory head (every KV head of
    them); clamped positions are accepted (bank blocks are read at the fixed distance)."""
    corpus = make_corpus(tmp_path / "c", n_docs=1)
    last = tiny_lm.args.n_layers - 1
    build(
        tiny_lm,
        tiny_gguf,
        corpus,
        tmp_path / "h.idx",
        memory_layers="all",
        memory_heads=f"{last}.0",
        positions="clamped",
    )
    with Bank.open(tmp_path / "h.idx") as b:
        assert b.geo.layers == [last] and b.geo.n_kv == tiny_lm.args.n_kv_heads
    with pytest.raises(MemtxError, match="fixed or clamped"):
        build(tiny_lm, tiny_gguf, corpus, tmp_path / "t.idx", positions="true")


def test_a_reader_checks_each_block_when_it_first_reads_it(good_bank, tmp_path):
    bank = tmp_path / "bank.idx"
    shutil.copytree(good_bank, bank)
    with Bank.open(bank, verify=False) as b:
        live, rb = b.live_blocks, b._block_bytes("L2.keys")
    bad, good = int(live[-1]), int(live[0])
    data = bytearray((bank / "L2.keys").read_bytes())
    data[bad * rb + 5] ^= 0x5A
    (bank / "L2.keys").write_bytes(bytes(data))
    with Bank.open(bank, verify=False) as b:  # opening reads no block
        mem = BankLayerMemory(b, 2, torch.float32)
        keys, _, valid = mem.gather_blocks(torch.tensor([[[good]]]).expand(b.geo.n_kv, 1, 1))
        assert valid.any() and b._verified[good].sum() == 2 and not b._verified[bad].any()
        with pytest.raises(MemtxError, match=rf"L2.keys is damaged \(checksum mismatch in block {bad}\)"):
            mem.gather_blocks(torch.tensor([[[good, bad]]]).expand(b.geo.n_kv, 1, 2))
        k2, _, _ = mem.gather_blocks(torch.tensor([[[good]]]).expand(b.geo.n_kv, 1, 1))  # checked once, still read
        assert torch.equal(keys, k2)
    with pytest.raises(MemtxError, match="L2.keys is damaged"):
        Bank.open(bank, verify=True)


def test_rows_written_in_runs_equal_rows_written_block_by_block(tmp_path):
    """write_blocks (one write per run of consecutive blocks) stores the same bytes and crcs
    as writing one block at a time, across runs, gaps and a padded last block."""
    rng = np.random.default_rng(3)
    n = 4 * 6 + 3  # seven blocks of 4, the last one 3 rows
    k = rng.standard_normal((n, 1, 4)).astype(np.float16)
    v = rng.standard_normal((n, 1, 4)).astype(np.float16)
    prov = np.stack([np.zeros(n), np.arange(n), np.arange(n) * 7], 1).astype(np.int64)
    blocks = [0, 1, 2, 5, 6, 9, 10]  # three runs
    banks = {}
    for how in ("runs", "single"):
        bank = synthetic_bank(tmp_path / f"{how}.idx", capacity=0, policy="fifo")
        bank._grow(12)
        if how == "runs":
            bank.write_blocks(blocks, {0: (k, v)}, prov)
        else:
            for j, b in enumerate(blocks):
                rows = slice(4 * j, 4 * j + 4)
                bank.write_blocks([b], {0: (k[rows], v[rows])}, prov[rows])
        bank.attach_blocks(0, blocks, [4] * 6 + [3])
        bank.add_document(DocRecord(0, "a", "sha-a", n, n, n, n, blocks, "now"))
        bank.commit()
        banks[how] = bank
    a, b = banks["runs"], banks["single"]
    assert np.array_equal(a.crc, b.crc) and a.crc[blocks].all()
    for x, y in ((a.keys(0).mm, b.keys(0).mm), (a.values(0).mm, b.values(0).mm), (a.provenance(), b.provenance())):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(a.keys(0)[[20, 21, 22, 36, 37, 38]], k[[12, 13, 14, 20, 21, 22]])
    assert (np.asarray(a.provenance())[43] == -1).all()  # the last block's padding row
    with pytest.raises(ValueError):
        a.write_blocks([0, 1], {0: (k, v)}, prov)  # 27 rows need 7 blocks
    for bank in banks.values():
        bank.close()
