"""Memorizing attention: a plain attention layer that also reads a kNN memory.

forward: project, attend locally, read memory, merge. The read is one of three strategies in
sibling modules: token retrieval (the paper: each query's own top-k, `token.py`), block
retrieval (InfLLM-style whole blocks per query chunk, `blocks.py`) and, under clamped
positions, the far past token by token (`far.py`). The merge joins the memory part with the
local attention: one softmax over both (joint), or the paper's sigmoid gate per head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memtx_cli.attention.blocks import block_read, block_selectors
from memtx_cli.attention.far import far_read
from memtx_cli.attention.merge import place, trace_bank_mass
from memtx_cli.attention.ops import attention_with_lse, merge_lse
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.attention.token import memory_search_vectors, token_read
from memtx_cli.model.llama import Attention, ModelArgs, grouped_attention


class MemorizingAttention(Attention):
    """Attention that also reads a kNN memory. Per-head memory parameters, where the layer has
    them (`add_params`): mem_gate b_h (combine=gate, the paper: g = sigmoid(b_h) mixes memory
    and local attention per head) and mem_bias c_h (combine=joint: added to every memory logit,
    so the joint softmax weighs memory by e^c_h). Without them the joint softmax is untrained
    (c_h = 0). `memtx train` fits them."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.mem_gate: nn.Parameter | None = None
        self.mem_bias: nn.Parameter | None = None

    @classmethod
    def from_plain(cls, plain: Attention) -> MemorizingAttention:
        """The same layer, its projections shared (not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_heads, new.n_kv, new.hd = plain.n_heads, plain.n_kv, plain.hd
        new.wqkv, new.wo = plain.wqkv, plain.wo
        new.mem_gate = new.mem_bias = None
        return new

    def add_params(self, gate_init: float, like: torch.Tensor) -> None:
        """The memory parameters, where absent: b_h = gate_init (g = sigmoid(b_h)), c_h = 0 (the
        joint softmax unchanged); on the device of `like` (the embedding), trainable when it is."""
        if self.mem_gate is None:
            self.mem_gate = nn.Parameter(
                torch.full((self.n_heads,), float(gate_init), device=like.device), requires_grad=like.requires_grad
            )
        if self.mem_bias is None:
            self.mem_bias = nn.Parameter(
                torch.zeros(self.n_heads, device=like.device), requires_grad=like.requires_grad
            )

    def joint_bias(self, kv: int, g: int) -> torch.Tensor | None:
        """mem_bias as (KV, G, 1), or None when the layer has none (an untrained model)."""
        return None if self.mem_bias is None else self.mem_bias.float().view(kv, g, 1)

    def attend(
        self,
        q: torch.Tensor,  # (B, H, T, D) rotated
        q_raw: torch.Tensor,  # (B, H, T, D) before RoPE
        k: torch.Tensor,  # (B, KV, S, D) rotated local keys
        v: torch.Tensor,
        bias: torch.Tensor | None,
        mem: MemoryRead | None = None,
        inv_freq: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, H, T, D)
        if mem is None:
            return grouped_attention(q, k, v, bias)
        t = q.shape[2]
        # Raw queries of the KV heads with memory, grouped: (KVm, G, T, D).
        qr = q_raw[0].view(self.n_kv, self.n_heads // self.n_kv, t, self.hd)
        qr = qr if mem.heads is None else qr[mem.heads]
        if mem.retrieval == "block":
            # The selectors' running sums advance even while the memory is still empty.
            # Every query head of a memory KV head votes for its blocks, those without memory too
            # (topqN, 8K: q108 x 96 within 0.2% of voting by the reading heads alone, either way).
            qs = memory_search_vectors(qr, mem, inv_freq)
            groups = block_selectors(qs, mem.q_pos, mem.chunk, mem.chunk_sums, mem.votes)
            if len(mem.memory) == 0:
                return grouped_attention(q, k, v, bias)
            # The queries at their absolute positions: the search vectors' true half, if not summed.
            qm = None
            if mem.scheme in ("true", "clamped") and qs.shape[1] == qr.shape[1]:
                qm = qs[..., self.hd :] if mem.scheme == "clamped" else qs
            out_m, lse_m, traced = self.block_memory_attention(q, qr, groups, mem, inv_freq, qm)
            if mem.far_top_k and mem.scheme == "clamped":
                out_f, lse_f = self.far_token_attention(qr, qs, mem, inv_freq)
                out_m, lse_m = merge_lse(out_m, lse_m, out_f, lse_f)
            return self.merge_memory(q, k, v, bias, out_m, lse_m, mem, traced)
        if len(mem.memory) == 0:
            return grouped_attention(q, k, v, bias)
        out_m, lse_m = token_read(qr, mem, inv_freq)
        return self.merge_memory(q, k, v, bias, out_m, lse_m, mem)

    # The reads, as methods: one place to observe them (tests and profiles wrap them).
    def block_memory_attention(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return block_read(*args, **kwargs)

    def far_token_attention(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return far_read(*args, **kwargs)

    def merge_memory(
        self,
        q: torch.Tensor,  # (1, H, T, D) rotated by window position
        k: torch.Tensor,  # (1, KV, S, D) rotated local keys (sinks + XL cache + segment)
        v: torch.Tensor,  # (1, KV, S, D)
        bias: torch.Tensor | None,  # (T, S) causal bias
        out_m: torch.Tensor,  # (KVm, G, T, D) attention over the memories alone
        lse_m: torch.Tensor,  # (KVm, G, T) its log-sum-exp (float32)
        mem: MemoryRead,
        traced: list | None = None,
    ) -> torch.Tensor:  # (1, H, T, D)
        """Local attention joined with the memory part, for the KV heads with memory (the
        others attend locally only). joint: one softmax over [local keys, memories], merged
        flash-attention style by log-sum-exp. gate (the paper): sigmoid(b_h) mixes the two."""
        _, h, t, d = q.shape
        kv, g = self.n_kv, h // self.n_kv
        sel = slice(None) if mem.heads is None else mem.heads
        scale = 1.0 / math.sqrt(d)
        keep = None  # (KVm, G, 1) 1/0: which query heads read memory (weighs traced bank blocks)
        if mem.qmask is not None:  # query heads without memory: nothing retrieved (weight 0)
            out_m = out_m.masked_fill(~mem.qmask[..., None, None], 0.0)
            lse_m = lse_m.masked_fill(~mem.qmask[..., None], float("-inf"))
            keep = mem.qmask[..., None].float()
        if mem.combine == "gate":
            local = grouped_attention(q, k, v, bias)[0].view(kv, g, t, d)
            gate = torch.sigmoid(self.mem_gate).view(kv, g, 1)[sel]  # (KVm, G, 1)
            if traced:  # the gate scales the memory's share; within it, the memory's softmax
                trace_bank_mass(traced, lse_m, mem.trace, scale, gate if keep is None else gate * keep)
            mixed = gate[..., None].to(q.dtype) * out_m + (1 - gate[..., None]).to(q.dtype) * local[sel]
            if mem.qmask is not None:
                mixed = torch.where(mem.qmask[..., None, None], mixed, local[sel])
            return place(local, mixed, mem.heads).reshape(1, h, t, d)
        jb = self.joint_bias(kv, g)
        if jb is not None:  # every memory logit + c_h: the memory's log-sum-exp moves by c_h
            jb = jb[sel]
            lse_m = lse_m + jb
        if mem.heads is not None:  # the others: no memory (out 0, lse -inf)
            out_m = place(torch.zeros(kv, g, t, d, dtype=q.dtype, device=q.device), out_m, mem.heads)
            lse_m = place(torch.full((kv, g, t), float("-inf"), device=q.device), lse_m, mem.heads)
        # One softmax over [local, memory]: the local attention continues from the memory's
        # (output, lse), as if merged after it by their log-sum-exp.
        qg = q.reshape(1, kv, g * t, d)  # fold a group's G heads into the query axis
        init = (out_m.reshape(kv, g * t, d), lse_m.reshape(kv, g * t))
        out, lse_all = attention_with_lse(qg, k, v, None, scale, causal_t=t, init=init)  # (KV, G*T, ...)
        if traced:  # weights of the joint softmax: exp(score + c_h - lse of [local, memory])
            factor = None if jb is None else jb.exp()
            if keep is not None:
                factor = keep if factor is None else factor * keep
            trace_bank_mass(traced, lse_all.view(kv, g, t)[sel], mem.trace, scale, factor)
        return out.reshape(1, h, t, d)
