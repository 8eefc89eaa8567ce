"""Passkey from a bank, setting variants against each other, with a tune / held-out split.

    python benchmarks/passkey_bank.py --variants "pin-bias=0;pin-bias=4" --out benchmarks/results/pin_bias.json
    python benchmarks/passkey_bank.py --split held-out --lengths 8k,16k --out ...
    python benchmarks/passkey_bank.py --variants "sink-positions=real;sink-positions=auto" --split held-out ...
    python benchmarks/passkey_bank.py --precision float16,sq8,sq4 --out ...

Each variant (`;` between variants, `,` between the KEY=VALUE settings of one; empty = the
defaults) runs `memtx bench passkey --bank --no-window` (the haystack ingested into a bank, the
question alone as the prompt) at each length and 5 depths. The tune split is seed 0 (its keys),
the held-out split seed 1: settings are chosen on tune and reported on held-out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import emit, run_metadata  # noqa: E402

SEEDS = {"tune": 0, "held-out": 1}
MEMTX = [sys.executable, "-m", "memtx_cli"]


def run(length: str, seed: int, sets: list[str], precision: str) -> dict:
    cmd = [*MEMTX, "bench", "passkey", "--bank", "--no-window", "--lengths", length, "--depths", "5"]
    cmd += ["--trials", "1", "--seed", str(seed), "--precision", precision]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run([*cmd, "--json", "--quiet"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)["rows"][0]
    return {
        "settings": sets,
        "precision": precision,
        "seed": seed,
        "length": row["length"],
        "tokens": row["tokens"],
        "accuracy": row["accuracy_memory"],
        "by_depth": row["by_depth"],
        "seconds_per_trial": row["seconds_per_trial"],
        "seconds_ingest_per_trial": row.get("seconds_ingest_per_trial"),
        "answers": [d["answer_memory"] for d in row["details"]],
        "key_positions": [d.get("key_position") for d in row["details"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="", help="';' between variants, ',' within one; '' = defaults")
    ap.add_argument("--precision", default="float16")
    ap.add_argument("--split", choices=list(SEEDS), default="tune")
    ap.add_argument("--lengths", default="8k")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    for length in a.lengths.split(","):
        for precision in a.precision.split(","):
            for variant in a.variants.split(";"):
                # "," between settings, not within a value (bank-heads=18.2,20.2 is one setting)
                sets = [s.strip() for s in re.split(r",(?=\s*[a-z][a-z0-9-]*=)", variant) if s.strip()]
                rows.append({"split": a.split, **run(length, SEEDS[a.split], sets, precision)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    emit({"meta": run_metadata(), "rows": rows}, a.out, accumulate=True)


if __name__ == "__main__":
    main()
