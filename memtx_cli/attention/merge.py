"""Joining the memory read with local attention, and weighing the bank blocks an answer read."""

from __future__ import annotations

from collections.abc import Callable

import torch


def place(full: torch.Tensor, part: torch.Tensor, heads: list[int] | None) -> torch.Tensor:
    """full (KV, G, T, D) with the rows of `heads` replaced by part (KVm, G, T, D)."""
    if heads is None:
        return part
    out = full.clone()
    out[heads] = part
    return out


def trace_bank_mass(
    traced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]],
    lse: torch.Tensor,  # (KV, G, T) log-normaliser of each query's attention
    trace: Callable[[torch.Tensor, torch.Tensor], None],
    scale: float,
    factor: torch.Tensor | None = None,  # (KV, G, 1) gate or e^mem_bias, or None
) -> None:
    """Attention mass per retrieved bank block, summed over a group's heads and tokens:
    the scores are recomputed explicitly (the flash kernel does not return weights), which
    is cheap for the few tokens traced (an answer)."""
    kv, g, _ = lse.shape
    for idx, qq, km, m_bias, bank_ids, b in traced:
        n, size = idx.shape
        m_b = bank_ids.shape[-1]
        if m_b == 0:
            continue
        s = (qq[0] @ km.to(qq.dtype).transpose(-1, -2)).float() * scale  # (KV*n, G*size, M)
        if m_bias is not None:
            s = s + m_bias.float()
        lq = lse[:, :, idx]  # (KV, G, n, size)
        if factor is not None:
            lq = lq - torch.log(factor[..., None])  # weight = factor * exp(s - lse)
        lq = lq.permute(0, 2, 1, 3).reshape(kv * n, g * size, 1)
        w = torch.exp(s - lq)  # (KV*n, G*size, M)
        mass = w[:, :, w.shape[-1] - m_b * b :].sum(1).view(kv * n, m_b, b).sum(-1)  # (KV*n, m_b)
        trace(bank_ids.reshape(kv * n, m_b), mass)
