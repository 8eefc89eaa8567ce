"""From scratch at toy scale: the same tiny model (benchmarks/configs/toy_code.yaml),
same tokenizer, data order, steps and schedule, trained with its kNN memory layer and without
(--no-memory); then both scored on long held-out documents.

    python benchmarks/scratch_toy.py --steps 1200 --lr 2e-3

Writes benchmarks/results/scratch_toy.json; checkpoints in /tmp/memtx-toy-{memory,window}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared/corpus"
TRAIN = ["code/lua54_interpreter_repo.c.txt", "code/lodash.js", "code/cpython311_pydecimal.py"]
VAL = ["code/cpython311_typing.py"]


def run(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    print(r.stderr, file=sys.stderr)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=2e-3)
    a = ap.parse_args()
    res = {}
    for name in ("memory", "window"):
        out = Path(f"/tmp/memtx-toy-{name}")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "memtx_cli", "train", *[str(CORPUS / p) for p in TRAIN], "--out", str(out)]
        cmd += ["--init", str(REPO / "benchmarks/configs/toy_code.yaml"), "--max-steps", str(a.steps)]
        cmd += ["--seq-len", str(a.seq_len), "--accum", str(a.accum), "--eval-every", str(a.steps // 3)]
        cmd += ["--save-every", str(a.steps // 3), "--eval-tokens", str(a.eval_tokens), "--warmup", "20", "--json"]
        cmd += ["--lr", str(a.lr)]
        cmd += ["--val", str(CORPUS / VAL[0])]
        if name == "window":
            cmd.append("--no-memory")
        t = time.time()
        r = run(cmd)
        r["command"] = (
            " ".join(["memtx", *cmd[3:]]).replace(str(CORPUS), "../shared/corpus").replace(str(REPO) + "/", "")
        )
        r["wall_seconds"] = time.time() - t
        res[name] = r
    (REPO / "benchmarks/results/scratch_toy.json").write_text(json.dumps(res, indent=1))
    for name, r in res.items():
        ev = r["evals"][-1]
        print(
            f"{name:7s} trained: {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']:.0f} s; val",
            {k: v for k, v in ev.items() if k.startswith("ppl")},
        )


if __name__ == "__main__":
    main()
