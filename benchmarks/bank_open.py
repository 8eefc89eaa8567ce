"""Time to open a bank: the full check (every block's crc32, `bank verify`) against the reader's
open (structure and state only; each block's crc32 on first read), and what reading a chunk's
worth of blocks costs the first time and again.

    python benchmarks/bank_open.py BANK --out benchmarks/results/bank_open.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _meta import run_metadata

from memtx_cli.bank.store import Bank
from memtx_cli.memory.bank import BankLayerMemory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bank")
    ap.add_argument("--blocks", type=int, default=64, help="blocks read per KV head (one chunk's bank read)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    res = {"meta": run_metadata(), "bank": a.bank}
    for verify in (True, False):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            Bank.open(a.bank, verify=verify).close()
            times.append(time.perf_counter() - t0)
        res[f"open_seconds_{'full' if verify else 'reader'}"] = float(np.median(times))
    with Bank.open(a.bank, verify=False) as b:
        res |= {"tokens": sum(d.tokens for d in b.docs.values()), "blocks": int(len(b.live_blocks))}
        layer = b.geo.layers[len(b.geo.layers) // 2]
        mem = BankLayerMemory(b, layer, torch.float32)
        ids = torch.from_numpy(np.random.default_rng(0).choice(b.live_blocks, (b.geo.n_kv, 1, a.blocks)))
        for name in ("first", "again"):
            t0 = time.perf_counter()
            mem.gather_blocks(ids)
            res[f"gather_seconds_{name}"] = time.perf_counter() - t0
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
