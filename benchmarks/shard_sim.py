"""Simulated shards at the real geometry: the per-token cost of the bank's block search as shards grow.

    python benchmarks/shard_sim.py --out benchmarks/results/shard_sim.json

A bank keeps one block-mean index per (memory layer, KV head): 23 layers x 3 KV heads of 64
dimensions for the default model, one entry per block of 32 tokens. A decoded token searches
each of them once for its best `--k` blocks. This builds `--shards` synthetic shards of
`--shard-tokens` tokens each for ONE (layer, KV head), searches them together through
`faiss.IndexShards` (what a shard set does), and times a single-query search (decode) and a
chunk of 16 queries (scoring), single-threaded; the per-token figure is that times 69. Two
index kinds: the flat inner-product index banks use today, and IVF (`IVF<nlist>,Flat`, nlist =
4 sqrt(n), `--nprobe` lists), whose recall of the exact top k over all shards is measured.

Synthetic block means: a mixture of 4,096 Gaussian clusters whose scales follow the real
bank's block means when `--from-bank BANK` is given (its first memory layer, KV head 0);
otherwise a unit mixture. Recall on real banks is measured by `bank_codecs.py`; this measures
cost, and how it grows with shards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import emit, run_metadata  # noqa: E402

D, BLOCK, INDEXES = 64, 32, 23 * 3  # head dim, tokens per block, (layer, KV head) indexes


def sample_means(n: int, rng: np.random.Generator, centers: np.ndarray, scale: float) -> np.ndarray:
    pick = rng.integers(0, len(centers), n)
    return (centers[pick] + scale * rng.standard_normal((n, D))).astype(np.float32)


def seed_from_bank(path: str) -> tuple[float, float]:
    """(spread of the block means, spread within) of a real bank's first (layer, head) index."""
    from memtx_cli.bank.store import Bank

    with Bank.open(path, verify=False) as b:
        index = b.indexes[(b.geo.layers[0], 0)]
        x = index.reconstruct_n(0, index.ntotal)
    return float(x.mean(0).std()), float(x.std(0).mean())


def build(kind: str, x: np.ndarray, nprobe: int):
    import faiss

    if kind == "flat":
        index = faiss.IndexFlatIP(D)
    else:
        nlist = max(16, int(4 * math.sqrt(len(x))))
        index = faiss.index_factory(D, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(x[: max(nlist * 39, 10000)])
        index.nprobe = nprobe
    index.add(x)
    return index


def timed(index, q: np.ndarray, k: int, reps: int) -> float:
    t = time.perf_counter()
    for i in range(reps):
        index.search(q[i % len(q) : i % len(q) + 1] if q.ndim == 2 else q[i % len(q)], k)
    return (time.perf_counter() - t) / reps


class IndexServer:
    """A Ray actor holding one shard's index (the remote half of a shard set)."""

    def __init__(self, x: np.ndarray) -> None:
        import faiss

        faiss.omp_set_num_threads(1)
        self.index = faiss.IndexFlatIP(D)
        self.index.add(x)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, k)


def ray_round_trip(x: np.ndarray, q: np.ndarray, k: int, reps: int) -> dict:
    """Milliseconds per search of a shard held by a Ray actor on the local host: the round trip a
    remote shard adds to a search (no network here: a lower bound for machines on a LAN)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(IndexServer).options(num_cpus=0).remote(x)
        ray.get(actor.search.remote(q[:1], k))
        t = time.perf_counter()
        for i in range(reps):
            ray.get(actor.search.remote(q[i % len(q) : i % len(q) + 1], k))
        total = (time.perf_counter() - t) / reps
        local = timed_flat(x, q, k, reps)
    finally:
        ray.shutdown()
    return {"ms_per_remote_search": round(1e3 * total, 4), "ms_same_search_in_process": round(1e3 * local, 4)}


def timed_flat(x: np.ndarray, q: np.ndarray, k: int, reps: int) -> float:
    import faiss

    index = faiss.IndexFlatIP(D)
    index.add(x)
    return timed(index, q, k, reps)


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1,2,4,8,16")
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--from-bank")
    ap.add_argument("--ray", action="store_true", help="also time a search of a shard held by a Ray actor")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    spread, within = seed_from_bank(a.from_bank) if a.from_bank else (1.0, 0.5)
    centers = spread * rng.standard_normal((4096, D)).astype(np.float32)
    n_blocks = a.shard_tokens // BLOCK
    shard_sizes = [int(s) for s in a.shards.split(",")]
    data = [sample_means(n_blocks, rng, centers, within) for _ in range(max(shard_sizes))]
    q = sample_means(a.queries, rng, centers, within)
    chunks = np.stack([sample_means(16, rng, centers, within) for _ in range(20)])
    rows = []
    for n_shards in shard_sizes:
        exact = faiss.IndexFlatIP(D)
        exact.add(np.concatenate(data[:n_shards]))
        _, truth = exact.search(q, a.k)
        for kind in ("flat", "ivf"):
            t0 = time.perf_counter()
            subs = [build(kind, x, a.nprobe) for x in data[:n_shards]]
            build_s = time.perf_counter() - t0
            shards = faiss.IndexShards(D, False, True)  # successive ids: shard i's offset by earlier ntotal
            for s in subs:
                shards.add_shard(s)
            _, got = shards.search(q, a.k)
            recall = float(np.mean([len(set(g) & set(t)) / a.k for g, t in zip(got, truth, strict=True)]))
            one = timed(shards, q, a.k, a.queries)
            chunk = timed(shards, chunks, a.k, len(chunks))
            index_bytes = sum(len(faiss.serialize_index(s)) for s in subs)
            rows.append(
                {
                    "shards": n_shards,
                    "tokens": n_shards * a.shard_tokens,
                    "index": kind,
                    "nprobe": a.nprobe if kind == "ivf" else None,
                    "recall_at_k": round(recall, 4),
                    "ms_per_search": round(1e3 * one, 4),
                    "ms_per_token_all_indexes": round(1e3 * one * INDEXES, 2),
                    "ms_per_chunk16_search": round(1e3 * chunk, 4),
                    "index_bytes_per_token_all_indexes": round(index_bytes * INDEXES / (n_shards * a.shard_tokens), 1),
                    "build_seconds": round(build_s, 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    res = {
        "meta": run_metadata(),
        "geometry": {"head_dim": D, "block_size": BLOCK, "indexes": INDEXES, "k": a.k},
        "seed_bank": a.from_bank,
        "rows": rows,
        "ray": ray_round_trip(data[0], q, a.k, a.queries) if a.ray else None,
    }
    emit(res, a.out)


if __name__ == "__main__":
    main()
