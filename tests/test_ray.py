"""Ingest on a local Ray cluster (two worker actors on the local host): the bank equals a
single-process ingest's, and a worker killed mid-run loses and doubles nothing."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from test_bank import make_corpus

from memtx_cli.bank.ingest import ingest_files, open_or_create_bank
from memtx_cli.bank.ray_ingest import ingest_on_ray, shard_root
from memtx_cli.bank.store import Bank
from memtx_cli.engine.session import load_for, resolve_settings

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def flags_for(tiny_gguf) -> dict:
    return {"model": str(tiny_gguf), "segment": 64, "block_size": 8, "dtype": "float32", "threads": 1}


def by_path(path) -> dict:
    """Per document: tokens, entries, and its keys and values (all layers, valid rows) as bytes."""
    out = {}
    with Bank.open(path) as b:
        bs = b.geo.block_size
        for d in b.docs.values():
            rows = np.concatenate([np.arange(x * bs, x * bs + b.blocks[x, 1]) for x in d.blocks])
            kv = b"".join(np.asarray(f(ly)[rows]).tobytes() for ly in b.geo.layers for f in (b.keys, b.values))
            out[d.path] = (d.tokens, d.entries, kv, np.asarray(b.words_array()[rows]).tobytes())
    return out


def test_ray_ingest_equals_a_local_one(cluster, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=4)
    flags = flags_for(tiny_gguf)
    local, _ = ingest_files([str(corpus)], tmp_path / "local.idx", flags)
    rep, info = ingest_files([str(corpus)], tmp_path / "ray.idx", flags, ray="local", workers=2)
    assert sorted(rep.added) == sorted(local.added) and len(rep.added) == 4
    assert by_path(tmp_path / "ray.idx") == by_path(tmp_path / "local.idx")
    assert not shard_root(tmp_path / "ray.idx").exists()
    again, _ = ingest_files([str(corpus)], tmp_path / "ray.idx", flags, ray="local", workers=2)
    assert again.added == [] and len(again.unchanged) == 4


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(cluster, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=6, words=600)
    flags = flags_for(tiny_gguf)
    ingest_files([str(corpus)], tmp_path / "local.idx", flags)
    cfg, _ = resolve_settings(flags)
    lm = load_for(cfg)
    pids: list[int] = []
    killed: list[int] = []

    def progress(e: dict) -> None:
        if e["event"] == "workers":
            pids.extend(e["pids"])
        elif e["event"] == "document" and not killed:
            os.kill(pids[1], signal.SIGKILL)  # the other worker, in the middle of its document
            killed.append(pids[1])

    out = tmp_path / "ray.idx"
    got = ingest_on_ray(
        "local",
        sorted(corpus.glob("*.txt")),
        out,
        flags,
        None,
        None,
        2,
        lambda: open_or_create_bank(out, lm, cfg, 0, "fifo"),
        progress=progress,
    )
    assert killed and len(got["added"]) == 6
    assert by_path(out) == by_path(tmp_path / "local.idx")
    with Bank.open(out) as b:
        assert b.check(full=True) == [] and len(b.docs) == 6
