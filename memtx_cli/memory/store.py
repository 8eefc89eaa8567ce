"""kNN memory: per (memory layer, KV head) a FAISS index over keys, values aligned by id.

A `LayerMemory` holds, for one memory layer and all its KV heads:
- raw keys (no RoPE) and values in growable torch buffers, row r = entry id r;
- absolute token positions per entry (for the `true` / `clamped` position schemes);
- one FAISS index per KV head over the keys it is searched by, with explicit ids.

Search is batched: all queries of a segment for all G query heads of a KV group go to that
head's index in one call. The model only calls `retrieve`; it never sees FAISS.

Index kinds (`--index`): `flat` (exact inner product, the reference), `ivf` (IVF with
sqrt-scaled lists, trained once enough keys have arrived; exact search until then), `hnsw`
(HNSW32), or any FAISS factory string (e.g. `IVF256,SQ8`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from memtx_cli.errors import MemtxError, UsageError
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.model.llama import BlockRetrieval, Retrieval

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


_HUGE = 2 << 20  # x86-64 transparent huge page


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed memory buffer. On Linux CPUs its whole 2 MiB pages are advised as huge pages
    (madvise MADV_HUGEPAGE; transparent huge pages are often "madvise"-only): fewer TLB misses
    for block reads and far searches that hop across the buffer (README "A bfloat16 attention
    kernel"). Zeroing it is its first touch, in bulk: page faults taken instead by each
    segment's small strided writes cost 3.5 ms per buffer kind per segment (23 layers, 16K
    tokens) against 0.25 ms on touched pages; touching a 64K document's 69 buffers at once takes
    0.5-1.0 s against 2.0-2.5 s of faults spread over its segments (scratch runs; README
    "Fused far reads, blocks read in place, bounded memory")."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    nbytes = buf.numel() * buf.element_size()
    madvise = _madvise() if device.type == "cpu" and nbytes >= 2 * _HUGE and sys.platform.startswith("linux") else None
    if madvise is not None:
        start = -(-buf.data_ptr() // _HUGE) * _HUGE  # whole huge pages inside the buffer
        length = (buf.data_ptr() + nbytes - start) // _HUGE * _HUGE
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE; advice only
    return buf.zero_()


@functools.cache
def _madvise():  # libc's madvise, looked up once; None where it is missing
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


class LayerMemory:
    """Memory of one layer: all KV heads, raw keys + values + positions, one index per head."""

    # retrieve_blocks(gather=False) + gather_blocks(head0=...): each head's budget gathered apart
    gathers_by_head = True

    def __init__(
        self,
        n_kv: int,
        head_dim: int,
        spec: IndexSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rotated: bool = False,
        block_size: int = 0,
        capacity: int = 1024,
        near_only: bool = False,
        ring: int = 0,
        packed: int = 0,
    ) -> None:
        """capacity: entries to make room for at once (the caller's estimate, e.g. a document's
        length; the buffers grow by doubling past it). The room is touched (zeroed) at once.
        near_only (rotated block memory): its readers score blocks within the trained context
        only, by their rotated keys (clamped near-only exact selection, no far reads, no bank):
        no raw keys and no block means are kept (`keys`, `reps`, `rreps` are None), a third
        less memory to write and page in (the default model: 19 of its 23 memory layers).
        ring (near_only): keep only the last `ring` entries (rounded up to 1024), in a ring
        buffer (entry id i in slot i % capacity): the ones within the trained context of the
        queries to come. Memory then stays bounded however long the document.
        packed (rotated bfloat16 block memory, blocks of a multiple of 32): also keep the last
        `packed` entries' rotated keys and values (rounded up to 1024) packed per block in
        attn_kernel's layout (`pk`, `pv`: (KV, blocks, block x D), block i in slot i % blocks),
        so that block_attention reads blocks without packing them on every call (7-18% of its
        time, scratch A/B). For readers of near blocks only; others fall back to packing."""
        self.n_kv, self.head_dim, self.spec = n_kv, head_dim, spec
        # block_size > 0: block retrieval. Entries are grouped in blocks of consecutive ids, each
        # represented by the mean of its (searched) keys; no per-token index is kept.
        self.block_size = block_size
        self.device = torch.device(device)
        self.n = 0
        cap = -(-max(capacity, 1) // 1024) * 1024  # whole blocks (block sizes divide 1024)
        if ring and not near_only:
            raise ValueError("only near_only memories can keep a ring of their last entries")
        self.ring = -(-ring // 1024) * 1024 if ring else 0  # 0: every entry is kept
        if self.ring:
            cap = self.ring  # allocated whole: a ring does not grow
        # Sized once for the document: growing by doubling mid-run copied and first-touched
        # every buffer again (README "Memory buffers sized once"). `_buffer` zeroes them; `add`
        # still zeroes the unused tail of the last partial block, which block retrieval reads
        # whole (masked out, but NaN garbage would poison the softmax), in case of other writers.
        if near_only and not (rotated and block_size):
            raise ValueError("near_only memories are rotated block memories")
        self.keys = None if near_only else _buffer((n_kv, cap, head_dim), dtype, self.device)  # raw, no RoPE
        self.values = _buffer((n_kv, cap, head_dim), dtype, self.device)
        # Keys rotated by their absolute positions (true / clamped schemes): scoring a retrieved
        # memory at its real distance is then one dot product, no per-pair RoPE.
        self.rkeys = _buffer((n_kv, cap, head_dim), dtype, self.device) if rotated else None
        self.positions = torch.empty(cap, dtype=torch.long, device=self.device)  # every entry's, not a ring
        self.heads = (
            [] if block_size else [HeadIndex(head_dim, spec, use_gpu=self.device.type == "cuda") for _ in range(n_kv)]
        )
        if block_size and cap % block_size:
            raise MemtxError(f"block size {block_size} must divide {cap}")
        # Block representatives (KV, blocks, D), float32: the mean of each block's raw keys
        # (fixed positions), and with rotated=True also of its rotated keys (true / clamped).
        nb = cap // max(1, block_size)
        means = block_size and not near_only
        self.reps = torch.empty(n_kv, nb, head_dim, device=self.device) if means else None
        self.rreps = torch.empty(n_kv, nb, head_dim, device=self.device) if means and rotated else None
        self.pk = self.pv = None
        if packed and rotated and block_size and block_size % 32 == 0 and dtype == torch.bfloat16:
            pcap = min(-(-packed // 1024) * 1024, cap)
            self.pk = _buffer((n_kv, pcap // block_size, block_size * head_dim), dtype, self.device)
            self.pv = _buffer((n_kv, pcap // block_size, block_size * head_dim), dtype, self.device)
        self.search_seconds = 0.0
        # The last exact relevance and what it was computed from: decoding asks for a chunk's
        # blocks once per token with the same voters (~1.5 ms per layer), scoring once per chunk.
        self._exact_cache: tuple | None = None
        self._pick_cache: tuple | None = None  # the same for `_near_picks` (the kernel path)

    def __len__(self) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return self.values.shape[1]

    def _slot(self, i: int) -> int:
        """Row of entry i in the buffers."""
        return i % self.ring if self.ring else i

    def _put(self, buf: torch.Tensor, i: int, x: torch.Tensor) -> None:
        """buf's rows of entries i..i+len-1 = x (KV, len, D), wrapping around a ring."""
        a, t = self._slot(i), x.shape[1]
        if a + t <= buf.shape[1]:
            buf[:, a : a + t] = x
        else:
            cut = buf.shape[1] - a
            buf[:, a:] = x[:, :cut]
            buf[:, : t - cut] = x[:, cut:]

    def _rows(self, buf: torch.Tensor, i: int, j: int) -> list[tuple[int, torch.Tensor]]:
        """Entries i..j-1 of buf as (first entry id, (KV, len, D) view) pieces, in order: one
        piece unless they wrap around a ring (j - i <= capacity)."""
        a = self._slot(i)
        if a + (j - i) <= buf.shape[1]:
            return [(i, buf[:, a : a + j - i])]
        cut = buf.shape[1] - a
        return [(i, buf[:, a:]), (i + cut, buf[:, : j - i - cut])]

    def _grow(self, need: int) -> None:
        if need > self.positions.shape[0]:  # positions of every entry, also with a ring
            pos = torch.empty(max(need, 2 * self.positions.shape[0]), dtype=torch.long, device=self.device)
            pos[: self.n] = self.positions[: self.n]
            self.positions = pos
        cap = self.capacity
        if need <= cap or self.ring:
            return
        new = -(-max(need, 2 * cap) // 1024) * 1024  # whole blocks (block sizes divide 1024)
        for name in ("keys", "values", "rkeys"):
            old = getattr(self, name)
            if old is None:
                continue
            buf = _buffer((self.n_kv, new, self.head_dim), old.dtype, old.device)
            buf[:, : self.n] = old[:, : self.n]
            setattr(self, name, buf)
        nb = -(-self.n // max(1, self.block_size))
        for name in ("reps", "rreps"):
            old = getattr(self, name)
            if old is not None:
                reps = torch.empty(self.n_kv, new // self.block_size, self.head_dim, device=self.device)
                reps[:, :nb] = old[:, :nb]
                setattr(self, name, reps)

    def add(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rotated_k: torch.Tensor | None = None,
        index_rotated: bool = False,
    ) -> None:
        """Append entries. k, v: (KV, T, D) raw; positions (T,) absolute; rotated_k: k rotated
        by `positions` (kept when the memory was made with rotated=True); index_rotated: the
        index holds rotated_k instead of k (the `true` scheme)."""
        t = k.shape[1]
        if t == 0:
            return
        self._grow(self.n + t)
        if t > self.capacity:  # a ring: only the last entries stay
            k, v, positions = k[:, -self.capacity :], v[:, -self.capacity :], positions[-self.capacity :]
            rotated_k = None if rotated_k is None else rotated_k[:, -self.capacity :]
            self.positions[self.n : self.n + t - self.capacity] = -1  # never read (long out of reach)
            self.n += t - self.capacity
            t = self.capacity
        if self.keys is not None:
            self._put(self.keys, self.n, k)
        self._put(self.values, self.n, v)
        self.positions[self.n : self.n + t] = positions
        if self.rkeys is not None:
            self._put(self.rkeys, self.n, rotated_k)
        old = self.n
        self.n += t
        end = -(-self.n // self.block_size) * self.block_size if self.block_size else self.n
        for buf in (self.keys, self.values, self.rkeys):  # the last partial block's unused tail
            if buf is not None and end > self.n:  # a block never wraps: capacities are whole blocks
                buf[:, self._slot(self.n) : self._slot(self.n) + end - self.n] = 0
        self._exact_cache = self._pick_cache = None
        if self.block_size:
            if self.reps is not None:
                self._update_reps(old)
            if self.pk is not None:
                self._pack(old)
            return
        ids = np.arange(old, old + t, dtype=np.int64)
        ik = (rotated_k if index_rotated else k).detach().float().cpu().numpy()
        for h, head in enumerate(self.heads):
            head.add(np.ascontiguousarray(ik[h]), ids)

    def _pack(self, old: int) -> None:
        """Pack the blocks that entries old..n touched into pk / pv (attn_kernel.pack_rows:
        per 32 keys, keys as [2 x 16 keys][D/2 pairs][16][2], values as [16 key pairs][D][2]),
        in runs that wrap neither the rows' ring nor the packed one."""
        b, pb = self.block_size, self.pk.shape[1]
        first, last = old // b, -(-self.n // b)  # blocks [first, last)
        first = max(first, last - pb)
        rows_b = self.capacity // b  # blocks in the row buffers
        i = first
        while i < last:
            r0, p0 = (i % rows_b if self.ring else i), i % pb
            j = min(last, i + pb - p0, i + rows_b - r0 if self.ring else last)
            k, v = self.rkeys[:, r0 * b : (r0 + j - i) * b], self.values[:, r0 * b : (r0 + j - i) * b]
            pk, pv = self.pk[:, p0 : p0 + j - i], self.pv[:, p0 : p0 + j - i]
            if not attn_kernel.pack_rows(k, v, pk, pv):  # no kernel here: no packed copies
                self.pk = self.pv = None
                return
            i = j

    def _update_reps(self, old: int) -> None:
        """Recompute the representatives of the blocks that entries old..n touched."""
        b = self.block_size
        first, last = old // b, -(-self.n // b)  # blocks [first, last)
        full_end = self.n // b
        for reps, src in ((self.reps, self.keys), (self.rreps, self.rkeys)):
            if reps is None:
                continue
            if full_end > first:
                x = src[:, first * b : full_end * b].float().view(self.n_kv, full_end - first, b, -1)
                reps[:, first:full_end] = x.mean(2)
            if last > full_end:  # a partial block at the end
                reps[:, full_end] = src[:, full_end * b : self.n].float().mean(1)

    def retrieve_blocks(
        self,
        sel: torch.Tensor,
        n_blocks: int,
        scale: float,
        scheme: str = "fixed",
        near: torch.Tensor | None = None,
        spread: int = 0,
        far_blocks: int = -1,
        far_bias: float = 0.0,
        raw_keys: bool | None = None,
        exact: bool = False,
        budgets: torch.Tensor | None = None,
        gather: bool = True,
    ) -> BlockRetrieval | BlockPicks:
        """Per KV head and selector, the `n_blocks` most relevant blocks (`block_relevance`);
        sel (KV, C, D) sums of search vectors or (KV, C, Q, D) voters (model.block_selectors);
        returns (KV*C, M, ...) tensors with M = n_blocks x block size. raw_keys: gather the
        raw keys too (None: unless clamped near-only, where every block is read through its
        rotated keys; `keys` is then None).

        Clamped budgets: `far_blocks` -1 = one budget for near and far blocks; 0 = near blocks
        only; > 0 = `n_blocks` near plus `far_blocks` far ones, far relevance lowered by
        `far_bias` (far blocks sit at the fixed distance, closer than their real one, and crowd
        out near ones). With voters the relevance is a log share, so the bias is a prior e^-b.
        exact: with voters and separate budgets, near blocks are scored by the voters' exact
        attention (`block_relevance`).
        budgets (KV,): head h reads only its best budgets[h] blocks (<= n_blocks) of the first
        (near or shared) budget; the blocks then come best first, not in document order, and
        the others are invalid, so a caller may cut each row to its head's first blocks.
        gather=False: the picks only (BlockPicks), for the caller to gather each head's own
        budget (`gather_blocks(pick[h0:h1, :, :budget], head0=h0)`): with budgets, gathering every
        head's rows to the layer's largest budget copied 3,536 blocks per chunk where the card's
        budgets read 2,336.
        """
        import time

        t0 = time.perf_counter()
        separate = scheme == "clamped" and far_blocks >= 0  # near and far blocks compete apart
        # Near blocks only: they are the last blocks of the memory (the ones starting within
        # `horizon` of the chunk), so only that suffix is scored. At 64K tokens it is ~240 of
        # ~2,000 blocks; voters then share their attention among the blocks they can read.
        near_only = separate and not far_blocks
        first = 0
        if near_only:
            first = min(self.n_blocks - int(near.sum(-1).max()), self.n_blocks - 1)  # >= 1 block, maybe masked
            near = near[:, first:]
        exact = exact and separate and sel.dim() == 4
        if exact and near_only and budgets is not None and not gather and scheme == "clamped":
            # the default path: block maxima and then the picks in two kernel calls
            got = self._near_picks(sel.float(), near, scale, first, spread, n_blocks)
            if got is not None:
                self.search_seconds += time.perf_counter() - t0
                return BlockPicks(got[0], got[1] > float("-inf"), raw_keys if raw_keys is not None else False)
        # (KV, C, nb - first); near-only masks the far blocks below, so exact needs no means for them
        relevance = self.block_relevance(sel.float(), scheme, near, scale, first, exact, far_means=not near_only)
        nb = relevance.shape[-1]
        if not separate:  # one budget
            parts = [relevance]
            sizes = [n_blocks]
        else:
            parts = [relevance.masked_fill(~near, float("-inf"))]
            sizes = [n_blocks]
            if far_blocks:
                parts.append(relevance.masked_fill(near, float("-inf")) - far_bias)
                sizes.append(far_blocks)
        picks, scores = [], []
        for rel, m in zip(parts, sizes, strict=True):
            if spread:  # a block also counts as relevant as the `spread` blocks before it
                rel = spread_forward(rel, spread)
            values, indices = top_blocks(rel, min(m, nb))
            picks.append(indices + first)
            scores.append(values)
        pick, score = torch.cat(picks, -1), torch.cat(scores, -1)  # (KV, C, m), best first per budget
        if budgets is None:  # in document order (with budgets, head h reads its first budgets[h])
            pick, order = pick.sort(-1)
            score = score.gather(-1, order) if separate else score
        # a budget larger than its blocks picks some at -inf: mask them
        ok = score > float("-inf") if separate else None
        raw = raw_keys if raw_keys is not None else not near_only
        if not gather:
            self.search_seconds += time.perf_counter() - t0
            return BlockPicks(pick, ok, raw)
        if budgets is not None:  # past a head's own budget: not read
            rank = torch.arange(pick.shape[-1], device=pick.device)
            within = (rank[None] < budgets.to(pick.device)[:, None]) | (rank[None] >= picks[0].shape[-1])  # (KV, m)
            ok = within[:, None].expand_as(pick) if ok is None else ok & within[:, None]
        out = self.gather_blocks(pick, raw, ok=ok)
        out.pick = pick
        if separate and far_bias and far_blocks > 0:  # the same prior in the attention scores
            far_pick = ~near.expand_as(relevance).gather(-1, pick)  # (KV, C, m)
            out.bias = (far_pick.repeat_interleave(self.block_size, -1).view_as(out.valid) * -far_bias).float()
        self.search_seconds += time.perf_counter() - t0
        return out

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block_size)

    def block_starts(self) -> torch.Tensor:
        """(nb,) absolute position of every block's first entry."""
        return self.positions[: self.n : self.block_size]

    def block_relevance(
        self,
        sel: torch.Tensor,
        scheme: str = "fixed",
        near: torch.Tensor | None = None,
        scale: float = 1.0,
        first: int = 0,
        exact: bool = False,
        far_means: bool = True,
    ) -> torch.Tensor:
        """Selectors -> (KV, C, nb - first) relevance of blocks first..nb-1 (`near` (C, nb - first)).

        sel (KV, C, D): one summed query per chunk; relevance = its inner product with the block's
        mean key (= the summed queries' total attention logit on the block's keys).
        sel (KV, C, Q, D): Q voters per chunk (zero rows: none); each attends over the block means
        (softmax of scale * q . mean key) and relevance = log of the largest share any voter
        gives the block. A sum lets the many queries that read nothing in particular drown the
        few that read one passage; a vote keeps that passage on top.

        Block means are of raw keys for `fixed` (the queries rotated to the fixed distance), of
        keys rotated by their positions for `true`; `clamped` selectors hold both halves
        [fixed | true] and `near` (C, nb) says which blocks lie within the trained context of the
        chunk (true score there, fixed-distance score beyond).

        exact (clamped, voters): a near block is instead scored by its keys themselves
        (`_exact_relevance`: the true half against the rotated keys, the exact logits). A mean
        key scores a block as if its keys were one: a block whose one key matches the voter
        ranks below a block of middling ones. Far blocks keep the means' score (far_means) or
        get the floor (the caller reads near blocks only)."""
        nb = self.n_blocks
        voting = sel.dim() == 4
        if exact and voting and scheme == "clamped":
            hit = self._exact_cache
            if hit is not None and hit[0] == (first, scale) and torch.equal(hit[1], sel) and torch.equal(hit[2], near):
                rel = hit[3]
            else:
                rel = self._exact_relevance(sel[..., self.head_dim :], near, scale, first)
                self._exact_cache = ((first, scale), sel, near, rel)
            if not far_means or bool(near.all()):  # far blocks: the floor (or none)
                return rel
            return torch.where(near, rel, self.block_relevance(sel, scheme, near, scale, first))  # far: means

        def dot(x: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:  # x (KV, C, [Q,] D) -> (KV, C, [Q,] nb)
            r = reps[:, first:nb]  # (KV, nb - first, D)
            return x @ (r[:, None] if voting else r).transpose(-1, -2)

        if scheme == "fixed":
            s = dot(sel, self.reps)
        elif scheme == "true":
            s = dot(sel, self.rreps)
        else:
            d = self.head_dim
            s = dot(sel[..., d:], self.rreps)
            if not bool(near.all()):  # blocks beyond the trained context: the fixed-distance score
                s = torch.where(near[:, None] if voting else near, s, dot(sel[..., :d], self.reps))
        if not voting:
            return s
        share = (s * scale).log_softmax(-1)  # (KV, C, Q, nb)
        # Zero rows are no voters; the floor is finite, so a chunk without any still picks blocks.
        share = share.masked_fill((sel == 0).all(-1)[..., None], -1e30)
        return share.amax(-2)

    def _exact_relevance(self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int) -> torch.Tensor:
        """Voters sel (KV, C, Q, D) at their absolute positions -> (KV, C, nb - first) relevance of
        blocks first.. (`near` (C, nb - first)): the log of the voters' summed softmax over the
        near blocks, each block scored by its best key's exact logit; zero rows are no voters.
        Far blocks get the floor.

        Why the best key: a voter's softmax over every memory, summed per block, held 90.9% /
        91.7% of the next chunk's attention mass (book / code at 8K, 96 blocks); over each
        block's best logit 90.6% / 91.4%, with exponentials of one value per block instead of
        one per memory (block means: 78.9% / 83.2%). README "Exact block selection"."""
        b = self.block_size
        kv, nc, nq, d = sel.shape
        lo, near, pieces, voters, fused = self._voter_maxima(sel, near, scale, first)
        nbn = near.shape[1]
        start = (first + lo) * b
        if fused is not None:
            best = fused.view(kv, nbn, nc, nq).permute(0, 2, 3, 1)  # (KV, C, Q, nbn) best key
        else:
            # One matmul per head for all chunks' voters, keys as the row operand (their natural
            # layout: 1.4 ms vs 4.2 ms for voters @ keys^T, 3 heads x 192 voters x 7,400 keys in
            # bfloat16), in the keys' dtype; the maxima in float32 (bfloat16's amax is 5x slower).
            keys = pieces[0][1] if len(pieces) == 1 else torch.cat([x for _, x in pieces], 1)  # (KV, nbn*b, D)
            logits = (keys @ voters.transpose(-1, -2)).float()  # (KV, nbn*b, C*Q)
            tail = self.n - start
            if tail < nbn * b:
                logits[:, tail:] = float("-inf")
            best = logits.view(kv, nbn, b, nc, nq).amax(2).permute(0, 2, 3, 1)  # (KV, C, Q, nbn) best key
        best.masked_fill_(~near[None, :, None], float("-inf"))
        share = best.softmax(-1).nan_to_num_(0.0)  # a chunk with nothing near: no share
        share = (share * (sel != 0).any(-1)[..., None]).sum(2)  # (KV, C, nbn): zero rows don't vote
        return torch.nn.functional.pad(share, (lo, 0)).clamp_min(1e-30).log()  # (KV, C, nb - first)

    def _voter_maxima(
        self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int
    ) -> tuple[int, torch.Tensor, list[tuple[int, torch.Tensor]], torch.Tensor, torch.Tensor | None]:
        """Voters sel (KV, C, Q, D) (the true half) -> lo (the first block, counted from
        `first`, that any chunk reads near), near[:, lo:], the rotated keys of those blocks (pieces:
        [(first id, (KV, len, D))]), the scaled voters (KV, C*Q, D) and their block maxima
        (KV, nbn, C*Q) from attn_kernel.block_max (None where it cannot run)."""
        b = self.block_size
        kv, nc, nq, d = sel.shape
        # Near blocks are a suffix of every chunk's blocks: score from the first near one only.
        lo = int(near.any(0).int().argmax())
        near = near[:, lo:]
        start = (first + lo) * b
        # Whole blocks (the buffer's capacity is whole blocks); the tail past n is masked below.
        # Rotated by their positions; two pieces where a ring wraps (block_max is per piece).
        pieces = self._rows(self.rkeys, start, start + near.shape[1] * b)  # [(first id, (KV, len, D))]
        voters = sel.reshape(kv, nc * nq, d).mul(scale).to(self.rkeys.dtype)  # (KV, C*Q, D)
        # In bfloat16 on AVX512-BF16, attn_kernel fuses the maxima into the product (float32
        # logits, never written out: the bfloat16 -> float32 copy of the logits alone took
        # 52-87 ms per 512-token segment at 24K, README "A bfloat16 attention kernel").
        parts = [attn_kernel.block_max(x, voters, b, self.n - i) for i, x in pieces]
        fused = None if any(p is None for p in parts) else torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return lo, near, pieces, voters, fused

    def _near_picks(
        self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int, spread: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """retrieve_blocks' near-only exact selection in two kernel calls (block_max, then
        attn_kernel.block_pick for the softmax, sum, log, spread and top m that took ~20 torch
        ops per layer): picks (KV, C, m') best first and their relevance. None where the kernels
        cannot run (the caller's torch path computes the same)."""
        key = (first, scale, spread, m)
        hit = self._pick_cache  # decoding asks once per token with the same voters
        if hit is not None and hit[0] == key and torch.equal(hit[1], sel) and torch.equal(hit[2], near):
            return hit[3]
        lo, nr, _, voters, fused = self._voter_maxima(sel[..., self.head_dim :], near, scale, first)
        got = None if fused is None else attn_kernel.block_pick(fused, nr, voters, lo, spread, m, first)
        self._pick_cache = None if got is None else (key, sel, near, got)
        return got

    def gather_blocks(
        self, pick: torch.Tensor, raw_keys: bool = True, head0: int = 0, ok: torch.Tensor | None = None
    ) -> BlockRetrieval:
        """Blocks pick (KV', C, m) of the heads head0..head0+KV'-1 -> their entries as
        (KV'*C, m*b, ...) tensors (raw keys only when asked for: a third of the bytes copied);
        ok (KV', C, m): False marks a pick's entries invalid (not to be read)."""
        b = self.block_size
        kv, nc, m = pick.shape
        capb = self.capacity // b
        heads = torch.arange(head0, head0 + kv, device=self.device).view(kv, 1, 1)
        flat = ((pick % capb if self.ring else pick) + heads * capb).reshape(-1)

        def gather(buf: torch.Tensor) -> torch.Tensor:  # (KV, cap, D) -> (KV*C, m*b, D)
            # Rows of whole blocks (b*D contiguous elements): a 2-D index_select, 2.5x faster
            # than gathering (b, D) slabs from a 3-D view.
            return select_rows(buf.view(-1, b * self.head_dim), flat).view(kv * nc, m * b, -1)

        ids = (pick[..., None] * b + torch.arange(b, device=self.device)).view(kv * nc, m * b)
        valid = ids < self.n
        if ok is not None:
            valid &= ok.repeat_interleave(b, -1).view_as(valid)
        return BlockRetrieval(
            keys=gather(self.keys) if raw_keys or self.rkeys is None else None,
            rkeys=gather(self.rkeys) if self.rkeys is not None else None,
            values=gather(self.values),
            valid=valid,
            # Key positions only where real distances are used (not on the default fixed path).
            positions=None
            if self.rkeys is None
            else self.positions[: self.n].index_select(0, ids.clamp(max=self.n - 1).reshape(-1)).view_as(ids),
        )

    def block_attention(
        self, q: torch.Tensor, pick: torch.Tensor, ok: torch.Tensor | None, head0: int, rotated: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # (KV'*C, M, D), (KV'*C, M) float32
        """Attention of q (KV'*C, M, D) (rows head-major: head head0 + i // C, chunk i % C) over
        the blocks pick (KV', C, m) of heads head0.. as stored (rotated: the rotated keys, else
        the raw ones), read in place by attn_kernel.block_attention: what gather_blocks +
        model.attention_with_lse compute, without the gather (keys, values, positions, validity)
        or a mask; ok (KV', C, m) False masks a pick. None where the kernel cannot run."""
        kv, nc, m = pick.shape
        heads = torch.arange(head0, head0 + kv, device=pick.device).repeat_interleave(nc)  # (KV'*C,)
        keys = self.rkeys if rotated else self.keys
        ok = None if ok is None else ok.reshape(kv * nc, m)
        packed = None  # the packed copies hold the last pk.shape[1] blocks
        if rotated and self.pk is not None and int(pick.min()) >= self.n_blocks - self.pk.shape[1]:
            packed = (self.pk, self.pv)
        return attn_kernel.block_attention(
            q, keys, self.values, heads, pick.reshape(kv * nc, m), ok, self.block_size, self.n, scale, self.ring, packed
        )

    def retrieve_far(self, q: torch.Tensor, k: int, bound: int, rows: list[int] | None = None) -> Retrieval:
        """Block memory: each query's own top-k among entries 0..bound-1 (the memories older than
        the trained context), by exact inner product. q (R, Q, D) search vectors (the queries
        rotated to the fixed distance, scored against raw keys) of the memory's heads `rows`
        (None: all of them, R = KV). Returns (R, Q, min(k, bound), ...) tensors, no rotated keys
        (far memories sit at the fixed distance).

        Keys kept in a 16-bit dtype (the model's bfloat16): the scores come from one matmul in
        that dtype (AVX512-BF16 runs it ~4x faster than float32, and no float32 copy of the keys
        is made), which shortlists 2k candidates; their float32 scores pick the top k. Rounding
        the scores to 8 bits of mantissa moves a key by far less than the gap between the k-th
        and 2k-th best. One head, 64 queries: 1.7 / 2.9-3.4 ms at 28,000 / 56,000 keys against
        2.4-2.6 / 6.4-8.1 ms in float32 (`benchmarks/far_search_timing.py`, session 19); the
        shortlist (`top_rows`) is most of it. Where attn_kernel runs, the model calls
        `far_attention` instead: this search and the attention in one kernel call per head."""
        import time

        t0 = time.perf_counter()
        bound = min(bound, self.n)
        kk = min(k, bound)
        rows = list(range(q.shape[0])) if rows is None else rows
        # One 2-D matmul per head: keys[:, :bound] is strided across heads, and a batched matmul
        # over it copies every key first (4.7 vs 2.3 ms per call, real far searches at 32K).
        low = self.keys.dtype in (torch.bfloat16, torch.float16)
        if not low or 2 * kk >= bound:
            parts = [q[i].float() @ self.keys[h, :bound].float().t() for i, h in enumerate(rows)]
            idt = exact_top_k(torch.stack(parts), kk)  # (R, Q, k')
        else:  # a shortlist of 2k by 16-bit scores, rescored in float32
            qd = q.to(self.keys.dtype)
            cand = torch.stack([top_rows(self.keys[h, :bound], qd[i], 2 * kk) for i, h in enumerate(rows)])
            ck = select_rows(self.keys.view(-1, self.head_dim), self._flat_ids(cand, rows)).view(*cand.shape, -1)
            exact = torch.einsum("rqd,rqcd->rqc", q.float(), ck.float())
            idt = cand.gather(-1, exact.topk(kk, dim=-1, sorted=False).indices)
        self.search_seconds += time.perf_counter() - t0
        return self._gather_entries(idt, torch.ones_like(idt, dtype=torch.bool), False, rows)

    def far_attention(
        self,
        q: torch.Tensor,  # (R, T, D) search vectors, as retrieve_far's
        qa: torch.Tensor,  # (R, G, T, D) attention queries (rotated to the fixed distance)
        bound: torch.Tensor,  # (T,) token i reads among entries 0..bound[i]-1
        k: int,
        scale: float,
        bias: float,
        rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # (R, G, T, D) in qa's dtype, (R, G, T) float32
        """`retrieve_far` and the attention over what it finds (scores scale * q.k - bias), fused
        in attn_kernel.far_attention: one call per head for all tokens, each with its own bound;
        no keys or values gathered. The same entries as retrieve_far (its shortlist of 2k by
        bfloat16 scores, rescored in float32). None where the kernel cannot run."""
        import time

        t0 = time.perf_counter()
        rows = list(range(q.shape[0])) if rows is None else rows
        outs, lses = [], []
        for i, h in enumerate(rows):
            keys, values = self.keys[h, : self.n], self.values[h, : self.n]
            got = attn_kernel.far_attention(keys, values, q[i], qa[i], bound, k, scale, bias)
            if got is None:
                return None
            outs.append(got[0])
            lses.append(got[1])
        self.search_seconds += time.perf_counter() - t0
        return torch.stack(outs).to(qa.dtype), torch.stack(lses)

    def retrieve(self, q: torch.Tensor, k: int) -> Retrieval:
        """Top-k entries for every query. q: (KV, Q, D) search vectors (Q = G*T: a GQA group's
        queries share their head's index, one search call per head)."""
        import time

        t0 = time.perf_counter()
        qn = q.detach().float().cpu().numpy()
        ids = np.stack(
            [self.heads[h].search(np.ascontiguousarray(qn[h]), k, self.keys[h, : self.n]) for h in range(self.n_kv)]
        )  # (KV, Q, k)
        self.search_seconds += time.perf_counter() - t0
        idt = torch.from_numpy(ids).to(self.device)
        return self._gather_entries(idt.clamp(min=0), idt >= 0, rotated=True)

    def _flat_ids(self, idt: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """Entries idt (R, Q, k) of the heads `rows` (None: all) -> rows of the (KV*cap, D) view
        of a buffer (head h's entry id is row h*cap + id), flattened."""
        r = idt.shape[0]
        heads = torch.arange(r, device=self.device) if rows is None else torch.tensor(rows, device=self.device)
        return (idt + heads.view(r, 1, 1) * self.capacity).reshape(-1)

    def _gather_entries(
        self, idt: torch.Tensor, valid: torch.Tensor, rotated: bool, rows: list[int] | None = None
    ) -> Retrieval:
        """Entries idt (R, Q, k) of the heads `rows` (None: all, R = KV) -> (R, Q, k, ...)
        tensors (rotated keys only when asked for and kept)."""
        flat = self._flat_ids(idt, rows)  # one index_select per buffer

        def gather(buf: torch.Tensor) -> torch.Tensor:  # (KV, cap, D) -> (R, Q, k, D)
            return select_rows(buf.view(-1, self.head_dim), flat).view(*idt.shape, -1)

        return Retrieval(
            keys=gather(self.keys),
            rkeys=gather(self.rkeys) if rotated and self.rkeys is not None else None,
            values=gather(self.values),
            positions=self.positions.index_select(0, idt.reshape(-1)).view(idt.shape),
            valid=valid,
        )


@dataclass
class BlockPicks:
    """LayerMemory.retrieve_blocks(gather=False): the blocks chosen, not yet gathered."""

    pick: torch.Tensor  # (KV, C, m) block ids, best first per budget
    ok: torch.Tensor | None  # (KV, C, m) False where a pick is not to be read (-inf relevance)
    raw_keys: bool  # whether the caller needs raw keys (gather_blocks' raw_keys)


def select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (N, C)[idx]: index_select over rows, moving 16-bit rows as 64-bit words. torch's
    index_select copies bfloat16 element by element: 1.41 vs 0.11 ms for 1,792 rows of 2,048
    (a block of 32 keys, one head's budget of 224 for 8 chunks; scratch microbenchmark)."""
    w = 8 // x.element_size()  # elements per 64-bit word
    if w > 1 and x.stride(1) == 1 and x.shape[1] % w == 0 and x.stride(0) % w == 0 and x.storage_offset() % w == 0:
        return x.view(torch.int64).index_select(0, idx).view(x.dtype)
    return x.index_select(0, idx)


def top_rows(keys: torch.Tensor, q: torch.Tensor, m: int, group: int = 32) -> torch.Tensor:
    """Indices (Q, m) of the m rows of keys (N, D) with the largest inner products with each
    query of q (Q, D), in the keys' dtype; exact_top_k's two passes on the transposed scores.
    Keys as the matmul's row operand give scores (N, Q): the maxima of `group` consecutive keys
    are then a reduction over an outer axis, vectorised across the queries (over the inner axis
    of (Q, N) scores it was 11x slower in bfloat16: 3.8 vs 0.34 ms, one head, 64 queries, 56,000
    keys, a scratch microbenchmark), and no float32 copy of all the scores is made. A shortlist
    of 64 at 56,000 keys: 2.1-2.3 ms vs 3.1-3.5 (`benchmarks/far_search_timing.py`)."""
    s = keys @ q.t()  # (N, Q)
    n_all, nq = s.shape
    n = n_all // group * group
    if n // group <= m:  # too few groups to gain anything
        return s.t().float().topk(m, dim=-1, sorted=False).indices
    top_g = s[:n].view(n // group, group, nq).amax(1).t().float().topk(m, dim=-1, sorted=False).indices  # (Q, m)
    cand = (top_g[..., None] * group + torch.arange(group, device=s.device)).reshape(nq, m * group)
    if n < n_all:  # the partial last group: always a candidate
        cand = torch.cat([cand, torch.arange(n, n_all, device=s.device).expand(nq, -1)], -1)
    at = cand * nq + torch.arange(nq, device=s.device)[:, None]  # into the (N, Q) scores
    best = s.view(-1)[at.reshape(-1)].view(at.shape).float().topk(m, dim=-1, sorted=False).indices
    return cand.gather(-1, best)


def exact_top_k(scores: torch.Tensor, k: int, group: int = 32) -> torch.Tensor:
    """Indices of the k largest of scores (..., N) along the last axis, in two passes: the k
    groups of `group` consecutive scores with the largest maxima hold the k largest scores (a
    score outside them would have k larger group maxima above it), so only k * group
    candidates go through topk. Exact; 8.7 ms vs 13 ms for plain topk on (2, 64, 56,000)."""
    n = scores.shape[-1] // group * group
    if n // group <= k:  # too few groups to gain anything
        return scores.topk(k, dim=-1, sorted=False).indices
    lead = scores.shape[:-1]
    # Unsorted: callers need the set, and sorting costs ~30% more at these sizes.
    top_g = scores[..., :n].reshape(*lead, n // group, group).amax(-1).topk(k, dim=-1, sorted=False).indices
    cand = (top_g[..., None] * group + torch.arange(group, device=scores.device)).reshape(*lead, k * group)
    if n < scores.shape[-1]:  # the partial last group: always a candidate
        tail = torch.arange(n, scores.shape[-1], device=scores.device)
        cand = torch.cat([cand, tail.expand(*lead, -1)], -1)
    best = scores.gather(-1, cand).topk(k, dim=-1, sorted=False).indices
    return cand.gather(-1, best)


def top_blocks(rel: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of rel (..., n) and their indices, best first, ties to the later
    entry (as attn_kernel.block_pick). spread_forward gives a block's next ones its relevance,
    so ties are common and decide which blocks a budget reads: the later ones are the passage's
    continuation, what spread is for (Lua at 8K: 3.903 with ties to the earlier block)."""
    values, indices = rel.flip(-1).sort(dim=-1, descending=True, stable=True)
    return values[..., :m], rel.shape[-1] - 1 - indices[..., :m]


def spread_forward(rel: torch.Tensor, spread: int) -> torch.Tensor:
    """rel (..., nb) -> max(rel[b - s] for s in 0..spread): each block inherits the relevance of
    the blocks just before it. The selector comes from the previous chunk's queries; when they
    matched a passage (a copy), this chunk reads on past it, so the passage's next blocks are
    the ones it needs."""
    out = rel
    for s in range(1, min(spread, rel.shape[-1] - 1) + 1):
        out = torch.maximum(out, torch.nn.functional.pad(rel[..., :-s], (s, 0), value=float("-inf")))
    return out


class BankLayerMemory:
    """One memory layer of an on-disk bank (bank.py), read-only, for block retrieval: the
    block search runs in the bank's FAISS index of block means, keys/values come from the
    memory-mapped float16 arrays."""

    def __init__(
        self, bank, layer: int, dtype: torch.dtype, device: torch.device | str = "cpu", heads: list[int] | None = None
    ) -> None:
        self.bank, self.layer, self.dtype, self.device = bank, layer, dtype, torch.device(device)
        self.block_size = bank.geo.block_size
        # The KV heads read (--memory-heads); a bank stores every KV head of its layers.
        self.heads = list(range(bank.geo.n_kv)) if heads is None else list(heads)
        self.n_kv = len(self.heads)
        self.search_seconds = 0.0
        self.n_blocks = len(bank.live_blocks)  # the bank is read-only: counted once
        self.entries = bank.entries

    def __len__(self) -> int:
        return self.entries

    def search(self, qsum: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(KV, C, D) summed chunk queries -> scores (KV, C, m) and block ids (KV, C, m),
        -inf / -1 where the bank has fewer than m blocks."""
        qn = qsum.detach().float().cpu().numpy()
        scores, ids = [], []
        for j, h in enumerate(self.heads):
            d, i = self.bank.indexes[(self.layer, h)].search(np.ascontiguousarray(qn[j]), m)
            scores.append(d)
            ids.append(i)
        s = torch.from_numpy(np.stack(scores)).to(self.device)
        i = torch.from_numpy(np.stack(ids)).to(self.device)
        return s.masked_fill(i < 0, float("-inf")), i

    def gather_blocks(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ids (KV, C, m) (-1 = none) -> keys, values (KV, C, m*b, D), valid (KV, C, m*b)."""
        b = self.block_size
        kv, nc, m = ids.shape
        idn = ids.cpu().numpy()
        rows = np.maximum(idn, 0)[..., None] * b + np.arange(b)  # (KV, C, m, b) entry ids
        heads = np.asarray(self.heads).reshape(kv, 1, 1, 1)
        keys = self.bank.keys(self.layer)[rows, heads]  # (KV, C, m, b, D) float16
        values = self.bank.values(self.layer)[rows, heads]
        n_valid = self.bank.blocks[np.maximum(idn, 0), 1]  # (KV, C, m)
        valid = (np.arange(b) < n_valid[..., None]) & (idn[..., None] >= 0)

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype).view(kv, nc, m * b, -1)

        return t(keys), t(values), torch.from_numpy(valid).to(self.device).view(kv, nc, m * b)


class CompositeMemory:
    """A document's own memory plus a bank. Each keeps its own budget of blocks: the own
    memory's best `n_blocks` (exactly what it would give alone) plus the bank's best
    `bank_blocks`. Sharing one budget let the bank's many blocks crowd out the document's own
    past: on a held-out Lua file, 5.92 with a shared budget vs 5.17 with no bank at all."""

    def __init__(self, own: LayerMemory, bank: BankLayerMemory, bank_blocks: int, bank_bias: float = 0.0) -> None:
        self.own, self.bank = own, bank
        self.block_size = own.block_size
        self.bank_blocks, self.bank_bias = bank_blocks, bank_bias

    def __len__(self) -> int:
        return len(self.own) + len(self.bank)

    @property
    def search_seconds(self) -> float:
        return self.own.search_seconds + self.bank.search_seconds

    @property
    def rkeys(self) -> torch.Tensor | None:  # the own memory keeps rotated keys for clamped positions
        return self.own.rkeys

    def block_starts(self) -> torch.Tensor:
        return self.own.block_starts()

    def add(self, *args, **kwargs) -> None:  # the document's own past; the bank is read-only
        self.own.add(*args, **kwargs)

    def retrieve_far(self, q: torch.Tensor, k: int, bound: int, rows: list[int] | None = None) -> Retrieval:
        return self.own.retrieve_far(q, k, bound, rows)  # the own past only

    def far_attention(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.own.far_attention(*args, **kwargs)  # the own past only

    def retrieve_blocks(
        self,
        sel: torch.Tensor,
        n_blocks: int,
        scale: float,
        scheme: str = "fixed",
        near: torch.Tensor | None = None,
        spread: int = 0,
        far_blocks: int = -1,
        far_bias: float = 0.0,
        exact: bool = False,
        budgets: torch.Tensor | None = None,
    ) -> BlockRetrieval:
        """The own memory's best blocks (as it would give them alone), then the bank's. With
        clamped positions the bank's blocks, from other documents, are far memories: searched with
        the fixed-distance half of the selector and given positions beyond any horizon, so
        `model.clamp_keys` puts them at the fixed distance."""
        import time

        t0 = time.perf_counter()
        kv, nc = sel.shape[:2]
        d = self.own.head_dim
        m_b = min(self.bank_blocks, self.bank.n_blocks)
        # The bank's FAISS index takes one vector per chunk: voters (KV, C, Q, D) search summed.
        summed = sel.sum(2) if sel.dim() == 4 else sel
        _, bank_ids = self.bank.search(summed[..., :d].float(), m_b)  # (KV, C, m_b)
        bk, bv, bvalid = self.bank.gather_blocks(bank_ids)
        b = self.block_size
        bk, bv, bvalid = bk.view(kv * nc, m_b * b, -1), bv.view(kv * nc, m_b * b, -1), bvalid.view(kv * nc, m_b * b)
        own = None
        if len(self.own):
            own = self.own.retrieve_blocks(  # raw keys: the joined rows are rotated as far memories
                sel, n_blocks, scale, scheme, near, spread, far_blocks, far_bias, True, exact, budgets
            )
        n_own = 0 if own is None else own.keys.shape[1]

        def join(mine: torch.Tensor | None, bank: torch.Tensor) -> torch.Tensor:
            return bank if mine is None else torch.cat([mine.to(bank.dtype), bank], 1)

        keys = join(None if own is None else own.keys, bk)
        rkeys = positions = None
        if self.own.rkeys is not None:
            rkeys = join(None if own is None else own.rkeys, bk)  # bank keys: never used as near
            far = torch.full(bvalid.shape, -(2**40), dtype=torch.long, device=bvalid.device)
            positions = join(None if own is None else own.positions, far)
        bias = None
        if self.bank_bias or (own is not None and own.bias is not None):
            bias = torch.zeros(bvalid.shape[0], n_own + bvalid.shape[1], device=bvalid.device)
            bias[:, n_own:] = -self.bank_bias
            if own is not None and own.bias is not None:
                bias[:, :n_own] = own.bias
        self.bank.search_seconds += time.perf_counter() - t0
        return BlockRetrieval(
            keys=keys,
            rkeys=rkeys,
            values=join(None if own is None else own.values, bv),
            valid=join(None if own is None else own.valid, bvalid),
            bias=bias,
            positions=positions,
            bank_ids=bank_ids.reshape(kv * nc, m_b),
        )
