"""Block retrieval (InfLLM-style), causal: query chunks select whole blocks of memory with a
selector built from earlier queries only, then attend to every token in them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memtx_cli.attention.ops import attention_with_lse, memory_bias
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.memory.results import BlockRetrieval
from memtx_cli.model.llama import rotate_by


def block_read(
    q: torch.Tensor,  # (1, H, T, D) rotated by window position
    qr: torch.Tensor,  # (KVm, G, T, D) before RoPE, KV heads with memory
    groups: list[tuple[int, int, torch.Tensor]],  # from block_selectors
    mem: MemoryRead,
    inv_freq: torch.Tensor,
    qm: torch.Tensor | None = None,  # (KVm, G, T, D) qr rotated by q_pos, if already done
) -> tuple[torch.Tensor, torch.Tensor, list]:  # (KVm, G, T, D), (KVm, G, T), traced
    """Tokens select the `blocks` most relevant blocks of memory per KV head with a selector
    built from earlier queries only (`block_selectors`), then attend to every token in them.
    Tokens sharing a selector share one gather; all groups of one size go through one
    flash-attention call with the (KV head, group) pairs as its batch. The search runs over
    block representatives. Returns the attention over the memories alone and its log-sum-exp
    (the merge joins it with the local attention) and, with mem.trace, what weighing bank
    blocks needs."""
    reader = BlockReader(q, qr, mem, inv_freq, qm)
    buckets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # size -> [(token idx, sel)]
    for a, b, sel in groups:
        if sel.shape[1] == 1:  # one selector for the run
            buckets.setdefault(b - a, []).append((torch.arange(a, b, device=q.device), sel))
        else:  # one selector per token
            for i in range(b - a):
                buckets.setdefault(1, []).append((torch.tensor([a + i], device=q.device), sel[:, i : i + 1]))
    for size, items in buckets.items():
        reader.read_bucket(size, items)
    return reader.out_m, reader.lse_m, reader.traced


class ReadCache:
    """Decoding: what one layer's block read of a chunk gathered (blocks, keys as scored, values;
    per run of heads where gathered lazily), kept for the chunk's later tokens. Their selector is
    the chunk's (built from earlier chunks only), so while the memory has not grown they read
    exactly these blocks: a decoded token then gathers and rotates nothing."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.sels: torch.Tensor | None = None
        self.read: tuple | None = None  # got, km, vm, cut
        self.runs: dict[int, tuple] = {}  # h0 -> part, kr, vr (lazy gathers)

    def get(self, key: tuple, sels: torch.Tensor) -> tuple | None:
        if self.key == key and self.sels is not None and torch.equal(self.sels, sels):
            return self.read
        return None

    def keep(self, key: tuple, sels: torch.Tensor, read: tuple) -> None:
        self.key, self.sels, self.read, self.runs = key, sels, read, {}


@dataclass
class _Bucket:
    """Token groups of one size read together: their token indices and chunk bounds, and the
    memory's answer (gathered blocks, or the picks to gather per run of heads)."""

    idx: torch.Tensor  # (n, size) token indices
    q_first: torch.Tensor  # (n,) first position of each group's chunk
    q_last: torch.Tensor  # (n,) its last position
    got: BlockRetrieval
    lazy: bool  # gather per run of heads (per-head budgets) instead of every row whole
    in_place: bool  # lazy runs may read blocks where they are (attn_kernel)
    whole: bool  # one bucket of every token in order: views, not gathers
    cache: ReadCache | None = None  # decoding: runs' gathers kept for the chunk's next tokens

    @property
    def n(self) -> int:
        return self.idx.shape[0]

    @property
    def size(self) -> int:
        return self.idx.shape[1]


