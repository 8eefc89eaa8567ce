"""Speed A/B of two checkouts of memtx, runs interleaved (A B, B A, ...) so drift hits both.

    python benchmarks/ab_speed.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 3] [--out results/speed_ab.json]

Cases: `memtx score` with the defaults at 8K and 64K tokens of the Lua interpreter's sources
(../shared/corpus), and `memtx ingest sample_docs`. Each run is a fresh process; the figure is
its own tokens/s (model time: loading excluded). Reports the median per case and checkout and
new / old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _meta import CORPUS, REPO, run_metadata

DOC = CORPUS / "code" / "lua54_interpreter_repo.c.txt"


def run(checkout: Path, case: str) -> float:
    """tokens/s of one run of `case` with the code of `checkout`."""
    py = [sys.executable, "-m", "memtx_cli"]
    with tempfile.TemporaryDirectory() as tmp:
        if case == "ingest":
            args = ["ingest", "sample_docs", "--out", str(Path(tmp) / "b.idx")]
        else:
            args = ["score", str(DOC), "--max-tokens", str(int(case.split()[1]))]
        r = subprocess.run([*py, *args, "--json", "-q"], cwd=checkout, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{checkout}: memtx {' '.join(args)} failed: {r.stderr[-500:]}")
    return float(json.loads(r.stdout.splitlines()[-1])["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path, nargs="?", default=REPO)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="score 8192,score 65536,ingest")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed_ab.json")
    a = ap.parse_args()
    cases = a.cases.split(",")
    got: dict[str, dict[str, list[float]]] = {c: {"old": [], "new": []} for c in cases}
    for r in range(a.rounds):
        for case in cases:
            order = [("old", a.old), ("new", a.new)] if r % 2 == 0 else [("new", a.new), ("old", a.old)]
            for name, checkout in order:
                tps = run(checkout, case)
                got[case][name].append(tps)
                print(f"round {r + 1} {case:12s} {name}: {tps:,.1f} tokens/s", flush=True)
    rows = []
    for case in cases:
        old, new = statistics.median(got[case]["old"]), statistics.median(got[case]["new"])
        rows.append(
            {
                "case": case,
                "old_tokens_per_s": got[case]["old"],
                "new_tokens_per_s": got[case]["new"],
                "old_median": old,
                "new_median": new,
                "new_over_old": new / old,
            }
        )
        print(f"{case:12s} old {old:,.1f}  new {new:,.1f}  new/old {new / old:.3f}")
    meta = {**run_metadata(), "old": str(a.old), "new": str(a.new)}
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
