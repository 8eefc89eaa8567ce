"""A driver killed in the middle of `memtx ingest --ray` (with its Ray processes, as when its
machine dies): the rerun finishes the job, and the bank equals a single-process ingest's. Its own
module: the driver starts its own local cluster, so no other may be running in this process."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import ENV, MEMTX, signal_after_documents
from test_bank import make_corpus
from test_ray import by_path, flags_for

from memtx_cli.bank.ingest import ingest_files
from memtx_cli.bank.ray_ingest import shard_root
from memtx_cli.bank.store import Bank

pytest.importorskip("ray")


def test_a_killed_driver_is_finished_by_a_rerun(tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=8, words=2400)
    ingest_files([str(corpus)], tmp_path / "local.idx", flags_for(tiny_gguf))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("segment: 64\nblock-size: 8\ndtype: float32\n")
    out = tmp_path / "ray.idx"
    cmd = [*MEMTX, "ingest", str(corpus), "--out", str(out), "--model", str(tiny_gguf), "--config", str(cfg),
           "--threads", "1", "--ray", "local", "--workers", "2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hit = signal_after_documents(proc, out, 2, signal.SIGKILL, timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's Ray processes go with it
        except ProcessLookupError:
            pass
        proc.wait()
    assert hit, "the ingest finished before it could be killed"
    with Bank.open(out) as b:
        assert 2 <= len(b.docs) < 8 and b.check(full=True) == []
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert by_path(out) == by_path(tmp_path / "local.idx")
    assert not shard_root(out).exists()
