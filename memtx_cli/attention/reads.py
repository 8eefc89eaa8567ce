"""What a memory layer reads: the engine's per-segment plan for a layer (MemoryRead) and what a
memory returns (Retrieval: top-k per query; BlockRetrieval: whole blocks per query chunk)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memtx_cli.model.llama import apply_rope, rotate_by


@dataclass
class MemoryRead:
    """What a memory layer needs for one segment (the engine builds it).

    `memory` is duck-typed (memory/store.py's LayerMemory): `len(memory)` and
    `retrieve(q (KV, Q, D), k) -> Retrieval` with (KV, Q, k, D) keys/rkeys/values and (KV, Q, k)
    positions/valid.
    """

    memory: Any
    top_k: int
    q_pos: torch.Tensor  # (T,) absolute positions of the segment's tokens
    scheme: str = "fixed"  # memory positions: fixed | true | clamped (see memory_scores)
    distance: int = 1024  # fixed: where every memory sits; clamped: the largest distance used
    # (token retrieval) / where memories beyond `horizon` sit (block retrieval)
    horizon: int = 8191  # clamped, block retrieval: largest true distance (trained context - 1)
    combine: str = "joint"  # joint (one softmax) | gate (paper: sigmoid-gated mix of two)
    shared: bool = False  # one search per token for a whole GQA group (sum of its queries)
    retrieval: str = "token"  # token: top-k per query | block: top blocks per segment (InfLLM)
    blocks: int = 32  # block retrieval: blocks selected per query chunk and KV head
    chunk: int = 512  # block retrieval: consecutive queries that select blocks together
    chunk_sums: dict = field(default_factory=dict)  # block retrieval: selector state (block_selectors)
    # Block retrieval from a bank: `trace(block_ids (N, m), mass (N, m))` receives the attention
    # mass every bank block got (summed over query heads and tokens; `memtx ask`'s sources).
    trace: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    heads: list[int] | None = None  # KV heads with memory (None = all); the memory holds only these
    spread: int = 0  # block retrieval: a block inherits the relevance of the `spread` blocks before it
    # clamped block retrieval: memories past the horizon (at `distance`): -1 = they share the
    # `blocks` budget, 0 = none, n > 0 = a budget of their own, their scores lowered by far_bias
    far_blocks: int = -1
    far_bias: float = 0.0
    # block retrieval: 0 = a chunk selects with the previous chunk's summed query; n > 0 = the
    # queries of its last n tokens vote, each query head apart (block_selectors, block_relevance)
    votes: int = 0
    # clamped block retrieval: each query also attends to its own top `far_top_k` memories older
    # than the trained context (the paper's per-query kNN, at the fixed distance, prior -far_bias)
    far_top_k: int = 0
    # far_top_k: the rows of `heads` (indices into the memory's KV heads) that read the far past
    # (None = all of them); the others read near blocks only (Config.far_heads)
    far_rows: list[int] | None = None
    # far_top_k: "beyond" = among memories older than the trained context; "all" = among every
    # memory of the document (near ones too, then also read at their real distance in blocks)
    far_scope: str = "beyond"
    # far_top_k: (R,) the prior of each far-reading row (0 for recall heads); None = far_bias
    far_row_bias: torch.Tensor | None = None
    # far_top_k: search the union of each chunk's queries' best `far_pages` blocks by their score
    # bound (FarSearch._paged_top_k), 0 = every memory
    far_pages: int = 0
    # far_top_k with far_scope "all": also each query's own top-k of a bank (Config.answer_bank)
    far_bank: bool = False
    # (KVm, G) bool: the query heads of those KV heads that read memory (None = all of them); the
    # others attend locally only (--memory-heads topqN). Block retrieval skips their memory work.
    qmask: torch.Tensor | None = None
    # clamped block retrieval with voters: score the blocks within the trained context by the
    # voters' exact attention over their memories, not over block means (Config.block_select)
    exact_select: bool = False
    # block retrieval: (KVm,) blocks each memory KV head reads, best first (`blocks` = their
    # maximum); None = `blocks` for every head (--memory-heads 18.2:224,8.0:32,...)
    head_blocks: torch.Tensor | None = None
    # cos, sin (T, D) of q_pos, float32: the engine computes them once per segment for every
    # memory layer (each layer recomputing them: cos/sin were 64 ms of the memory path's 2.2 s
    # of extra time over the last 8 segments at 64K, ~3%; a torch.profiler scratch run)
    q_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # decoding: the layer's attention/blocks.ReadCache (a chunk's gathered blocks, reused by its
    # later tokens); None when scoring (each chunk is read once)
    reuse: Any = None

    def at_positions(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """x (..., T, D) rotated by the queries' absolute positions q_pos."""
        if self.q_rope is None:
            return rotate_by(x, inv_freq, self.q_pos.view(1, 1, -1))
        return apply_rope(x, *self.q_rope)
