"""The streaming engine: documents through the model segment by segment.

`stream_nll` is the memtx way: segments of S tokens, each attending to itself plus the XL cache
(the previous segment's raw K/V). `full_nll` is the reference: plain causal attention over
chunks of the model's trained context (like llama.cpp's perplexity tool). Both score every
token but the first, so their numbers compare directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from memtx_cli.attention.blocks import ReadCache
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.config import Config, exact_block_select
from memtx_cli.engine import plan
from memtx_cli.errors import MemtxError
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.model.llama import LayerKV, RotatedWindow, Transformer, apply_rope, rope_cos_sin, token_nll

# progress(done_tokens, total_tokens): the library reports, the CLI draws.
Progress = Callable[[int, int], None]


def _noop(done: int, total: int) -> None:
    pass


class Streamer:
    """One document streaming through the model: XL cache, attention sinks, kNN memory.

    `step(ids)` runs one segment and returns its hidden states (T, C). Per memory layer, the
    segment reads the memory first (it never retrieves itself); afterwards the K/V that leave
    the XL cache (the previous segment) are written into it, tagged with their absolute
    positions. With `sinks` > 0 the document's first tokens stay visible in every window
    (StreamingLLM) and are kept out of the memory, so nothing is attended twice.

    expected_tokens: the document's length, if known (memory buffers sized once). Memories only
    read within the trained context (`_near_only`) keep no raw keys, and for long documents
    only their last entries (a ring); keep_all=True keeps everything (tools that inspect them).
    """

    def __init__(
        self, model: Transformer, cfg: Config, bank: Any = None, expected_tokens: int = 0, keep_all: bool = False
    ) -> None:
        from memtx_cli.memory.index import check_index_kind

        self.model, self.cfg = model, cfg
        a = model.args
        self._plan(model.embed.weight.device)
        if self.layers:
            check_index_kind(cfg.index)
        model.use_memory(self.layers)
        if cfg.combine == "gate" and self.layers:
            model.add_memory_params(self.layers, cfg.gate_init)
        self.memories = self._make_memories(bank, expected_tokens, keep_all)
        self.chunk_sums: dict[int, dict] = {i: {} for i in self.layers}  # block selectors' state
        # a bank on disk, read-only, joins the document's own memory
        self.bank_memories = {} if bank is None else join_bank(self, bank)
        # Where memories sit (fixed) / the largest distance used (clamped): just outside the
        # local window by default, i.e. the window's span (sinks + cache + segment).
        window = cfg.sinks + cfg.segment * (2 if cfg.xl_cache else 1)
        # Token-retrieval `clamped` caps distances at the trained context; block-retrieval
        # `clamped` puts memories older than the trained context just outside the window.
        at_window = cfg.positions == "fixed" or (cfg.positions == "clamped" and cfg.retrieval == "block")
        self.distance = cfg.mem_distance or (window if at_window else a.context_length)
        self.horizon = a.context_length - 1  # clamped: the largest real distance used
        sp = cfg.sink_positions
        self.real_sinks = sp == "real" or sp == "auto" and cfg.memory and cfg.positions in ("true", "clamped")
        self.cache: list[LayerKV] | None = None
        self.cache_pos = 0  # absolute position of the cache's first token
        self.sink_kv: list[LayerKV] | None = None
        self.pos = 0  # absolute position of the next token
        self.cur: list[list[LayerKV]] = []  # feed(): raw K/V of the unfinished segment, per piece
        self.cur_len = 0
        self.window: list[RotatedWindow] | None = None  # feed(): the segment's local windows
        self.read_caches: dict[int, ReadCache] = {}  # feed(): each memory layer's chunk read, reused
        self.trace: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # see MemoryRead.trace
        # Set by generation for the tokens that answer (a prompt's last, each new one): they also
        # read their own top answer-top-k among every memory (`answer_read`); needs keep_all.
        self.answering = False

    def _plan(self, dev: torch.device) -> None:
        """Which layers and heads read memory, and how much (engine/plan.py), as tensors on `dev`."""
        cfg, a = self.cfg, self.model.args
        # Memory layer -> its KV heads with memory (None = every head of the layer).
        self.heads = plan.heads_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads)
        self.layers = list(self.heads)
        # Memory layer -> (KVm, G) bool: which query heads of its memory KV heads read memory
        # (None = all of them; --memory-heads topqN selects query heads).
        self.qmasks: dict[int, torch.Tensor | None] = {}
        for i, qs in plan.query_heads_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads).items():
            mask = None
            if qs is not None:
                mask = torch.zeros(len(qs), a.n_heads // a.n_kv_heads, dtype=torch.bool, device=dev)
                for h, q in enumerate(qs):
                    mask[h, q] = True
            self.qmasks[i] = mask
        # Memory layer -> (KVm,) blocks each memory KV head reads (None = `blocks` for all):
        # "layer.head:n" budgets (memory heads differ in how many blocks hold their attention).
        budgets = plan.blocks_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads)
        self.head_blocks: dict[int, torch.Tensor | None] = {
            i: None if n is None else torch.tensor(n, device=dev) for i, n in budgets.items()
        }
        self.layer_blocks = {i: cfg.blocks if n is None else max(n) for i, n in budgets.items()}  # the most any reads
        # clamped: layers that also read memories older than the trained context (at the fixed distance)
        self.far_layers = set(plan.parse_layers(cfg.far_layers, a.n_layers)) if self.layers else set()
        # Memory layer -> the rows of its memory heads that read the far past token by token
        # (None = all, [] = none; far_layers x far_heads).
        self.far_rows = plan.far_rows_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads)
        # Memory layer -> the far reads' prior per far-reading row (0 for recall heads), or None
        biases = plan.far_bias_for(cfg, a.n_layers, a.n_kv_heads, a.n_heads).items()
        self.far_row_bias = {i: None if b is None else torch.tensor(b, device=dev) for i, b in biases}

    def _make_memories(self, bank: Any, expected_tokens: int, keep_all: bool) -> dict[int, Any]:
        """One LayerMemory per memory layer, sized for the document; near-only readers keep a ring."""
        from memtx_cli.memory.index import IndexSpec
        from memtx_cli.memory.store import LayerMemory

        cfg, model, a = self.cfg, self.model, self.model.args
        dev = model.embed.weight.device
        spec = IndexSpec(kind=cfg.index, nprobe=cfg.nprobe)
        rotated = cfg.positions != "fixed"  # true / clamped score memories at real distances
        wdt = model.embed.weight.dtype
        bs = cfg.block_size if cfg.retrieval == "block" else 0
        self.exact_select = exact_block_select(cfg.memory_settings())  # Config.block_select
        # Room for a document of `expected_tokens` at once: growing by doubling copies every entry.
        near_only = {i: bank is None and not keep_all and self._near_only(i) for i in self.heads}
        ring = a.context_length + max(cfg.segment, cfg.block_chunk) + 2 * max(cfg.block_size, 1)
        return {
            i: LayerMemory(
                len(h) if h else a.n_kv_heads,
                a.head_dim,
                spec,
                wdt,
                dev,
                rotated,
                bs,
                expected_tokens,
                near_only=near_only[i],
                # near-only readers reach `horizon` (+ a chunk, + block alignment) behind the newest
                # entry: older entries are never read again, so a ring keeps just those
                ring=ring if near_only[i] and ring < expected_tokens else 0,
                # blocks read in place by the kernel are kept packed too (the same horizon)
                packed=ring if bank is None and self._reads_near_in_place(i, dev) else 0,
                # FarSearch's paged search reads them: scoring's far reads (far-pages), or a
                # generation's answering reads (answer-pages; generation keeps every entry)
                bounds=cfg.far_pages > 0 or (cfg.answer_pages > 0 and keep_all),
            )
            for i, h in self.heads.items()
        }

    @property
    def memory_entries(self) -> int:
        return sum(len(m) for m in self.memories.values())

    @property
    def retrieval_seconds(self) -> float:
        return sum(m.search_seconds for m in self.memories.values())

    def _local_cache(self, segment_start: int | None = None) -> list[LayerKV] | None:
        """Sinks + XL cache for a segment starting at `segment_start` (default: the next token)."""
        window_start = self.cache_pos if self.cache else (self.pos if segment_start is None else segment_start)
        if not self.sink_kv or window_start <= self.cfg.sinks:
            return self.cache  # the sinks are still inside the window
        if self.cache is None:
            return self.sink_kv
        return [
            LayerKV(torch.cat([s.k, c.k], 2), torch.cat([s.v, c.v], 2))
            for s, c in zip(self.sink_kv, self.cache, strict=True)
        ]

    def _key_positions(self, cache: list[LayerKV] | None, seg_start: int, t: int) -> torch.Tensor | None:
        """Window positions of the local keys when the sinks sit at their real distance
        (`sink_positions: real`), or None (0..L+T-1: the sinks just before the cache). The
        window's first key after the sinks is at window position `sinks`; a sink at absolute
        position s goes to s - (that key's absolute position) + sinks, moved closer when the
        segment's last position would see it beyond the trained context (`horizon`). It depends
        on the segment's bounds only, so decoding token by token (`feed`) equals `step`."""
        n_s = self.cfg.sinks
        window_start = self.cache_pos if self.cache else seg_start  # as _local_cache decides
        if not self.real_sinks or not cache or not self.sink_kv or window_start <= n_s:
            return None
        shift = max(0, seg_start + self.cfg.segment - 1 - self.horizon)  # sink 0 at most horizon back
        sink = torch.arange(n_s) + shift - window_start + n_s  # (n_s,) negative: before the window
        return torch.cat([sink, torch.arange(n_s, cache[0].length + t)]).to(cache[0].k.device)

    def _reads(self, q_pos: torch.Tensor, decoding: bool = False) -> dict[int, MemoryRead]:
        rope = rope_cos_sin(self.model.inv_freq.to(q_pos.device), q_pos) if self.memories else None
        reads = {
            i: MemoryRead(
                m,
                self.cfg.top_k,
                q_pos,
                self.cfg.positions,
                self.distance,
                self.horizon,
                self.cfg.combine,
                self.cfg.shared_search,
                self.cfg.retrieval,
                self.layer_blocks[i],
                self.cfg.block_chunk,
                self.chunk_sums[i],
                self.trace,
                self.heads[i],
                self.cfg.block_spread,
                self._far_blocks(i),
                self.cfg.far_bias,
                votes=self.cfg.block_votes,
                far_top_k=self.cfg.far_top_k if self.far_rows[i] != [] else 0,
                far_rows=self.far_rows[i],
                far_scope=self.cfg.far_scope,
                far_row_bias=self.far_row_bias[i],
                far_pages=self.cfg.far_pages,
                qmask=self.qmasks[i],
                exact_select=self.exact_select,
                head_blocks=self.head_blocks[i],
                q_rope=rope,
                reuse=self.read_caches.setdefault(i, ReadCache()) if decoding else None,
            )
            for i, m in self.memories.items()
        }
        if self.answering:
            return {i: answer_read(r, self.cfg, self.model.args.n_kv_heads) for i, r in reads.items()}
        return reads

    def _far_blocks(self, i: int) -> int:
        """Layer i's far-block budget (clamped): the setting in far layers without far token reads."""
        return self.cfg.far_blocks if i in self.far_layers and not self.cfg.far_top_k else 0

    def _reads_near_in_place(self, i: int, dev: torch.device) -> bool:
        """Whether layer i's blocks are read by attn_kernel.block_attention where they are stored
        (LayerMemory packed): `plan.near_blocks_only`, on a CPU where the kernel's attention is
        the faster (elsewhere blocks are gathered for torch's flash kernel: docs/decisions.md,
        the bfloat16 kernel); far token reads allowed: they read the raw keys."""
        return (
            plan.near_blocks_only(self.cfg, self._far_blocks(i))
            and dev.type == "cpu"
            and attn_kernel.preferred("attention")
        )

    def _near_only(self, i: int) -> bool:
        """Whether layer i's memory is only ever read within the trained context through its
        rotated keys (LayerMemory near_only): `plan.near_blocks_only` and no far reads token by
        token (a bank's memory is decided by the caller)."""
        far_tokens = self.cfg.far_top_k > 0 and self.far_rows[i] != []
        return plan.near_blocks_only(self.cfg, self._far_blocks(i)) and not far_tokens

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One whole segment: ids (T,) -> hidden (T, C). (Not to be mixed with `feed`.)"""
        t = ids.shape[0]
        q_pos = torch.arange(self.pos, self.pos + t, device=ids.device)
        cache = self._local_cache()
        key_pos = self._key_positions(cache, self.pos, t)
        res = self.model.forward_segment(ids[None], cache, self._reads(q_pos) or None, key_pos)
        self.last_kv = res.kv  # this segment's raw K/V per layer (ingest writes them to a bank)
        self._advance(res.kv, t)
        return res.hidden[0]

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Incremental decoding: continue the current segment with ids (T,), any T (1 for one new
        token), using the segment's own K/V so far as a cache; returns hidden (T, C). A segment
        fills to `segment` tokens and is then closed exactly as `step` closes one (it becomes
        the XL cache, the old cache enters the memory), so feeding a document in pieces of any
        size computes what `step` computes segment by segment (tests/test_decode.py)."""
        seg = self.cfg.segment
        out = []
        while ids.numel():
            if self.cur_len == seg:
                self._close_segment()
            take = min(seg - self.cur_len, ids.shape[0])
            piece, ids = ids[:take], ids[take:]
            if self.window is None:
                self.window = self._open_window(piece.device)
            q_pos = torch.arange(self.pos, self.pos + take, device=piece.device)
            res = self.model.forward_segment(piece[None], self.window, self._reads(q_pos, decoding=True) or None)
            self.cur.append(res.kv)
            self.cur_len += take
            self.pos += take
            out.append(res.hidden[0])
        return torch.cat(out)

    def _open_window(self, dev: torch.device) -> list[RotatedWindow]:
        """The local windows a segment's decoding fills: the sinks and XL cache before it, their
        keys rotated once by window position (as `step` would rotate them)."""
        base = self._local_cache(self.pos)
        key_pos = self._key_positions(base, self.pos, 0)
        n = base[0].length if base else 0
        rope = self.model.rope(n, dev, key_pos)
        room = self.cfg.segment
        if base is None:
            return [RotatedWindow(None, rope, room) for _ in self.model.layers]
        return [RotatedWindow(b, rope, room) for b in base]

    def _close_segment(self) -> None:
        pieces, t = self.cur, self.cur_len
        kv = [
            LayerKV(torch.cat([p[i].k for p in pieces], 2), torch.cat([p[i].v for p in pieces], 2))
            for i in range(len(pieces[0]))
        ]
        self.cur, self.cur_len, self.window = [], 0, None
        self.pos -= t  # _advance runs from the segment's start
        self._advance(kv, t)

    def _advance(self, kv: list[LayerKV], t: int) -> None:
        # Cache, sinks and memory are constants to later segments (Transformer-XL's and the
        # paper's stop-gradient): training backpropagates through one segment at a time.
        kv = [LayerKV(x.k.detach(), x.v.detach()) for x in kv]
        n_s = self.cfg.sinks
        if n_s and self.pos == 0:
            self.sink_kv = [LayerKV(x.k[:, :, :n_s], x.v[:, :, :n_s]) for x in kv]
        if self.cfg.xl_cache:
            leaving, start = self.cache, self.cache_pos
            self.cache, self.cache_pos = kv, self.pos
        else:
            leaving, start = kv, self.pos
        self.pos += t
        if leaving is None or not self.memories:
            return
        n = leaving[0].length
        skip = max(0, min(n, n_s - start))  # sink tokens stay out of the memory
        pos = torch.arange(start + skip, start + n, device=leaving[0].k.device)
        rope = rope_cos_sin(self.model.inv_freq.to(pos.device), pos)  # once for every layer
        for i, mem in self.memories.items():
            hs = self.heads[i] if self.heads[i] is not None else slice(None)
            k, v = leaving[i].k[0, hs, skip:], leaving[i].v[0, hs, skip:]  # (KVm, n, D): heads with memory
            rk = apply_rope(k, *rope) if mem.rkeys is not None else None
            mem.add(k, v, pos, rk, index_rotated=self.cfg.positions == "true")


def join_bank(st: Streamer, bank: Any) -> dict[int, Any]:
    """Each memory layer of `st` whose memory heads the bank stores reads it beside its own
    memory (a CompositeMemory); returns those layers' bank memories."""
    from memtx_cli.memory.bank import BankLayerMemory, CompositeMemory

    cfg, n_kv, w = st.cfg, st.model.args.n_kv_heads, st.model.embed.weight
    check_bank_settings(bank, cfg, st.heads, n_kv)
    out = {}
    for i in st.layers:
        mine = range(n_kv) if st.heads[i] is None else st.heads[i]
        if i not in bank.geo.layers or not set(bank.geo.stored(i)) & set(mine):
            continue  # the bank stores none of this layer's memory heads
        out[i] = BankLayerMemory(bank, i, w.dtype, w.device, st.heads[i])
        st.memories[i] = CompositeMemory(st.memories[i], out[i], cfg.bank_blocks, cfg.bank_bias, cfg.pin_bias)
    return out


def answer_read(read: MemoryRead, cfg: Config, n_kv: int) -> MemoryRead:
    """An answering token's read (Config.answer_top_k): besides its chunk's blocks, each memory
    head attends to the token's own top-k among every memory at the fixed distance, with no
    prior. A token that answers has no later token its own query could leak to, and what it
    asks for (a key, a name, a number) may sit in a block its chunk's selectors never chose."""
    if not cfg.answer_top_k or cfg.retrieval != "block" or cfg.positions != "clamped":
        return read
    rows = len(read.heads) if read.heads is not None else n_kv
    no_prior = torch.zeros(rows, device=read.q_pos.device)
    every = {"far_scope": "all", "far_row_bias": no_prior, "far_bank": cfg.answer_bank}
    pages = cfg.answer_pages or read.far_pages
    return replace(read, far_top_k=cfg.answer_top_k, far_rows=None, far_pages=pages, **every)


def check_bank_settings(bank: Any, cfg: Config, heads: dict[int, list[int] | None], n_kv: int) -> None:
    """A bank serves block retrieval; its blocks come from other documents, so they sit at the
    fixed distance (`fixed`, or as far memories of `clamped`). It is read in the memory heads
    (layer -> KV heads, None = all) it stores: at least one."""
    if cfg.retrieval != "block" or cfg.positions == "true":
        raise MemtxError("--memory BANK works with --retrieval block and --positions fixed or clamped")
    if cfg.block_size != bank.geo.block_size:
        raise MemtxError(f"bank {bank.path} has blocks of {bank.geo.block_size}; drop --block-size {cfg.block_size}")
    stored = set(bank.geo.pairs())
    if not any((i, h) in stored for i, hs in heads.items() for h in (range(n_kv) if hs is None else hs)):
        lo, hi = min(bank.geo.layers), max(bank.geo.layers)
        raise MemtxError(
            f"bank {bank.path} holds memory layers {lo}-{hi}, none of them a memory layer or head of these "
            "settings (choose --memory-layers within the bank's)"
        )


def run_stream(
    model: Transformer, ids: torch.Tensor, cfg: Config, progress: Progress = _noop, bank: Any = None
) -> tuple[torch.Tensor, Streamer]:
    """Per-token NLL (N-1,) of ids[1:] (N,), streaming segments as `cfg` says (XL cache,
    sinks, memory, and a bank read-only), and the streamer (memory size, retrieval time)."""
    nll, streamer, _ = run_streams(model, ids, [cfg], progress, bank)[0]
    return nll, streamer


@torch.inference_mode()
def run_streams(
    model: Transformer, ids: torch.Tensor, cfgs: list[Config], progress: Progress = _noop, bank: Any = None
) -> list[tuple[torch.Tensor, Streamer, float]]:
    """`run_stream` for several settings at once, interleaved segment by segment: each
    setting's per-token NLL, streamer and seconds spent in its own steps. Timing them in turn
    pairs their tok/s against the machine's drift (a busy neighbour slows every setting's
    next segments alike, not one setting's whole run). The settings must share a segment;
    `bank` (read-only) is read by each of them. The last position of a segment predicts the
    next segment's first token. Seconds include making the streamer (its memory buffers)."""
    if len({c.segment for c in cfgs}) != 1:
        raise MemtxError("interleaved streams need one segment length")
    seg = cfgs[0].segment
    streamers, seconds = [], []
    for c in cfgs:  # setting up (memory buffers sized for the document) counts as the setting's time
        t0 = time.perf_counter()
        streamers.append(Streamer(model, c, bank, expected_tokens=ids.shape[0]))
        seconds.append(time.perf_counter() - t0)
    outs: list[list[torch.Tensor]] = [[] for _ in cfgs]
    n = ids.shape[0]
    for s in range(0, n, seg):
        targets = ids[s + 1 : s + seg + 1]
        for j, st in enumerate(streamers):
            t0 = time.perf_counter()
            hidden = st.step(ids[s : s + seg])
            outs[j].append(token_nll(model, hidden[: targets.shape[0]], targets))
            seconds[j] += time.perf_counter() - t0
        progress(min(s + seg, n), n)
    return [(torch.cat(o), st, sec) for o, st, sec in zip(outs, streamers, seconds, strict=True)]


def stream_nll(
    model: Transformer, ids: torch.Tensor, segment: int, xl_cache: bool = True, progress: Progress = _noop
) -> torch.Tensor:
    """The plain sliding-window baseline: segments + XL cache, no memory, no sinks."""
    cfg = Config(segment=segment, xl_cache=xl_cache, memory=False, sinks=0)
    return run_stream(model, ids, cfg, progress)[0]


@torch.inference_mode()
def full_nll(
    model: Transformer, ids: torch.Tensor, chunk: int, progress: Progress = _noop, before: int = 0
) -> torch.Tensor:
    """Per-token NLL (N-1,) with full causal attention inside chunks of `chunk` tokens, each
    chunk read after the `before` tokens preceding it (0: chunks apart)."""
    n = ids.shape[0]
    out = []
    for s in range(0, n, chunk):
        a = max(0, s - before)
        res = model.forward_segment(ids[a : s + chunk][None])
        targets = ids[s + 1 : s + chunk + 1]
        out.append(token_nll(model, res.hidden[0, s - a : s - a + targets.shape[0]], targets))
        progress(min(s + chunk, n), n)
    return torch.cat(out)
