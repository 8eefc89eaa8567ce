"""FAISS indexes over keys: one per (memory layer, KV head), searched by inner product.

Index kinds (`index` setting): `flat` (exact inner product, the reference), `ivf` (IVF with
sqrt-scaled lists, trained once enough keys have arrived; exact search until then), `hnsw`
(HNSW32), or any FAISS factory string (e.g. `IVF256,SQ8`). Token retrieval (the paper's
per-query top-k) searches them; block retrieval keeps no per-token index.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from memtx_cli.errors import UsageError
from memtx_cli.memory.results import Retrieval

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    import faiss

    return faiss


def check_index_kind(kind: str) -> None:
    """Refuse an unknown index kind early, with the list of what works."""
    if kind in INDEX_KINDS:
        return
    faiss = _faiss()
    try:
        faiss.index_factory(8, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise UsageError(
            f"unknown index kind {kind!r}: use flat, ivf, hnsw or a FAISS factory string such as 'IVF256,Flat'"
        ) from None


@dataclass
class IndexSpec:
    kind: str = "flat"
    nprobe: int = 48  # IVF lists searched per query (recall: memtx bench recall)
    ivf_train_at: int = 8192  # keys per head before IVF is trained; exact search until then
    hnsw_ef: int = 64  # HNSW efSearch


class HeadIndex:
    """The FAISS index of one (layer, KV head), with ids = entry ids."""

    def __init__(self, dim: int, spec: IndexSpec, use_gpu: bool = False) -> None:
        self.dim, self.spec, self.use_gpu = dim, spec, use_gpu
        self.index = None  # built lazily (IVF needs training data)
        self.pending: list[np.ndarray] = []  # keys waiting for IVF training (searched exactly)
        self.pending_ids: list[np.ndarray] = []
        if not self._needs_training():
            self.index = self._make(self._factory(0))

    def _factory(self, n_train: int) -> str:
        kind = self.spec.kind
        if kind == "flat":
            return "IDMap2,Flat"
        if kind == "hnsw":
            return "IDMap2,HNSW32,Flat"
        if kind == "ivf":
            # ~4 sqrt(N) lists, but at least 39 training keys per list (FAISS's k-means floor).
            nlist = 1 << max(4, int(math.log2(max(16, min(4 * math.sqrt(n_train), n_train / 39)))))
            return f"IVF{nlist},Flat"
        return kind

    def _needs_training(self) -> bool:
        return self.spec.kind not in ("flat", "hnsw") and not self.spec.kind.startswith(("IDMap", "Flat", "HNSW"))

    def _make(self, factory: str):
        faiss = _faiss()
        idx = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not _supports_ids(idx):
            idx = faiss.IndexIDMap2(idx)
        ivf = faiss.try_extract_index_ivf(idx)
        if ivf is not None:
            ivf.nprobe = self.spec.nprobe
        hnsw = _find_hnsw(idx)
        if hnsw is not None:
            hnsw.hnsw.efSearch = self.spec.hnsw_ef
        if self.use_gpu and hasattr(faiss, "StandardGpuResources"):
            idx = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, idx)
        return idx

    @property
    def ntotal(self) -> int:
        return (self.index.ntotal if self.index is not None else 0) + sum(len(p) for p in self.pending)

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        if self.index is not None:
            self.index.add_with_ids(keys, ids)
            return
        self.pending.append(keys)
        self.pending_ids.append(ids)
        n = sum(len(p) for p in self.pending)
        if n >= self.spec.ivf_train_at:
            allk = np.concatenate(self.pending)
            alli = np.concatenate(self.pending_ids)
            self.index = self._make(self._factory(n))
            self.index.train(allk)
            self.index.add_with_ids(allk, alli)
            self.pending, self.pending_ids = [], []

    def search(self, queries: np.ndarray, k: int, all_keys: torch.Tensor) -> np.ndarray:
        """ids (Q, k) of the top-k keys by inner product; -1 where fewer than k exist."""
        if self.index is not None:
            _, ids = self.index.search(queries, k)
            return ids
        # Untrained IVF: exact search over the pending keys (few by construction).
        n = all_keys.shape[0]
        scores = torch.from_numpy(queries) @ all_keys[:n].float().T  # (Q, N)
        kk = min(k, n)
        top = scores.topk(kk, dim=-1).indices.numpy()
        if kk < k:
            top = np.concatenate([top, -np.ones((top.shape[0], k - kk), dtype=top.dtype)], 1)
        return top


def _supports_ids(idx) -> bool:
    faiss = _faiss()
    return isinstance(idx, faiss.IndexIDMap | faiss.IndexIDMap2) or faiss.try_extract_index_ivf(idx) is not None


def _find_hnsw(idx):
    faiss = _faiss()
    cur = idx
    for _ in range(4):
        down = faiss.downcast_index(cur)
        if isinstance(down, faiss.IndexHNSW):
            return down
        if hasattr(down, "index"):
            cur = down.index
        else:
            return None
    return None


class TokenSearch:
    """LayerMemory's token retrieval: each query's top-k entries from its head's FAISS index."""

    def retrieve(self, q: torch.Tensor, k: int) -> Retrieval:
        """Top-k entries for every query. q: (KV, Q, D) search vectors (Q = G*T: a GQA group's
        queries share their head's index, one search call per head)."""
        t0 = time.perf_counter()
        qn = q.detach().float().cpu().numpy()
        ids = np.stack(
            [self.heads[h].search(np.ascontiguousarray(qn[h]), k, self.keys[h, : self.n]) for h in range(self.n_kv)]
        )  # (KV, Q, k)
        self.search_seconds += time.perf_counter() - t0
        idt = torch.from_numpy(ids).to(self.device)
        return self._gather_entries(idt.clamp(min=0), idt >= 0, rotated=True)
