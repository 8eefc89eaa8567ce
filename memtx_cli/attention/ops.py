"""Attention pieces shared by the memory reads: attention with its log-sum-exp, merging two
partial attentions, dot products of queries with their own retrieved keys."""

from __future__ import annotations

import functools

import torch

from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.memory.results import BlockRetrieval
from memtx_cli.model.llama import local_bias

# local_bias per (T, S, dtype, device), built once: every memory layer of a segment asks for the
# same one. Read only (an attention mask), never written.
_causal_mask = functools.lru_cache(maxsize=8)(local_bias)
FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"  # SDPA's CPU flash kernel, which returns the lse


def attention_with_lse(
    q: torch.Tensor,  # (1, KV, Q, D)
    k: torch.Tensor,  # (1, KV, S, D)
    v: torch.Tensor,  # (1, KV, S, D)
    bias: torch.Tensor | None,  # additive, broadcastable to (KV, Q, S): (Q, S) or (KV, 1, S)
    scale: float,
    causal_t: int = 0,  # > 0 (bias None): query row i sees keys up to S - causal_t + i % causal_t
    init: tuple[torch.Tensor, torch.Tensor] | None = None,  # (KV, Q, D), (KV, Q): attention over other keys
) -> tuple[torch.Tensor, torch.Tensor]:  # (KV, Q, D) in q's dtype, (KV, Q) float32
    """Attention output and its log-sum-exp, for merging with retrieved memories; with init
    (an attention over other keys and its lse, -inf: none), the attention over both.

    causal_t folds G query heads of causal_t tokens each into the query axis, every one causal
    over keys aligned bottom-right (local attention). On CPU: attn_kernel in bfloat16 where it
    is the faster (attn_kernel.preferred; init continues its online softmax: no separate
    merge), else the flash kernel SDPA itself calls (it returns the log-sum-exp; measured 4.4x
    faster than materialising scores in bfloat16, T=512, S=1024) and `merge_lse`; elsewhere,
    plain math.
    """
    # The kernel has no backward: not when the memory part (init) needs a gradient (a trained gate)
    init_grad = init is not None and torch.is_grad_enabled() and (init[0].requires_grad or init[1].requires_grad)
    fits = causal_t or bias is None or bias.dim() == 3
    if fits and not init_grad and attn_kernel.usable(q, k, v) and attn_kernel.preferred("attention"):
        # causal: the kernel masks by itself; (KV, 1, S): one bias per row of keys
        got = attn_kernel.attention(q[0], k[0], v[0], None if bias is None else bias[:, 0], scale, causal_t, init)
        if got is not None:
            return got
    if init is not None:
        out, lse = attention_with_lse(q, k, v, bias, scale, causal_t)
        return merge_lse(out, lse, init[0].to(out.dtype), init[1])
    # The flash kernel's log-sum-exp has no gradient; training (which merges by lse) uses the math.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    flash = not grad and q.device.type == "cpu" and hasattr(torch.ops.aten, FLASH_CPU)
    if flash and causal_t and bias is None:
        # The G heads unfolded: (KV, G, T, D) over each KV head's keys broadcast to its G query
        # heads (no copy) with one (T, S) mask, or none when S == T: faster than a folded
        # (G*T, S) mask (docs/decisions.md, the bfloat16 kernel).
        (kv, gt, d), s = q.shape[1:], k.shape[2]
        qq = q[0].reshape(kv, gt // causal_t, causal_t, d)
        ke, ve = (x[0, :, None].expand(kv, gt // causal_t, s, d) for x in (k, v))
        mask = _causal_mask(causal_t, s, q.dtype, q.device)
        out, lse = getattr(torch.ops.aten, FLASH_CPU)(qq, ke, ve, 0.0, mask is None, attn_mask=mask, scale=scale)[:2]
        return out.reshape(kv, gt, d), lse.reshape(kv, gt).float()
    if causal_t and bias is None:  # (Q, S); S + 1 keys then the first cut: a mask even when S == T
        bias = local_bias(causal_t, k.shape[2] + 1, q.dtype, q.device)[:, 1:].repeat(q.shape[2] // causal_t, 1)
    if flash:
        out, lse = getattr(torch.ops.aten, FLASH_CPU)(
            q, k, v, 0.0, False, attn_mask=bias[None] if bias is not None and bias.dim() == 3 else bias, scale=scale
        )
        return out[0], lse[0].float()
    scores = (q[0] @ k[0].transpose(-1, -2)).float() * scale  # (KV, Q, S)
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return (torch.exp(scores - lse[..., None]).to(q.dtype) @ v[0]), lse


def merge_lse(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions (out (..., D), log-sum-exp (...)) over disjoint keys -> the
    attention over their union (flash-attention's merge); -inf lse = no keys."""
    top = torch.maximum(l1, l2).nan_to_num(neginf=0.0)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    den = w1 + w2
    r1, r2 = (w1 / den.clamp_min(1e-30))[..., None], (w2 / den.clamp_min(1e-30))[..., None]
    return r1.to(o1.dtype) * o1 + r2.to(o1.dtype) * o2, top + torch.log(den)


def pair_dot(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (KV, G, T, D) . keys (KV, Gs, T, k, D) -> (KV, G, T, k); Gs = 1 shares keys in a group."""
    if keys.shape[1] == 1:  # one bmm per (head, token): (G, D) @ (D, k)
        return torch.einsum("hgtd,htkd->hgtk", q, keys[:, 0])
    return torch.einsum("hgtd,hgtkd->hgtk", q, keys)


def pair_mix(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weights w (KV, G, T, k) over values (KV, Gs, T, k, D) -> (KV, G, T, D)."""
    if values.shape[1] == 1:
        return torch.einsum("hgtk,htkd->hgtd", w, values[:, 0])
    return torch.einsum("hgtk,hgtkd->hgtd", w, values)


def memory_bias(got: BlockRetrieval, rows: slice, span: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(R, 1, span) additive bias of the retrieved rows' first `span` entries: their prior (a
    bank's) and -inf where invalid; None when there is neither (a mask costs ~20% in the kernel)."""
    valid = got.valid[rows, :span]
    if got.bias is None and bool(valid.all()):
        return None
    out = torch.zeros(valid.shape[0], 1, span, dtype=dtype, device=valid.device)
    if got.bias is not None:
        out += got.bias[rows, None, :span].to(dtype)
    return out.masked_fill_(~valid[:, None], float("-inf"))
