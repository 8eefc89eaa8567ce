"""Far search with and without pages (Config.far_pages): time per call and the share of the
exact top-k kept, on synthetic clustered keys (blocks of one topic each, as text's are).

    python benchmarks/far_pages_timing.py --out benchmarks/results/far_pages_timing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import run_metadata  # noqa: E402

from memtx_cli.memory.index import IndexSpec  # noqa: E402
from memtx_cli.memory.store import LayerMemory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="16384,65536", help="memory sizes (entries, one head)")
    ap.add_argument("--queries", type=int, default=64, help="queries per call (a chunk)")
    ap.add_argument("--pages", default="0,8,16,32", help="pages per query; 0 = exact search")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in (int(x) for x in a.keys.split(",")):
        nb = n // 32
        keys = (torch.randn(nb, 1, 64) * 1.5 + torch.randn(nb, 32, 64)).reshape(1, n, 64)
        mem = LayerMemory(1, 64, IndexSpec("flat"), block_size=32, capacity=n, bounds=True)
        mem.add(keys, torch.randn(1, n, 64), torch.arange(n))
        q = torch.randn(1, a.queries, 64) + keys[:, torch.randint(0, n, (a.queries,))]
        exact = (q[0] @ keys[0].t()).topk(32, -1).indices
        for pages in (int(x) for x in a.pages.split(",")):
            mem.retrieve_far(q, 32, n, pages=pages)  # warm-up
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                got = mem.retrieve_far(q, 32, n, pages=pages)
            ms = (time.perf_counter() - t0) / a.repeats * 1e3
            kept = sum(len(set(g.tolist()) & set(e.tolist())) for g, e in zip(got.positions[0], exact, strict=True))
            rows.append({"keys": n, "pages": pages, "ms_per_call": round(ms, 2), "recall": kept / exact.numel()})
            print(f"{n:>7} keys, pages {pages:>3}: {ms:6.1f} ms per call, recall {rows[-1]['recall']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": run_metadata(), "queries": a.queries, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
