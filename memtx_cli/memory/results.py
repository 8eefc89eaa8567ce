"""What a memory returns to the attention that reads it: each query's own top-k entries
(Retrieval), or whole blocks shared by a chunk's queries (BlockRetrieval)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Retrieval:
    """The top-k memories of every query, as a memory returns them: (KV, Q, k, D) tensors and
    (KV, Q, k) positions / validity; `grouped` views them as (KV, Gs, T, k, ...)."""

    keys: torch.Tensor  # raw keys
    rkeys: torch.Tensor | None  # keys rotated by their absolute positions (true / clamped)
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor  # False where the memory holds fewer than k entries

    def grouped(self, kv: int, gs: int, t: int) -> Retrieval:
        def view(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.view(kv, gs, t, *x.shape[2:])

        return Retrieval(view(self.keys), view(self.rkeys), view(self.values), view(self.positions), view(self.valid))


@dataclass
class BlockRetrieval:
    """Whole blocks of memory shared by all queries of a segment (per KV head): (KV, M, D)
    tensors, M = selected blocks x block size, and (KV, M) validity (a block may be partial)."""

    keys: torch.Tensor | None  # raw keys (None: not gathered, clamped near-only)
    rkeys: torch.Tensor | None  # keys rotated by their absolute positions (true / clamped)
    values: torch.Tensor
    valid: torch.Tensor
    bias: torch.Tensor | None = None  # (KV, M) additive score bias (a bank's prior), or None
    positions: torch.Tensor | None = None  # (KV, M) absolute positions (the clamped scheme needs them)
    bank_ids: torch.Tensor | None = None  # (KV, m) ids of the bank blocks, which fill M's tail
    pick: torch.Tensor | None = None  # (KV, C, m) the own memory's blocks, as chosen (benchmarks read them)
