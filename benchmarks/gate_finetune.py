"""Gate fine-tuning on the default model: train only the per-head memory parameters on
part of ../shared/corpus, validate on held-out documents of each genre (the first 8,192 tokens of
the memory benchmark's documents, never trained on), window-only vs memory before and after.

    python benchmarks/gate_finetune.py --combine joint   # trains mem_bias c_h (joint softmax)
    python benchmarks/gate_finetune.py --combine gate    # trains the paper's gate b_h

Writes benchmarks/results/gate_finetune_<combine>.json (the `memtx train --json` output plus the
command) and leaves the checkpoint in /tmp/memtx-gate-<combine>.
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
TRAIN = [
    "books/austen_northangerabbey.txt",
    "books/milton_paradise_lost.txt",
    "books/jargon_file_4.4.7.txt",
    "code/cpython311_pydecimal.py",
    "code/cpython311_typing.py",
    "code/lodash.js",
    "legal/debian_constitution_all_versions.txt",
    "legal/GPL-3.txt",
]
VAL = ["books/austen_persuasion.txt", "code/lua54_interpreter_repo.c.txt", "legal/spdx_license_list_texts.txt"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--combine", default="joint", choices=["joint", "gate"])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    a = ap.parse_args()
    out = Path(f"/tmp/memtx-gate-{a.combine}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "memtx_cli", "train", *[str(CORPUS / p) for p in TRAIN], "--out", str(out)]
    cmd += [
        "--train",
        "gate",
        "--set",
        f"combine={a.combine}",
        "--max-steps",
        str(a.steps),
        "--seq-len",
        str(a.seq_len),
    ]
    cmd += ["--lr", str(a.lr), "--warmup", "5", "--eval-every", str(a.eval_every), "--save-every", str(a.eval_every)]
    cmd += ["--eval-tokens", "8192", "--json"]
    for p in VAL:
        cmd += ["--val", str(CORPUS / p)]
    cmd += a.extra
    t = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    res = json.loads(r.stdout)
    res["command"] = " ".join(["memtx", *cmd[3:]]).replace(str(CORPUS), "../shared/corpus")
    res["wall_seconds"] = time.time() - t
    dst = REPO / f"benchmarks/results/gate_finetune_{a.combine}.json"
    dst.write_text(json.dumps(res, indent=1))
    print(r.stderr, file=sys.stderr)
    for ev in res["evals"]:
        docs = "  ".join(f"{k}: mem {v['ppl_memory']:.3f} win {v['ppl_window']:.3f}" for k, v in ev["docs"].items())
        print(f"step {ev['step']:4d}  {docs}")
    print(f"{res['steps']} steps, {res['tokens']:,} tokens, {res['seconds']:.0f} s -> {dst}")


if __name__ == "__main__":
    main()
