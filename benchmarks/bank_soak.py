"""Soak: one writer ingests, replaces and removes documents for N minutes while readers run
`memtx score --memory` and `memtx bank verify` against the same bank in loops.

Checks: no reader ever fails (damage, a missing state file, a traceback); the bank's bytes on
disk stay within 1.5x of what its live entries need (their blocks + one state + the reserve);
at the end, documents and entries (and every document's keys) equal a clean ingest of the same
final documents.

    python benchmarks/bank_soak.py --minutes 10 --out benchmarks/results/bank_soak.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _meta import REPO, run_metadata

from memtx_cli.bank.ingest import ingest, open_or_create_bank
from memtx_cli.bank.ops import remove_documents
from memtx_cli.bank.store import Bank
from memtx_cli.config import merge_config
from memtx_cli.model.cards import resolve_model
from memtx_cli.model.loading import load_model

CORPUS = [REPO / "sample_docs", REPO.parent / "shared" / "corpus"]
SLICE_CHARS = 2500  # ~700 tokens per document: many documents, many commits


def doc_pool(root: Path, n: int, seed: int) -> list[Path]:
    """n documents cut from the corpus (real text), one file each."""
    texts = sorted(p for c in CORPUS if c.is_dir() for p in c.rglob("*") if p.suffix in (".txt", ".c", ".py", ".js"))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.choice(texts).read_text(encoding="utf-8", errors="replace")
        a = rng.randrange(max(1, len(t) - SLICE_CHARS))
        p = root / f"doc{i:03d}.txt"
        p.write_text(t[a : a + SLICE_CHARS], encoding="utf-8")
        out.append(p)
    return out


def pool_workdir(prefix: str, docs: int, seed: int) -> tuple[Path, list[Path]]:
    """A fresh working directory with a pool of `docs` documents in pool/."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "pool").mkdir()
    return work, doc_pool(work / "pool", docs, seed)


def bank_bytes(path: Path) -> tuple[int, int]:
    """(bytes on disk, bytes the live entries need: their blocks + current state + reserve)."""
    disk = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                disk += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    with Bank.open(path, verify=False) as b:
        per_block = sum(b._block_bytes(n) for n in b.data_files)
        state = sum(os.lstat(p).st_size for p in b.state_dir().iterdir())
        need = len(b.live_blocks) * per_block + 2 * state + (1 << 20)
    return disk, need


def summary(path: Path) -> dict:
    with Bank.open(path) as b:
        bs = b.geo.block_size
        docs = {}
        for d in b.docs.values():
            h = hashlib.sha256()
            for blk in d.blocks:
                n = int(b.blocks[blk, 1])
                for layer in b.geo.layers:
                    h.update(b.keys(layer)[blk * bs : blk * bs + n].tobytes())
            docs[d.path] = {"sha256": d.sha256, "entries": d.entries, "keys": h.hexdigest()}
        return {"documents": len(b.docs), "entries": b.entries, "docs": docs}


def reader_loop(cmd: list[str], stop: threading.Event, log: list) -> None:
    while not stop.is_set():
        r = subprocess.run(cmd, capture_output=True, text=True)
        log.append({"rc": r.returncode, "err": r.stderr.strip()[-400:] if r.returncode else ""})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--docs", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    meta = run_metadata()  # at the start: the code that runs is the code of this commit
    work, pool = pool_workdir("memtx-soak-", a.docs, a.seed)
    bank_path = work / "soak.idx"
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    cfg = merge_config(resolve_model("smollm2-135m").card.settings)  # the defaults `memtx ingest` uses
    bank = open_or_create_bank(bank_path, lm, cfg, 0, "fifo")
    ingest(lm, bank, pool[:2], cfg)
    stop, logs = threading.Event(), {"score": [], "verify": []}
    memtx = [sys.executable, "-m", "memtx_cli"]
    readers = [
        threading.Thread(
            target=reader_loop,
            args=(memtx + ["score", str(pool[0]), "--memory", str(bank_path), "--json", "-q"], stop, logs["score"]),
        ),
        threading.Thread(target=reader_loop, args=(memtx + ["bank", "verify", str(bank_path)], stop, logs["verify"])),
    ]
    for t in readers:
        t.start()
    rng = random.Random(a.seed)
    live: list[Path] = list(pool[:2])
    nxt, ratios, steps, t0 = 2, [], 0, time.time()
    try:
        while time.time() - t0 < 60 * a.minutes and nxt < len(pool):
            add = pool[nxt : nxt + 3]
            nxt += len(add)
            ingest(lm, bank, add, cfg)  # commits after each document
            live += add
            if len(live) > 6:  # remove two, and now and then change one (replaced on re-ingest)
                gone = rng.sample(live, 2)
                remove_documents(bank, [str(p) for p in gone])
                live = [p for p in live if p not in gone]
                changed = rng.choice(live)
                changed.write_text(changed.read_text() + f"\nrevision {steps}\n")
                ingest(lm, bank, [changed], cfg)
            disk, need = bank_bytes(bank_path)
            ratios.append(disk / need)
            steps += 1
            print(f"{time.time() - t0:6.0f} s  docs {len(live):3d}  bytes {disk:,} / need {need:,} = {disk / need:.2f}")
    finally:
        stop.set()
        for t in readers:
            t.join()
        bank.close()
    soak = summary(bank_path)
    clean_path = work / "clean.idx"
    clean = open_or_create_bank(clean_path, lm, cfg, 0, "fifo")
    ingest(lm, clean, sorted(live), cfg)
    clean.close()
    ref = summary(clean_path)
    fails = {k: [x for x in v if x["rc"] != 0] for k, v in logs.items()}
    result = {
        **meta,
        "minutes": (time.time() - t0) / 60,
        "writer_steps": steps,
        "documents_ingested": nxt,
        "reader_runs": {k: len(v) for k, v in logs.items()},
        "reader_failures": {k: len(v) for k, v in fails.items()},
        "reader_failure_examples": {k: v[:3] for k, v in fails.items()},
        "bytes_over_need_max": max(ratios) if ratios else None,
        "bytes_over_need_last": ratios[-1] if ratios else None,
        "final": {"documents": soak["documents"], "entries": soak["entries"]},
        "clean": {"documents": ref["documents"], "entries": ref["entries"]},
        "equal_to_clean": soak == ref,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "reader_failure_examples"}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
