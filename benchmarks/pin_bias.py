"""Passkey from a bank against `pin-bias` (and the bank's codec), with a tune / held-out split.

    python benchmarks/pin_bias.py --biases 0,2,4 --out benchmarks/results/pin_bias.json
    python benchmarks/pin_bias.py --biases 2 --split held-out --out ...
    python benchmarks/pin_bias.py --biases 0 --precision sq8,sq4 --out ...

Each setting runs `memtx bench passkey --bank --no-window` (the haystack ingested into a bank,
the question alone as the prompt, defaults otherwise) at --length tokens and 5 depths. The
tune split is seed 0 (its keys), the held-out split seed 1: settings are chosen on tune and
reported on held-out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import emit, run_metadata  # noqa: E402

SEEDS = {"tune": 0, "held-out": 1}
MEMTX = [sys.executable, "-m", "memtx_cli"]


def run(length: str, seed: int, bias: float, precision: str) -> dict:
    cmd = [*MEMTX, "bench", "passkey", "--bank", "--no-window", "--lengths", length, "--depths", "5"]
    cmd += ["--trials", "1", "--seed", str(seed), "--set", f"pin-bias={bias}", "--precision", precision]
    out = subprocess.run([*cmd, "--json", "--quiet"], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    row = res["rows"][0]
    return {
        "pin_bias": bias,
        "precision": precision,
        "seed": seed,
        "length": row["length"],
        "tokens": row["tokens"],
        "accuracy": row["accuracy_memory"],
        "by_depth": row["by_depth"],
        "seconds_per_trial": row["seconds_per_trial"],
        "answers": [d["answer_memory"] for d in row["details"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--biases", default="0,2,4")
    ap.add_argument("--precision", default="float16")
    ap.add_argument("--split", choices=list(SEEDS), default="tune")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    for precision in a.precision.split(","):
        for bias in (float(b) for b in a.biases.split(",")):
            rows.append({"split": a.split, **run(a.length, SEEDS[a.split], bias, precision)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    emit({"meta": run_metadata(), "rows": rows}, a.out, accumulate=True)


if __name__ == "__main__":
    main()
