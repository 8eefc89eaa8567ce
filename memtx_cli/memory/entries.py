"""Entry storage of a memory layer: raw keys, rotated keys, values and positions of every
token read, per KV head, in buffers sized once (or a ring of the last entries); per block, the
mean keys block selection scores, and packed copies the attention kernel reads in place."""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np
import torch

from memtx_cli.errors import MemtxError
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.memory.index import HeadIndex, IndexSpec
from memtx_cli.memory.results import Retrieval

_HUGE = 2 << 20  # x86-64 transparent huge page


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed memory buffer. On Linux CPUs its whole 2 MiB pages are advised as huge pages
    (madvise MADV_HUGEPAGE; transparent huge pages are often "madvise"-only): fewer TLB misses
    for block reads and far searches that hop across the buffer. Zeroing it is its first touch,
    in bulk: page faults taken instead by each segment's small strided writes cost several times
    more, spread over the segments."""
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


class EntryStore:
    """Memory of one layer: all KV heads, raw keys + values + positions, one index per head."""

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
        bounds: bool = False,
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
        time, scratch A/B). For readers of near blocks only; others fall back to packing.
        bounds (block memory with raw keys): also keep each block's per-channel key minimum and
        maximum (`kmin`, `kmax`) for FarSearch's paged search (Config.far_pages)."""
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
        # every buffer again. `_buffer` zeroes them; `add`
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
        # Per-channel minimum and maximum of each block's raw keys: q . k <= sum over channels of
        # max(q_c min_c, q_c max_c) bounds a block's best score (Quest; FarSearch's pages).
        self.kmin = torch.empty(n_kv, nb, head_dim, device=self.device) if means and bounds else None
        self.kmax = torch.empty(n_kv, nb, head_dim, device=self.device) if means and bounds else None
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
    def own_entries(self) -> int:
        """Entries of the document's own past (all of them: a bank is not part of this memory)."""
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
        for name in ("reps", "rreps", "kmin", "kmax"):
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
        if self.kmin is not None:  # the keys' bounds, as the means (the partial block's own entries)
            if full_end > first:
                x = self.keys[:, first * b : full_end * b].float().view(self.n_kv, full_end - first, b, -1)
                self.kmin[:, first:full_end], self.kmax[:, first:full_end] = x.amin(2), x.amax(2)
            if last > full_end:
                x = self.keys[:, full_end * b : self.n].float()
                self.kmin[:, full_end], self.kmax[:, full_end] = x.amin(1), x.amax(1)

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block_size)

    def block_starts(self) -> torch.Tensor:
        """(nb,) absolute position of every block's first entry."""
        return self.positions[: self.n : self.block_size]

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


def select_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (N, C)[idx]: index_select over rows, moving 16-bit rows as 64-bit words. torch's
    index_select copies bfloat16 element by element: 1.41 vs 0.11 ms for 1,792 rows of 2,048
    (a block of 32 keys, one head's budget of 224 for 8 chunks; scratch microbenchmark)."""
    w = 8 // x.element_size()  # elements per 64-bit word
    if w > 1 and x.stride(1) == 1 and x.shape[1] % w == 0 and x.stride(0) % w == 0 and x.storage_offset() % w == 0:
        return x.view(torch.int64).index_select(0, idx).view(x.dtype)
    return x.index_select(0, idx)
