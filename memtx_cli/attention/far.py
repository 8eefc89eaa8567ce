"""The far past token by token (clamped block retrieval): each query's own top-k among memories
older than the trained context (far-scope beyond) or among all of them (far-scope all), at the
fixed distance."""

from __future__ import annotations

import math

import torch

from memtx_cli.attention.ops import pair_dot, pair_mix
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.model.llama import rotate_by


def far_read(
    qr: torch.Tensor,  # (KVm, G, T, D) raw queries of the KV heads with memory
    qs: torch.Tensor,  # (KVm, Gs, T, 2D) clamped search vectors [fixed | true]
    mem: MemoryRead,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # (KVm, G, T, D), (KVm, G, T) float32
    """Clamped block retrieval, the far past token by token: each query attends to its own
    top `far_top_k` memories among those older than the trained context (entries of the
    blocks its chunk cannot read at their real distance), placed at the fixed distance and
    lowered by `far_bias`; with far_scope "all", among every memory (a near one is then read
    twice: in its block at the real distance, and here at the fixed one). Each token searches
    once per KV head, with its group's summed queries. A chunk's block selector is up to
    `chunk` tokens stale; a copy from far back needs the key its own last tokens ask for."""
    kv, g, t, d = qr.shape
    scale = 1.0 / math.sqrt(d)
    rows = mem.far_rows
    if rows is not None:  # only these heads read the far past (Config.far_heads)
        qr, qs = qr[rows], qs[rows]
    q_search = qs[..., :d].sum(1)  # (R, T, D): the fixed-distance half, group summed
    q_far = rotate_by(qr, inv_freq, torch.full((1, 1, 1), mem.distance, device=qr.device))
    # Far for a token's chunk: the blocks block_memory_attention does not read at their real
    # distance, those starting more than `horizon` before the chunk's last position.
    chunk_of = mem.q_pos // mem.chunk  # (T,)
    starts = mem.memory.block_starts().contiguous()  # (nb,)
    n_far = torch.searchsorted(starts, (chunk_of + 1) * mem.chunk - 1 - mem.horizon)  # (T,) far blocks
    bound = n_far * mem.memory.block_size  # (T,) far entries: ids 0..bound-1
    if mem.far_scope == "all":  # every memory of the document's own past
        bound = torch.full_like(bound, mem.memory.own_entries)
    # Search and attention in one kernel call per head where it runs (no gathers), else torch
    bias = mem.far_bias if mem.far_row_bias is None else mem.far_row_bias  # float or (R,)
    # The kernel searches the own past, exactly or within pages (the best blocks of a run of
    # tokens); a bank's tokens (far_bank) take the torch search
    every = getattr(mem.memory, "retrieve_every", None) if mem.far_bank else None
    far = mem.memory.far_attention
    got = None if every is not None else far(q_search, q_far, bound, mem.far_top_k, scale, bias, rows, mem.far_pages)
    out, lse = got if got is not None else far_reads(q_search, q_far, bound, chunk_of, mem, scale, rows)
    if rows is None:
        return out, lse
    out_all = torch.zeros(kv, g, t, d, dtype=qr.dtype, device=qr.device)  # other heads: no far keys
    lse_all = torch.full((kv, g, t), float("-inf"), device=qr.device)
    out_all[rows], lse_all[rows] = out, lse
    return out_all, lse_all


def far_reads(
    q_search: torch.Tensor,  # (R, T, D) search vectors
    q_far: torch.Tensor,  # (R, G, T, D) queries rotated to the fixed distance
    bound: torch.Tensor,  # (T,) far entries per token (the same within a chunk)
    chunk_of: torch.Tensor,  # (T,) each token's chunk
    mem: MemoryRead,
    scale: float,
    rows: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (R, G, T, D), (R, G, T) float32
    """Attention.far_token_attention in torch (where attn_kernel.far_attention cannot run): per
    chunk, `retrieve_far` then attention over the gathered memories."""
    r, g, t, d = q_far.shape
    out = torch.zeros(r, g, t, d, dtype=q_far.dtype, device=q_far.device)
    lse = torch.full((r, g, t), float("-inf"), device=q_far.device)
    every = getattr(mem.memory, "retrieve_every", None) if mem.far_bank else None  # a bank's tokens too
    search = every or mem.memory.retrieve_far
    for c in torch.unique(chunk_of).tolist():
        idx = (chunk_of == c).nonzero().squeeze(1)
        n = int(bound[idx[0]])
        if n <= 0 and every is None:
            continue
        got = search(q_search[:, idx], mem.far_top_k, n, rows, mem.far_pages)  # (R, n, k, ...)
        if got is None:  # nothing to read
            continue
        s = pair_dot(q_far[:, :, idx], got.keys[:, None].to(q_far.dtype)).float() * scale
        s = s - (mem.far_bias if mem.far_row_bias is None else mem.far_row_bias.view(-1, 1, 1, 1))
        s = s.masked_fill(~got.valid[:, None], float("-inf"))  # a bank with fewer entries than asked
        lc = torch.logsumexp(s, -1)  # (R, G, n); -inf where a row reads nothing (weight 0 below)
        w = torch.exp(s - lc[..., None]).nan_to_num(0.0)
        out[:, :, idx] = pair_mix(w.to(q_far.dtype), got.values[:, None].to(q_far.dtype))
        lse[:, :, idx] = lc
    return out, lse
