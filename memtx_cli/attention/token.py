"""Token retrieval (the paper): each query's own top-k memories, scored under a position scheme."""

from __future__ import annotations

import math
from typing import Any

import torch

from memtx_cli.attention.ops import pair_dot, pair_mix
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.model.llama import rotate_by


def memory_search_vectors(q_raw: torch.Tensor, mem: MemoryRead, inv_freq: torch.Tensor) -> torch.Tensor:
    """Search vectors (KV, Gs, T, D) from raw queries (KV, G, T, D), so that inner-product
    search ranks memories the way attention will score them. Gs = G, or 1 when the group
    shares one search (the sum of its G vectors: inner products add up, so the shared top-k
    are the memories the group attends to most on average).

    fixed / clamped: the query rotated as if every memory sat `distance` tokens back
    (InfLLM's trick; the index holds raw keys). true: the query rotated by its absolute
    position (the index holds keys rotated by theirs: R(a)q . R(b)k = q . R(b-a)k).
    clamped with block retrieval: both, concatenated (blocks within the trained context are
    selected by their true score, older ones by the fixed-distance score).
    """
    kv, g, t, d = q_raw.shape
    if mem.shared and not (mem.retrieval == "block" and mem.votes):  # voters are the heads apart
        q_raw = q_raw.sum(1, keepdim=True)  # (KV, 1, T, D)
    fixed = torch.full((1, 1, 1), mem.distance, device=q_raw.device)
    if mem.scheme == "clamped" and mem.retrieval == "block":  # both: [fixed | true], (KV, Gs, T, 2D)
        at_abs = mem.at_positions(q_raw, inv_freq)
        # Exact selection of near blocks only, no bank: nothing is scored at the fixed distance.
        unused = mem.exact_select and mem.far_blocks == 0 and not mem.far_top_k and not hasattr(mem.memory, "bank")
        at_fixed = torch.zeros_like(at_abs) if unused else rotate_by(q_raw, inv_freq, fixed)
        return torch.cat([at_fixed, at_abs], -1)
    dist = mem.q_pos.view(1, 1, t) if mem.scheme == "true" else fixed
    return rotate_by(q_raw, inv_freq, dist)


def memory_scores(q_raw: torch.Tensor, got: Any, mem: MemoryRead, inv_freq: torch.Tensor) -> torch.Tensor:
    """Attention logits (KV, G, T, k), unscaled, of queries q_raw (KV, G, T, D, before RoPE)
    against their retrieved memories `got` (tensors (KV, Gs, T, k, ...)). Position schemes:

    fixed: every memory at `distance`. true: the real distance a - b, as R(a)q . R(b)k with
    keys stored rotated (exact, as in full attention; past the trained context the model sees
    distances it never learned). clamped: the real distance up to `distance`, then `distance`:
    exact within the trained context, bounded beyond it.
    """
    kv, g, t, d = q_raw.shape
    dt = q_raw.dtype

    def at_distance() -> torch.Tensor:  # every memory `distance` tokens back
        q_far = rotate_by(q_raw, inv_freq, torch.full((1, 1, 1), mem.distance, device=q_raw.device))
        return pair_dot(q_far, got.keys.to(dt))

    if mem.scheme == "fixed":
        return at_distance()
    q_abs = mem.at_positions(q_raw, inv_freq)
    s_true = pair_dot(q_abs, got.rkeys.to(dt))
    if mem.scheme == "true":
        return s_true
    near = (mem.q_pos.view(1, 1, t, 1) - got.positions) <= mem.distance  # (KV, Gs, T, k)
    return torch.where(near, s_true, at_distance())


def token_read(
    qr: torch.Tensor,  # (KVm, G, T, D) raw queries of the KV heads with memory
    mem: MemoryRead,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # (KVm, G, T, D), (KVm, G, T) float32
    """Token retrieval (the paper): each query's own top-k memories; returns the attention
    over them alone and its log-sum-exp, for `merge_memory` (one document: B=1)."""
    kv, g, t, d = qr.shape
    scale = 1.0 / math.sqrt(d)
    qs = memory_search_vectors(qr, mem, inv_freq)  # (KVm, Gs, T, D)
    gs = qs.shape[1]
    got = mem.memory.retrieve(qs.reshape(kv, gs * t, d), mem.top_k)  # (KVm, Gs*T, k, ...)
    got = got.grouped(kv, gs, t)
    m_scores = memory_scores(qr, got, mem, inv_freq) * scale  # (KVm, G, T, k)
    m_scores = m_scores.float().masked_fill(~got.valid, float("-inf"))
    lse = torch.logsumexp(m_scores, -1)  # (KVm, G, T); -inf where nothing valid came back
    # Normalise first, then mix in the model dtype: no float32 copy of the retrieved values.
    w = torch.exp(m_scores - lse.nan_to_num(neginf=0.0)[..., None])  # 0 where nothing valid
    out = pair_mix(w.to(qr.dtype), got.values.to(qr.dtype))
    return out, lse
