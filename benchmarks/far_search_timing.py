"""Time one far search (`LayerMemory.retrieve_far`: 64 queries, top 32, one head) on bfloat16
keys against the float32 search it replaced (float32 scores over a float32 copy of the keys),
and its 2k shortlist (`memory.top_rows`, scores as (keys, queries)) against the shortlist it
replaced (exact_top_k over float32 (queries, keys) scores).

    python benchmarks/far_search_timing.py 28000,56000

Random keys; three timings of 40 calls each per size, in milliseconds per call.
"""

import sys
import time

import torch

from memtx_cli.memory.store import IndexSpec, LayerMemory, exact_top_k, top_rows
from memtx_cli.model.loading import tune_allocator


def main() -> None:
    sizes = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "28000,56000").split(",")]
    tune_allocator()  # as memtx runs
    torch.manual_seed(0)
    n = max(sizes)
    mem = LayerMemory(1, 64, IndexSpec("flat"), dtype=torch.bfloat16, block_size=32, capacity=n)
    mem.add(torch.randn(1, n, 64), torch.randn(1, n, 64), torch.arange(n))
    q = torch.randn(1, 64, 64).bfloat16().float()  # a bfloat16 model's search vectors

    def before(bound: int) -> None:
        scores = q[0] @ mem.keys[0, :bound].float().t()
        mem._gather_entries(exact_top_k(scores[None], 32), None, False, [0])

    def timed(f, calls: int = 40) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        return (time.perf_counter() - t0) / calls * 1e3

    qb = q[0].bfloat16()
    for bound in sizes:
        old = [timed(lambda b=bound: before(b)) for _ in range(3)]
        new = [timed(lambda b=bound: mem.retrieve_far(q, 32, b)) for _ in range(3)]
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"{bound} keys: float32 {fmt(old)} ms, bfloat16 + rescoring {fmt(new)} ms")
        keys = mem.keys[0, :bound]
        rows_first = [timed(lambda k=keys: exact_top_k((qb @ k.t()).float()[None], 64)) for _ in range(3)]
        keys_first = [timed(lambda k=keys: top_rows(k, qb, 64)) for _ in range(3)]
        print(f"{bound} keys, shortlist of 64: (queries, keys) {fmt(rows_first)} ms, top_rows {fmt(keys_first)} ms")


if __name__ == "__main__":
    main()