class BlockReader:
    """One segment's block reads of one layer: the output buffers and what each bucket needs."""

    def __init__(
        self, q: torch.Tensor, qr: torch.Tensor, mem: MemoryRead, inv_freq: torch.Tensor, qm: torch.Tensor | None
    ) -> None:
        kv, g, t, d = qr.shape
        self.kv, self.g, self.t, self.d = kv, g, t, d
        self.dtype, self.device = q.dtype, q.device
        self.mem, self.inv_freq, self.scale = mem, inv_freq, 1.0 / math.sqrt(d)
        if mem.scheme in ("true", "clamped"):  # R(a)q . R(b)k: the real distance
            qm = mem.at_positions(qr, inv_freq) if qm is None else qm
        else:  # every memory `distance` tokens back
            qm = rotate_by(qr, inv_freq, torch.full((1, 1, 1), mem.distance, device=qr.device))
        self.qm = qm.to(q.dtype)
        if mem.qmask is None:
            self.out_m = torch.empty(kv, g, t, d, dtype=q.dtype, device=q.device)
            self.lse_m = torch.empty(kv, g, t, dtype=torch.float32, device=q.device)
        else:  # query heads without memory keep nothing (weight 0)
            self.out_m = torch.zeros(kv, g, t, d, dtype=q.dtype, device=q.device)
            self.lse_m = torch.full((kv, g, t), float("-inf"), device=q.device)
        self.runs = query_runs(mem.qmask, kv, mem.head_blocks)
        self.traced: list = []  # with mem.trace: what is needed to weigh the bank blocks after the merge

    def keys(self, part: BlockRetrieval, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The keys of retrieved blocks as the position scheme scores them."""
        km = part.keys if self.mem.scheme == "fixed" else part.rkeys
        if self.mem.scheme == "clamped":  # rows are (KV head, group), head-major
            km = clamp_keys(part, first, last, self.mem, self.inv_freq)
        return km.to(self.dtype)

    def read_bucket(self, size: int, items: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        mem, kv = self.mem, self.kv
        idx = torch.stack([it[0] for it in items])  # (n, size)
        sels = torch.cat([it[1] for it in items], 1)  # (KV, n, D)
        near = None
        # (n,) the bounds of each group's chunk (not of the tokens of this call), so decoding
        # token by token draws the clamped near/far line where segment scoring does
        q_first = mem.q_pos[idx[:, 0]] // mem.chunk * mem.chunk
        q_last = q_first + mem.chunk - 1
        if mem.scheme == "clamped":  # blocks whose every key is within `horizon` of every query
            near = (q_last[:, None] - mem.memory.block_starts()[None]) <= mem.horizon  # (n, nb)
        how = (mem.blocks, self.scale, mem.scheme, near, mem.spread, mem.far_blocks, mem.far_bias)
        # Per-head budgets come best first: a run of heads reads its rows' first budget x b
        # entries. Without a bank's or far blocks filling the rows' tails, each run gathers
        # just those (lazy); otherwise every row is gathered whole and cut (the rest invalid).
        lazy = (
            mem.head_blocks is not None
            and mem.far_blocks <= 0
            and mem.trace is None
            and getattr(mem.memory, "gathers_by_head", False)
        )
        # Lazy runs may read blocks in place where every key is scored as stored (raw keys for
        # fixed, rotated for true and near-only clamped: clamp_keys keeps near keys as they are).
        in_place = lazy and (mem.scheme != "clamped" or mem.far_blocks == 0)
        key = None if mem.reuse is None else (tuple(q_first.tolist()), len(mem.memory))
        kept = None if mem.reuse is None else mem.reuse.get(key, sels)
        if kept is None:
            got = mem.memory.retrieve_blocks(
                sels, *how, exact=mem.exact_select, budgets=mem.head_blocks, **({"gather": False} if lazy else {})
            )  # (KV*n, M, ...), or the picks (lazy)
            km = vm = None
            cut = False
            if not lazy:
                km, vm = self.keys(got, q_first.repeat(kv), q_last.repeat(kv)), got.values.to(self.dtype)
                cut = mem.head_blocks is not None and got.bank_ids is None and mem.far_blocks <= 0
            if mem.reuse is not None:
                mem.reuse.keep(key, sels, (got, km, vm, cut))
        else:
            got, km, vm, cut = kept
        bk = _Bucket(idx, q_first, q_last, got, lazy, in_place, idx.numel() == self.t, mem.reuse)
        # Runs of consecutive KV heads whose groups read memory with as many query heads
        # (one run of all G without topqN) and blocks: one flash call each, over their rows.
        for h0, h1, qi in self.runs:
            self.read_run(bk, h0, h1, qi, km, vm, cut)
        if mem.trace is not None and got.bank_ids is not None:  # every query head (qmask weighs them)
            n = bk.n
            qq = self.qm[:, :, idx].permute(0, 2, 1, 3, 4).reshape(1, kv * n, self.g * size, self.d)
            m_bias = memory_bias(got, slice(None), km.shape[1], self.dtype)
            self.traced.append((idx, qq, km, m_bias, got.bank_ids, mem.memory.block_size))

    def read_run(
        self,
        bk: _Bucket,
        h0: int,
        h1: int,
        qi: torch.Tensor | None,
        km: torch.Tensor | None,
        vm: torch.Tensor | None,
        cut: bool,
    ) -> None:
        """Attention of KV heads h0..h1-1 (query heads qi of each group, None: all) over their blocks."""
        mem, got, n, size, d = self.mem, bk.got, bk.n, bk.size, self.d
        r, c, rows = h1 - h0, self.g if qi is None else qi.shape[1], slice(h0 * n, h1 * n)
        qh = self.qm[h0:h1] if qi is None else self.qm[h0:h1][torch.arange(r, device=self.device)[:, None], qi]
        qh = qh.unflatten(2, (n, size)) if bk.whole else qh[:, :, bk.idx]  # (r, c, n, size, D)
        qq = qh.permute(0, 2, 1, 3, 4).reshape(1, r * n, c * size, d)  # (1, r*n, c*size, D)
        o_lse = None
        if bk.lazy:  # this run's own blocks only
            nb_h = int(mem.head_blocks[h0])
            pick, ok = got.pick[h0:h1, :, :nb_h], None if got.ok is None else got.ok[h0:h1, :, :nb_h]
            if bk.in_place:  # read where they are (attn_kernel), else gathered
                o_lse = mem.memory.block_attention(qq[0], pick, ok, h0, mem.scheme != "fixed", self.scale)
            if o_lse is None:
                kept = None if bk.cache is None else bk.cache.runs.get(h0)
                if kept is None:
                    part = mem.memory.gather_blocks(pick, got.raw_keys, head0=h0, ok=ok)
                    kr, vr = self.keys(part, bk.q_first.repeat(r), bk.q_last.repeat(r)), part.values.to(self.dtype)
                    if bk.cache is not None:
                        bk.cache.runs[h0] = (part, kr, vr)
                else:
                    part, kr, vr = kept
                src, src_rows, span = part, slice(None), kr.shape[1]
        else:
            span = min(int(mem.head_blocks[h0]) * mem.memory.block_size, km.shape[1]) if cut else km.shape[1]
            kr, vr, src, src_rows = km[rows, :span], vm[rows, :span], got, rows
        if o_lse is not None:
            o, lse = o_lse
        else:
            mb = memory_bias(src, src_rows, span, self.dtype)
            o, lse = attention_with_lse(qq, kr[None], vr[None], mb, self.scale)
            empty = None if mb is None else ~src.valid[src_rows, :span].any(-1)  # (r*n,) nothing valid
            if empty is not None and bool(empty.any()):  # near-only, nothing near: weight 0
                lse = lse.masked_fill(empty[:, None], float("-inf"))
                o = o.masked_fill(empty[:, None, None], 0.0)
        o, lse = o.view(r, n, c, size, d).permute(0, 2, 1, 3, 4), lse.view(r, n, c, size).permute(0, 2, 1, 3)
        if qi is None and bk.whole:  # straight into place: one copy
            self.out_m[h0:h1].view(r, c, n, size, d).copy_(o)
            self.lse_m[h0:h1].view(r, c, n, size).copy_(lse)
            return
        flat = bk.idx.reshape(-1)
        o, lse = o.reshape(r, c, n * size, d), lse.reshape(r, c, n * size)
        if qi is None:
            self.out_m[h0:h1, :, flat], self.lse_m[h0:h1, :, flat] = o, lse
        else:
            at = (torch.arange(h0, h1, device=self.device)[:, None, None], qi[:, :, None], flat[None, None])
            self.out_m[at], self.lse_m[at] = o, lse


def block_selectors(
    qs: torch.Tensor,  # (KV, Gs, T, D) search vectors of consecutive tokens
    q_pos: torch.Tensor,  # (T,) their absolute positions
    chunk: int,
    state: dict[int, torch.Tensor],  # across calls: chunk id -> its sum (KV, D) or its voters
    votes: int = 0,
) -> list[tuple[int, int, torch.Tensor]]:
    """Causal selectors for block retrieval: groups (a, b, sel), tokens a..b-1 of this call.

    Positions are cut into chunks of `chunk`. A token of chunk c >= 1 selects blocks with chunk
    c-1 (complete before any token of chunk c is read), so a whole chunk shares one selection
    and no token's memory depends on a later token. votes = 0: the selector is the sum of chunk
    c-1's search vectors, sel (KV, 1, D). votes = n: the search vectors of its last n tokens, one
    per query head, sel (KV, 1, Gs*n, D), each to vote apart (LayerMemory.block_relevance).
    Tokens of chunk 0 have no earlier chunk: each selects with the vectors up to itself (the sum,
    or the last n, zero rows before the document's start: no vote), sel (KV, b-a, ...). Scoring a
    segment and decoding token by token therefore see the same memories. (Selecting with the
    chunk's own queries leaks later tokens into earlier predictions: at 8K it gave legal 7.82
    where the causal selector gives 9.10.)
    """
    vec = qs.detach()  # selection is not differentiated; float32 once cut to what is kept
    if not votes:
        vec = vec.float().sum(1)  # (KV, T, D)
    kv, t, d = vec.shape[0], vec.shape[-2], vec.shape[-1]
    p0 = int(q_pos[0])
    groups = []
    a = 0
    c = p0 // chunk
    while a < t:
        c = (p0 + a) // chunk
        b = min(t, (c + 1) * chunk - p0)
        before = state.get(c)  # this chunk's state from earlier calls
        if votes:
            # (KV, Gs, n, D); past chunk 0 only the last `votes` vectors are ever read
            part = vec[:, :, a:b] if c == 0 else vec[:, :, max(a, b - votes) : b]
            part = part.float()
            gs = part.shape[1]
            held = part if before is None else torch.cat([before, part], 2)
            state[c] = held[:, :, -votes:]
            if c == 0:  # token j's voters: the last `votes` vectors up to j, zero-padded in front
                padded = torch.cat([part.new_zeros(kv, gs, votes, d), held], 2)
                off = held.shape[2] - part.shape[2]  # vectors held before this call's first token
                win = padded.unfold(2, votes, 1)[:, :, off + 1 : off + 1 + part.shape[2]]  # (KV, Gs, n, D, votes)
                groups.append((a, b, win.permute(0, 2, 1, 4, 3).reshape(kv, b - a, gs * votes, d)))
            else:
                prev = state.get(c - 1)  # a whole chunk (>= votes tokens, Config checks) or none
                if prev is None:  # no earlier chunk seen: zero rows, no vote
                    prev = part.new_zeros(kv, gs, votes, d)
                groups.append((a, b, prev.reshape(kv, 1, gs * votes, d)))
        else:
            part = vec[:, a:b]  # (KV, n, D)
            if c == 0:
                cs = part.cumsum(1)
                groups.append((a, b, cs if before is None else cs + before[:, None]))
            else:
                prev = state.get(c - 1)
                groups.append((a, b, (prev if prev is not None else torch.zeros_like(part[:, 0]))[:, None]))
            state[c] = part.sum(1) if before is None else before + part.sum(1)
        a = b
    for key in [key for key in state if key < c - 1]:
        del state[key]
    return groups


def clamp_keys(
    got: BlockRetrieval,
    q_first: torch.Tensor,  # (KV*n,) first query position of each row's token group
    q_last: torch.Tensor,  # (KV*n,) last query position
    mem: MemoryRead,
    inv_freq: torch.Tensor,
) -> torch.Tensor:  # (KV*n, M, D)
    """Keys for the clamped scheme, to be scored against queries rotated by their absolute
    positions: a key within `horizon` of every query keeps its real distance (its stored
    rotation); an older one is rotated to sit `distance` tokens before the group's first query
    (distance .. distance + group length - 1 for the group's tokens), as the fixed scheme puts it."""
    near = ((q_last[:, None] - got.positions) <= mem.horizon) | ~got.valid  # (KV*n, M); padding: any
    if bool(near.all()):  # every key within the trained context (any document up to it): as stored
        return got.rkeys
    # One rotation per row (its group's start), broadcast over the row's keys: no per-key trig.
    far = rotate_by(got.keys, inv_freq, (q_first - mem.distance)[:, None])  # (KV*n, M, D)
    if not bool(near.any()):
        return far
    return torch.where(near[..., None], got.rkeys.to(far.dtype), far)


def query_runs(
    qmask: torch.Tensor | None, kv: int, blocks: torch.Tensor | None = None
) -> list[tuple[int, int, torch.Tensor | None]]:
    """(h0, h1, qi): runs of consecutive KV heads h0..h1-1 whose groups read memory with the
    same number of query heads (and the same number of blocks, `blocks` (KVm,) or None), qi
    (h1-h0, c) their indices in the group (None: all G). qmask (KVm, G) bool, None = every
    query head."""
    counts = [-1] * kv if qmask is None else qmask.sum(1).tolist()  # -1: every query head
    budget = [0] * kv if blocks is None else blocks.tolist()
    runs, h0 = [], 0
    for h in range(1, kv + 1):
        if h == kv or counts[h] != counts[h0] or budget[h] != budget[h0]:
            c = counts[h0]
            if c:
                qi = None if c < 0 or c == qmask.shape[1] else qmask[h0:h].nonzero()[:, 1].view(h - h0, c)
                runs.append((h0, h, qi))
            h0 = h
    return runs
