"""The model: a Llama-family decoder in plain PyTorch, with a segment-level forward.

Covers SmolLM2, TinyLlama, Llama 2/3, Mistral and (with q/k/v bias) Qwen2: RMSNorm, RoPE,
grouped-query attention, SwiGLU, tied or untied output head.

Built from small parts up: RMSNorm -> rope -> Attention -> FeedForward -> Block -> Transformer.
Shapes use B batch, T segment tokens, L cached tokens, H query heads, KV key/value heads,
G = H // KV queries per KV head, D head dim, C model width, V vocabulary.

Segment-level forward (the memory engine's unit of work): `Transformer.forward_segment` takes
the previous segment's keys/values of every layer (the XL cache, keys stored *without* RoPE)
and returns the hidden states plus this segment's raw keys/values, which become the next XL
cache and, in memory layers, the memory. Positions are counted from the start of the local
window (cache + segment), so they never exceed 2*S however long the document: RoPE only
sees relative distances, and small angles keep float32/bfloat16 cos/sin accurate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from memtx_cli.errors import MemtxError


@dataclass
class ModelArgs:
    """Architecture numbers. Validated on construction (a bad card or config fails early)."""

    vocab_size: int
    dim: int  # C
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # KV
    ffn_dim: int
    head_dim: int = 0  # D; 0 = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.x "llama3" frequency scaling, as a dict from config.json; None for plain RoPE.
    rope_scaling: dict | None = None
    context_length: int = 2048  # trained context: the longest window we trust RoPE for
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // max(self.n_heads, 1)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise MemtxError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise MemtxError(
                f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise MemtxError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise MemtxError(f"model config: rope_scaling type {kind!r} is not supported")

    @property
    def n_groups(self) -> int:  # G: query heads per KV head
        return self.n_heads // self.n_kv_heads


# ----------------------------------------------------------------------------------------------
# Small parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        # Normalise in float32 (as the reference implementations do): bfloat16's 8-bit mantissa
        # loses too much in the mean of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama 3's frequency scaling where the config asks."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = args.rope_scaling
    kind = rs.get("rope_type", rs.get("type")) if rs else None
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (T, D) for integer positions (T,), rotate-half layout."""
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, D)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, D) by position. Rotate-half layout: pairs are (x[i], x[i + D/2]).

    GGUF files from llama.cpp's converter store Q/K permuted for adjacent pairs; the GGUF
    loader permutes them back, so one RoPE serves both weight sources.
    """
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


@dataclass
class LayerKV:
    """Raw (un-rotated) keys and values of one layer for a run of tokens."""

    k: torch.Tensor  # (B, KV, L, D)
    v: torch.Tensor  # (B, KV, L, D)

    @property
    def length(self) -> int:
        return self.k.shape[2]


@dataclass
class SegmentOutput:
    hidden: torch.Tensor  # (B, T, C), after the final norm
    kv: list[LayerKV] = field(default_factory=list)  # this segment's raw K/V, one per layer


def local_mask(t: int, cache_len: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask (T, L+T) for queries at window positions L..L+T-1; None when L == 0."""
    if cache_len == 0:
        return None
    q = torch.arange(t, device=device)[:, None] + cache_len
    k = torch.arange(cache_len + t, device=device)[None, :]
    return k <= q  # True = may attend


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        # One fused projection for q, k and v: one matmul instead of three (fewer, larger GEMMs
        # are what a 2-core CPU runs fastest).
        out = (self.n_heads + 2 * self.n_kv) * self.hd
        self.wqkv = nn.Linear(args.dim, out, bias=args.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, args.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k (B, KV, T, D), v (B, KV, T, D); no RoPE yet."""
        b, t, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, (H + 2KV) * D)
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q = q.view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cache: LayerKV | None,
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin for window positions 0..L+T-1
    ) -> tuple[torch.Tensor, LayerKV]:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        new = LayerKV(k, v)
        if cache is not None and cache.length:
            k = torch.cat([cache.k, k], dim=2)  # (B, KV, L+T, D)
            v = torch.cat([cache.v, v], dim=2)
        cache_len = k.shape[2] - t
        cos, sin = rope
        q = apply_rope(q, cos[cache_len:], sin[cache_len:])
        k = apply_rope(k, cos, sin)
        y = grouped_attention(q, k, v, local_mask(t, cache_len, x.device))  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd)
        return self.wo(y), new


def grouped_attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, KV, S, D)
    v: torch.Tensor,  # (B, KV, S, D)
    mask: torch.Tensor | None,  # (T, S) bool, or None for plain causal (S == T)
) -> torch.Tensor:
    """GQA without copying K/V: fold the G query heads of a group into the query axis.

    q (B, KV*G, T, D) -> (B, KV, G*T, D) attends to its group's K/V (B, KV, S, D) in one SDPA
    call, so nothing loops over heads and K/V are never repeated G times.
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    qg = q.reshape(b, kv, g * t, d)
    if mask is None:
        if g == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    m = mask.repeat(g, 1)  # (G*T, S)
    y = F.scaled_dot_product_attention(qg, k, v, attn_mask=m)  # (B, KV, G*T, D)
    return y.reshape(b, h, t, d)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.ffn_dim = args.ffn_dim
        # gate and up fused into one matmul (w13), as in gpt-fast.
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = FeedForward(args)

    def forward(
        self, x: torch.Tensor, cache: LayerKV | None, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, LayerKV]:
        a, kv = self.attn(self.attn_norm(x), cache, rope)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, kv


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def rope(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (n, D) for window positions 0..n-1 (computed per call: tiny next to a layer)."""
        return rope_cos_sin(self.inv_freq.to(device), torch.arange(n, device=device))

    def forward_segment(
        self,
        ids: torch.Tensor,  # (B, T) token ids
        cache: list[LayerKV] | None = None,  # previous segment's raw K/V per layer (XL cache)
    ) -> SegmentOutput:
        x = self.embed(ids)  # (B, T, C)
        cache_len = cache[0].length if cache else 0
        rope = self.rope(cache_len + ids.shape[1], ids.device)
        kvs: list[LayerKV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cache[i] if cache else None, rope)
            kvs.append(kv)
        return SegmentOutput(self.norm(x), kvs)

    def output_weight(self) -> torch.Tensor:  # (V, C)
        return self.embed.weight if self.head is None else self.head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        return F.linear(hidden, self.output_weight())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over the whole of `ids` (B, T) -> logits (B, T, V)."""
        return self.logits(self.forward_segment(ids).hidden)


def token_nll(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token negative log-likelihood (N,) of `targets` (N,) given `hidden` (N, C).

    The head runs in chunks so a long segment never holds a full (N, V) float32 logit matrix;
    log-softmax runs in float32 whatever the model dtype.
    """
    w = model.output_weight()
    out = []
    for s in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[s : s + chunk], w).float()  # (n, V)
        out.append(F.cross_entropy(logits, targets[s : s + chunk], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
