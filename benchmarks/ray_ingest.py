"""Ingest with 1 and 2 Ray workers against a local ingest, on the same documents.

    python benchmarks/ray_ingest.py --out benchmarks/results/ray_ingest.json

Each configuration runs in its own process (its own Ray cluster on the local host, started with
as many CPUs as its workers take): local (no Ray, --threads 2), Ray with 1 worker of 1 and of 2
threads, Ray with 2 workers of 1 thread. Reported per run: tokens/s end to end, the time until
the workers were ready (actors started, model loaded: the per-worker overhead), the driver's
time copying shard documents into the bank, and each worker's own tokens/s while streaming.
The scaling model in docs/banks.md is fitted on these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import REPO, emit, run_metadata  # noqa: E402

RUNS = {  # name: (workers, threads per worker); workers 0 = a local ingest without Ray
    "local-2t": (0, 2),
    "ray-1w-1t": (1, 1),
    "ray-1w-2t": (1, 2),
    "ray-2w-1t": (2, 1),
}


def one(name: str, docs: str, work: Path) -> dict:
    from memtx_cli.bank.corpus import select_files
    from memtx_cli.bank.ingest import ingest_files, open_or_create_bank
    from memtx_cli.bank.ray_ingest import ingest_on_ray
    from memtx_cli.engine.session import load_for, resolve_settings

    workers, threads = RUNS[name]
    flags = {"threads": threads}
    out = work / f"{name}.idx"
    t0 = time.perf_counter()
    if workers == 0:
        rep, info = ingest_files([docs], out, flags)
        return {"run": name, "tokens": rep.tokens, "seconds": time.perf_counter() - t0, "entries": info["entries"]}
    cfg, _ = resolve_settings(flags)
    lm = load_for(cfg)
    sel = select_files([docs], None, None, out, False)
    got = ingest_on_ray(
        "local", sel.files, out, flags, None, None, workers, lambda: open_or_create_bank(out, lm, cfg, 0, "fifo")
    )
    per_worker = {str(pid): s for pid, s in got.get("worker_seconds", {}).items()}
    return {
        "run": name,
        "tokens": got["tokens"],
        "seconds": time.perf_counter() - t0,
        "entries": got["info"]["entries"],
        "ready_seconds": got.get("ready_seconds"),
        "copy_seconds": got.get("copy_seconds"),
        "worker_busy_seconds": per_worker,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default=str(REPO / "sample_docs"))
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.docs, a.work)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.runs.split(","):
            cmd = [sys.executable, __file__, "--one", name, "--docs", a.docs, "--work", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            busy = row.get("worker_busy_seconds") or {}
            if busy:
                row["worker_tokens_per_s"] = row["tokens"] / sum(busy.values())
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    res = {"meta": run_metadata(), "docs": a.docs, "rows": rows}
    emit(res, a.out)


if __name__ == "__main__":
    main()
