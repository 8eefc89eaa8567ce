"""LayerMemory's far reads: each query's own top-k among the memories older than the trained
context, by exact inner product (shortlisted in 16 bits), or fused with the attention."""

from __future__ import annotations

import time

import torch

from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.memory.entries import select_rows
from memtx_cli.memory.results import Retrieval


class FarSearch:
    """Far reads of a block memory (mixed into LayerMemory)."""

    def retrieve_far(
        self, q: torch.Tensor, k: int, bound: int, rows: list[int] | None = None, pages: int = 0
    ) -> Retrieval:
        """Block memory: each query's own top-k among entries 0..bound-1 (the memories older than
        the trained context), by exact inner product. q (R, Q, D) search vectors (the queries
        rotated to the fixed distance, scored against raw keys) of the memory's heads `rows`
        (None: all of them, R = KV). Returns (R, Q, min(k, bound), ...) tensors, no rotated keys
        (far memories sit at the fixed distance).

        Keys kept in a 16-bit dtype (the model's bfloat16): the scores come from one matmul in
        that dtype (AVX512-BF16 runs it ~4x faster than float32, and no float32 copy of the keys
        is made), which shortlists 2k candidates; their float32 scores pick the top k. Rounding
        the scores to 8 bits of mantissa moves a key by far less than the gap between the k-th
        and 2k-th best. The shortlist (`top_rows`) is most of the time. Where attn_kernel runs, the model calls
        `far_attention` instead: this search and the attention in one kernel call per head.

        pages > 0: only the blocks among some query's `pages` best by their upper bound are
        searched (`_paged_top_k`), exactly; the rest is skipped."""
        t0 = time.perf_counter()
        bound = min(bound, self.n)
        kk = min(k, bound)
        rows = list(range(q.shape[0])) if rows is None else rows
        nb = -(-bound // max(self.block_size, 1))
        if pages and self.kmin is not None and nb > 2 * pages and pages * self.block_size >= 2 * kk:
            idt = torch.stack([self._paged_top_k(q[i], h, kk, bound, pages) for i, h in enumerate(rows)])
            self.search_seconds += time.perf_counter() - t0
            return self._gather_entries(idt, torch.ones_like(idt, dtype=torch.bool), False, rows)
        # One 2-D matmul per head: keys[:, :bound] is strided across heads, and a batched matmul
        # over it copies every key first (4.7 vs 2.3 ms per call, real far searches at 32K).
        low = self.keys.dtype in (torch.bfloat16, torch.float16)
        if not low or 2 * kk >= bound:
            parts = [q[i].float() @ self.keys[h, :bound].float().t() for i, h in enumerate(rows)]
            idt = exact_top_k(torch.stack(parts), kk)  # (R, Q, k')
        else:  # a shortlist of 2k by 16-bit scores, rescored in float32
            qd = q.to(self.keys.dtype)
            cand = torch.stack([top_rows(self.keys[h, :bound], qd[i], 2 * kk) for i, h in enumerate(rows)])
            ck = select_rows(self.keys.view(-1, self.head_dim), self._flat_ids(cand, rows)).view(*cand.shape, -1)
            exact = torch.einsum("rqd,rqcd->rqc", q.float(), ck.float())
            idt = cand.gather(-1, exact.topk(kk, dim=-1, sorted=False).indices)
        self.search_seconds += time.perf_counter() - t0
        return self._gather_entries(idt, torch.ones_like(idt, dtype=torch.bool), False, rows)

    def _paged_top_k(self, q: torch.Tensor, h: int, k: int, bound: int, pages: int) -> torch.Tensor:
        """Head h: each query of q (Q, D) -> ids (Q, k) of its top k among entries 0..bound-1,
        searched exactly within the union of the queries' best `pages` blocks by the bound
        sum_c max(q_c min_c, q_c max_c) >= q . k (Quest, Tang et al. 2024): a key outside them
        scores below every block bound a query picked, though not always below its k-th key."""
        b = self.block_size
        nb = -(-bound // b)
        qf = q.float()
        ub = qf.clamp(min=0) @ self.kmax[h, :nb].t() + qf.clamp(max=0) @ self.kmin[h, :nb].t()  # (Q, nb)
        best = ub.topk(pages, dim=-1, sorted=False).indices  # (Q, pages)
        out = []
        # Queries in groups of 16: the union of a group's pages stays a small part of the memory
        for g in range(0, qf.shape[0], 16):
            picked = best[g : g + 16].unique()  # (U,) blocks, ascending
            cand = (picked[:, None] * b + torch.arange(b, device=q.device)).reshape(-1)
            cand = cand[cand < bound]
            s = qf[g : g + 16] @ select_rows(self.keys[h], cand).float().t()  # (16, C)
            out.append(cand[exact_top_k(s, k)])
        return torch.cat(out)

    def far_attention(
        self,
        q: torch.Tensor,  # (R, T, D) search vectors, as retrieve_far's
        qa: torch.Tensor,  # (R, G, T, D) attention queries (rotated to the fixed distance)
        bound: torch.Tensor,  # (T,) token i reads among entries 0..bound[i]-1
        k: int,
        scale: float,
        bias: float | torch.Tensor,  # one prior, or one per row (R,)
        rows: list[int] | None = None,
        pages: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # (R, G, T, D) in qa's dtype, (R, G, T) float32
        """`retrieve_far` and the attention over what it finds (scores scale * q.k - bias), fused
        in attn_kernel.far_attention: one call per head for all tokens, each with its own bound;
        no keys or values gathered. The same entries as retrieve_far (its shortlist of 2k by
        bfloat16 scores, rescored in float32). pages > 0 (with the blocks' key bounds kept): only
        the union of 32 tokens' `pages` best blocks by their bound, as `_paged_top_k` does for
        16. None where the kernel cannot run."""
        t0 = time.perf_counter()
        rows = list(range(q.shape[0])) if rows is None else rows
        if pages and self.kmin is None:
            return None  # the torch path pages (or not) as retrieve_far does
        outs, lses = [], []
        for i, h in enumerate(rows):
            keys, values = self.keys[h, : self.n], self.values[h, : self.n]
            b = float(bias[i]) if isinstance(bias, torch.Tensor) else bias
            paged = (self.kmin[h], self.kmax[h], self.block_size, pages) if pages else None
            got = attn_kernel.far_attention(keys, values, q[i], qa[i], bound, k, scale, b, pages=paged)
            if got is None:
                return None
            outs.append(got[0])
            lses.append(got[1])
        self.search_seconds += time.perf_counter() - t0
        return torch.stack(outs).to(qa.dtype), torch.stack(lses)


def top_rows(keys: torch.Tensor, q: torch.Tensor, m: int, group: int = 32) -> torch.Tensor:
    """Indices (Q, m) of the m rows of keys (N, D) with the largest inner products with each
    query of q (Q, D), in the keys' dtype; exact_top_k's two passes on the transposed scores.
    Keys as the matmul's row operand give scores (N, Q): the maxima of `group` consecutive keys
    are then a reduction over an outer axis, vectorised across the queries (over the inner axis
    of (Q, N) scores it was 11x slower in bfloat16: 3.8 vs 0.34 ms, one head, 64 queries, 56,000
    keys, a scratch microbenchmark), and no float32 copy of all the scores is made. A shortlist
    of 64 at 56,000 keys: 2.1-2.3 ms vs 3.1-3.5 (`benchmarks/far_search_timing.py`)."""
    s = keys @ q.t()  # (N, Q)
    n_all, nq = s.shape
    n = n_all // group * group
    if n // group <= m:  # too few groups to gain anything
        return s.t().float().topk(m, dim=-1, sorted=False).indices
    top_g = s[:n].view(n // group, group, nq).amax(1).t().float().topk(m, dim=-1, sorted=False).indices  # (Q, m)
    cand = (top_g[..., None] * group + torch.arange(group, device=s.device)).reshape(nq, m * group)
    if n < n_all:  # the partial last group: always a candidate
        cand = torch.cat([cand, torch.arange(n, n_all, device=s.device).expand(nq, -1)], -1)
    at = cand * nq + torch.arange(nq, device=s.device)[:, None]  # into the (N, Q) scores
    best = s.view(-1)[at.reshape(-1)].view(at.shape).float().topk(m, dim=-1, sorted=False).indices
    return cand.gather(-1, best)


def exact_top_k(scores: torch.Tensor, k: int, group: int = 32) -> torch.Tensor:
    """Indices of the k largest of scores (..., N) along the last axis, in two passes: the k
    groups of `group` consecutive scores with the largest maxima hold the k largest scores (a
    score outside them would have k larger group maxima above it), so only k * group
    candidates go through topk. Exact; 8.7 ms vs 13 ms for plain topk on (2, 64, 56,000)."""
    n = scores.shape[-1] // group * group
    if n // group <= k:  # too few groups to gain anything
        return scores.topk(k, dim=-1, sorted=False).indices
    lead = scores.shape[:-1]
    # Unsorted: callers need the set, and sorting costs ~30% more at these sizes.
    top_g = scores[..., :n].reshape(*lead, n // group, group).amax(-1).topk(k, dim=-1, sorted=False).indices
    cand = (top_g[..., None] * group + torch.arange(group, device=scores.device)).reshape(*lead, k * group)
    if n < scores.shape[-1]:  # the partial last group: always a candidate
        tail = torch.arange(n, scores.shape[-1], device=scores.device)
        cand = torch.cat([cand, tail.expand(*lead, -1)], -1)
    best = scores.gather(-1, cand).topk(k, dim=-1, sorted=False).indices
    return cand.gather(-1, best)
