"""Metadata every results file carries: command, date, commit, CPU."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"  # the long documents benchmarks read (beside the checkout)


def run_metadata() -> dict:
    from memtx_cli.tasks.runinfo import run_info

    return run_info(["python", *sys.argv])


def emit(res: dict, out: Path | None, accumulate: bool = False) -> None:
    """Print a results object and write it to `out` (if given). accumulate: the runs already
    in `out` are kept, the new one appended (each carries its own metadata)."""
    import json

    if accumulate and out is not None and out.exists():
        old = json.loads(out.read_text())
        res = {"runs": old.get("runs", [old]) + [res]}
    text = json.dumps(res, indent=1)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


def per_pass(fn, rounds: int = 5, n: int = 10) -> float:
    """Median seconds of one call of fn, over `rounds` rounds of `n` calls, after a warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)
