"""Crash durability of banks with the default model: `memtx ingest` killed with SIGKILL at random
moments, killed in the middle of a commit, and run out of disk space; after each, the bank must
verify, and a rerun must reach the documents, entries and keys of a clean ingest.

    python benchmarks/bank_kills.py --out benchmarks/results/bank_kills.json

The full-disk part mounts tmpfs file systems of a few tens of MB (root, or a user namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _meta import REPO, run_metadata
from bank_soak import pool_workdir, summary

from memtx_cli.bank.ops import verify_bank

MEMTX = [sys.executable, "-m", "memtx_cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def ingest(pool: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*MEMTX, "ingest", str(pool), "--out", str(out), "-q"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(pool: Path, out: Path) -> dict:
    p = ingest(pool, out)
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"rerun failed: {err.decode()[-500:]}")
    return summary(out)


def random_kills(pool: Path, work: Path, n: int, rng: random.Random, ref: dict) -> dict:
    """n SIGKILLs at random moments of ingests of one bank, each resumed by the next run."""
    out, kills, problems, rounds = work / "random.idx", 0, [], 0
    while kills < n:
        p = ingest(pool, out)
        time.sleep(rng.uniform(2.0, 9.0))  # the model loads in ~2-3 s: most kills land in streaming
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if out.exists():
            problems += [f"kill {kills}: {x}" for x in verify_bank(out)]
        if p.returncode == 0:  # it finished: start over with a new bank, so later kills land too
            rounds += 1
            ok = summary(out) == ref
            problems += [] if ok else [f"round {rounds}: completed bank differs from the clean one"]
            os.rename(out, work / f"random-done-{rounds}.idx")
    done = finish(pool, out)
    return {"kills": kills, "completed_rounds": rounds, "problems": problems, "equal_to_clean": done == ref}


def commit_kills(pool: Path, work: Path, n: int, ref: dict) -> dict:
    """n SIGKILLs while a commit is writing its new state (a new state directory exists, the
    manifest does not name it yet)."""
    import yaml

    out, mid, after, problems = work / "commit.idx", 0, 0, []
    while mid < n:
        p = ingest(pool, out)
        seen = set(os.listdir(out / "state")) if (out / "state").is_dir() else set()
        killed_at = None
        while p.poll() is None and killed_at is None:
            try:
                now = set(os.listdir(out / "state"))
            except FileNotFoundError:
                continue
            new = now - seen
            if new and seen:
                p.send_signal(signal.SIGKILL)
                killed_at = max(int(x) for x in new if x.isdigit())
            seen = now or seen
        p.wait()
        if killed_at is None:
            if p.returncode == 0:
                os.rename(out, work / f"commit-done-{time.time_ns()}.idx")
            continue
        gen = yaml.safe_load((out / "manifest.yaml").read_text())["generation"]
        if gen < killed_at:
            mid += 1
        else:
            after += 1
        problems += [f"commit kill {mid}: {x}" for x in verify_bank(out)]
    done = finish(pool, out)
    return {
        "mid_commit_kills": mid,
        "kills_after_the_switch": after,
        "problems": problems,
        "equal_to_clean": done == ref,
    }


def full_disks(pool: Path, work: Path, sizes_mb: list[int], ref: dict) -> dict:
    """Ingest onto a tmpfs of each size until the disk is full, verify, give it room, rerun."""
    runs, problems = [], []
    for mb in sizes_mb:
        mnt = work / f"fs{mb}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(mnt)], check=True)
        try:
            out = mnt / "b.idx"
            p = ingest(pool, out)
            _, err = p.communicate()
            lines = err.decode().strip().splitlines()
            clean_error = p.returncode == 0 or (
                p.returncode == 1 and len(lines) == 1 and lines[0].startswith("memtx: error: no space left")
            )
            ok = verify_bank(out) if out.exists() else []
            subprocess.run(["mount", "-o", "remount,size=2g", str(mnt)], check=True)
            equal = finish(pool, out) == ref
            runs.append({"size_mb": mb, "exit": p.returncode, "stderr": lines[-1:] if lines else [], "equal": equal})
            problems += [f"{mb} MB: {x}" for x in ok]
            if not clean_error:
                problems.append(f"{mb} MB: exit {p.returncode}, {lines[-3:]}")
            if not equal:
                problems.append(f"{mb} MB: rerun differs from the clean bank")
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    return {"runs": runs, "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--commit-kills", type=int, default=10)
    ap.add_argument("--disk-sizes", default="12,16,20,24,28,32,40,48,56,64")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    meta = run_metadata()  # at the start: the code that runs is the code of this commit
    work, _ = pool_workdir("memtx-kills-", a.docs, a.seed)
    t0 = time.time()
    ref = finish(work / "pool", work / "clean.idx")
    print(f"clean: {ref['documents']} documents, {ref['entries']:,} entries ({time.time() - t0:.0f} s)", flush=True)
    res = {**meta, "documents": ref["documents"], "entries": ref["entries"]}
    res["random_kills"] = random_kills(work / "pool", work, a.kills, random.Random(a.seed), ref)
    print(json.dumps(res["random_kills"]), flush=True)
    res["commit_kills"] = commit_kills(work / "pool", work, a.commit_kills, ref)
    print(json.dumps(res["commit_kills"]), flush=True)
    res["full_disk"] = full_disks(work / "pool", work, [int(x) for x in a.disk_sizes.split(",")], ref)
    print(json.dumps(res["full_disk"]), flush=True)
    res["seconds"] = time.time() - t0
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
