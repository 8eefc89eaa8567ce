"""Recall of approximate block-mean indexes (FAISS IVF, HNSW) against the exact search a bank
runs today, on a real bank and the real queries of a document read against it.

    python benchmarks/block_index_recall.py BANK --doc FILE --tokens 8192 \
        --out benchmarks/results/block_index_recall.json

The document (not in the bank) streams with the bank as memory (`score --memory BANK`); every
block search it sends to the bank is recorded: the summed chunk queries of each memory head.
For each stored (layer, KV head) the bank's block means are indexed again as IVF-Flat
(`nlist` = 4 sqrt(blocks), trained on the means themselves), as HNSW-Flat (32 links) and as 8-bit
scalar-quantized codes scanned whole with the best k x factor re-scored exactly (IndexRefineFlat),
all inner product; each answers the recorded queries for k = 16 (`bank-blocks`) and 64 (ask's
recall). Recall@k: the share of the exact top k found, a found block counting when its exact
score ties the k-th (repeated text has equal means). Seconds per query are for one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import emit, run_metadata  # noqa: E402

KS = (16, 64)


def record_queries(bank_path: str, doc: Path, tokens: int) -> tuple[object, dict]:
    """The bank, and layer -> head -> the queries (Q, D) its reads searched with."""
    import torch

    from memtx_cli.engine.session import load_for, open_bank, resolve_settings
    from memtx_cli.engine.stream import run_stream

    cfg, _ = resolve_settings({}, None, None)
    bank = open_bank(bank_path)
    lm = load_for(cfg, bank)
    seen: dict[int, dict[int, list[np.ndarray]]] = {}
    search = bank.search_heads

    def recording(layer: int, heads: list[int], x: np.ndarray, k: int):  # noqa: ANN202
        for i, h in enumerate(heads):
            seen.setdefault(layer, {}).setdefault(h, []).append(np.array(x[i], np.float32))
        return search(layer, heads, x, k)

    bank.search_heads = recording
    ids = torch.tensor(lm.tokenizer.encode(doc.read_text(encoding="utf-8"))[:tokens])
    run_stream(lm.model, ids, cfg, bank=bank)
    bank.search_heads = search
    return bank, {layer: {h: np.concatenate(q) for h, q in hs.items()} for layer, hs in seen.items()}


def recall(exact_s: np.ndarray, exact_i: np.ndarray, got_i: np.ndarray, means: np.ndarray, q: np.ndarray) -> float:
    """Share of the exact top k found (ties with the k-th exact score count as found)."""
    kth = exact_s[:, -1:]
    hits = 0
    for r in range(q.shape[0]):
        ids = got_i[r][got_i[r] >= 0]
        scores = means[ids] @ q[r] if len(ids) else np.zeros(0)
        hits += min(int((scores >= kth[r, 0] - 1e-5).sum()), exact_i.shape[1])
    return hits / exact_i.size


def measure(means: np.ndarray, q: np.ndarray, nprobes: list[int], efs: list[int]) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    n, d = means.shape
    flat = faiss.IndexFlatIP(d)
    flat.add(means)
    rows = []
    exact = {}
    for k in KS:
        t0 = time.perf_counter()
        exact[k] = flat.search(q, k)
        rows.append({"index": "flat", "k": k, "recall": 1.0, "us_per_query": 1e6 * (time.perf_counter() - t0) / len(q)})
    nlist = max(1, int(4 * np.sqrt(n)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(means)
    ivf.add(means)
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(means)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(means)
    refine = faiss.IndexRefineFlat(sq)  # 8-bit codes scanned, the best k x factor re-scored exactly
    refine.add(means)
    for k in KS:
        s_e, i_e = exact[k]
        for p in nprobes:
            ivf.nprobe = p
            t0 = time.perf_counter()
            _, i_a = ivf.search(q, k)
            us = 1e6 * (time.perf_counter() - t0) / len(q)
            r = recall(s_e, i_e, i_a, means, q)
            rows.append({"index": f"ivf{nlist}", "nprobe": p, "k": k, "recall": r, "us_per_query": us})
        for factor in (1, 2, 4):
            refine.k_factor = factor
            t0 = time.perf_counter()
            _, i_a = refine.search(q, k)
            us = 1e6 * (time.perf_counter() - t0) / len(q)
            r = recall(s_e, i_e, i_a, means, q)
            rows.append({"index": "sq8refine", "k_factor": factor, "k": k, "recall": r, "us_per_query": us})
        for ef in efs:
            hnsw.hnsw.efSearch = max(ef, k)
            t0 = time.perf_counter()
            _, i_a = hnsw.search(q, k)
            us = 1e6 * (time.perf_counter() - t0) / len(q)
            r = recall(s_e, i_e, i_a, means, q)
            rows.append({"index": "hnsw32", "ef_search": ef, "k": k, "recall": r, "us_per_query": us})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank")
    ap.add_argument("--doc", type=Path, required=True, help="a document not in the bank")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=8, help="(layer, head) pairs measured, spread over the stored ones")
    ap.add_argument("--nprobe", default="8,32,128,256")
    ap.add_argument("--ef", default="64,256")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    bank, seen = record_queries(a.bank, a.doc, a.tokens)
    pairs = sorted((layer, h) for layer, hs in seen.items() for h in hs)
    pick = [pairs[int(i)] for i in np.linspace(0, len(pairs) - 1, min(a.pairs, len(pairs)))]
    out = []
    for layer, h in pick:
        idx = bank.indexes[(layer, h)]
        means = idx.index.reconstruct_n(0, idx.ntotal).astype(np.float32)
        q = seen[layer][h]
        rows = measure(means, q, [int(x) for x in a.nprobe.split(",")], [int(x) for x in a.ef.split(",")])
        for r in rows:
            out.append({"layer": layer, "head": h, "blocks": int(idx.ntotal), "queries": len(q), **r})
            print(out[-1], file=sys.stderr)
    summary = {}
    for r in out:
        key = (r["index"].rstrip("0123456789"), r.get("nprobe", r.get("ef_search", r.get("k_factor"))), r["k"])
        summary.setdefault(key, []).append(r)
    table = [
        {
            "index": i,
            "param": p,
            "k": k,
            "recall_mean": float(np.mean([r["recall"] for r in rs])),
            "recall_min": float(np.min([r["recall"] for r in rs])),
            "us_per_query": float(np.mean([r["us_per_query"] for r in rs])),
        }
        for (i, p, k), rs in summary.items()
    ]
    res = {"meta": run_metadata(), "bank": a.bank, "entries": int(bank.entries), "doc": a.doc.name}
    emit({**res, "tokens": a.tokens, "summary": table, "rows": out}, a.out)


if __name__ == "__main__":
    main()
