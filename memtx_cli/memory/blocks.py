"""LayerMemory's block selection (InfLLM-style retrieval): blocks ranked by their mean keys or,
for voters at real distances, by their best key's exact logit; picks gathered or read in place."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.memory.entries import select_rows
from memtx_cli.memory.results import BlockRetrieval


class BlockSelection:
    """Block retrieval over a memory's entries (mixed into LayerMemory)."""

    def retrieve_blocks(
        self,
        sel: torch.Tensor,
        n_blocks: int,
        scale: float,
        scheme: str = "fixed",
        near: torch.Tensor | None = None,
        spread: int = 0,
        far_blocks: int = -1,
        far_bias: float = 0.0,
        raw_keys: bool | None = None,
        exact: bool = False,
        budgets: torch.Tensor | None = None,
        gather: bool = True,
    ) -> BlockRetrieval | BlockPicks:
        """Per KV head and selector, the `n_blocks` most relevant blocks (`block_relevance`);
        sel (KV, C, D) sums of search vectors or (KV, C, Q, D) voters (model.block_selectors);
        returns (KV*C, M, ...) tensors with M = n_blocks x block size. raw_keys: gather the
        raw keys too (None: unless clamped near-only, where every block is read through its
        rotated keys; `keys` is then None).

        Clamped budgets: `far_blocks` -1 = one budget for near and far blocks; 0 = near blocks
        only; > 0 = `n_blocks` near plus `far_blocks` far ones, far relevance lowered by
        `far_bias` (far blocks sit at the fixed distance, closer than their real one, and crowd
        out near ones). With voters the relevance is a log share, so the bias is a prior e^-b.
        exact: with voters and separate budgets, near blocks are scored by the voters' exact
        attention (`block_relevance`).
        budgets (KV,): head h reads only its best budgets[h] blocks (<= n_blocks) of the first
        (near or shared) budget; the blocks then come best first, not in document order, and
        the others are invalid, so a caller may cut each row to its head's first blocks.
        gather=False: the picks only (BlockPicks), for the caller to gather each head's own
        budget (`gather_blocks(pick[h0:h1, :, :budget], head0=h0)`): with budgets, gathering every
        head's rows to the layer's largest budget copied 3,536 blocks per chunk where the card's
        budgets read 2,336.
        """
        t0 = time.perf_counter()
        try:
            separate = scheme == "clamped" and far_blocks >= 0  # near and far blocks compete apart
            # Near blocks only: they are the last blocks of the memory (the ones starting within
            # `horizon` of the chunk), so only that suffix is scored. At 64K tokens it is ~240 of
            # ~2,000 blocks; voters then share their attention among the blocks they can read.
            near_only = separate and not far_blocks
            first = 0
            if near_only:
                first = min(self.n_blocks - int(near.sum(-1).max()), self.n_blocks - 1)  # >= 1 block, maybe masked
                near = near[:, first:]
            exact = exact and separate and sel.dim() == 4
            if exact and near_only and budgets is not None and not gather and scheme == "clamped":
                # the default path: block maxima and then the picks in two kernel calls
                got = self._near_picks(sel.float(), near, scale, first, spread, n_blocks)
                if got is not None:
                    return BlockPicks(got[0], got[1] > float("-inf"), raw_keys if raw_keys is not None else False)
            # (KV, C, nb - first); near-only masks the far blocks below, so exact needs no means for them
            relevance = self.block_relevance(sel.float(), scheme, near, scale, first, exact, far_means=not near_only)
            budget = (n_blocks, far_blocks if separate else 0, far_bias)
            pick, score, n_first = self._top_picks(relevance, near if separate else None, budget, spread, first)
            if budgets is None:  # in document order (with budgets, head h reads its first budgets[h])
                pick, order = pick.sort(-1)
                score = score.gather(-1, order) if separate else score
            # a budget larger than its blocks picks some at -inf: mask them
            ok = score > float("-inf") if separate else None
            raw = raw_keys if raw_keys is not None else not near_only
            if not gather:
                return BlockPicks(pick, ok, raw)
            if budgets is not None:  # past a head's own budget: not read
                rank = torch.arange(pick.shape[-1], device=pick.device)
                within = (rank[None] < budgets.to(pick.device)[:, None]) | (rank[None] >= n_first)  # (KV, m)
                ok = within[:, None].expand_as(pick) if ok is None else ok & within[:, None]
            out = self.gather_blocks(pick, raw, ok=ok)
            out.pick = pick
            if separate and far_bias and far_blocks > 0:  # the same prior in the attention scores
                far_pick = ~near.expand_as(relevance).gather(-1, pick)  # (KV, C, m)
                out.bias = (far_pick.repeat_interleave(self.block_size, -1).view_as(out.valid) * -far_bias).float()
            return out
        finally:
            self.search_seconds += time.perf_counter() - t0

    def _top_picks(
        self,
        relevance: torch.Tensor,
        near: torch.Tensor | None,
        budget: tuple[int, int, float],
        spread: int,
        first: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The best blocks by relevance (KV, C, nb'), best first per budget: one budget, or with
        `near` (separate budgets) `n_blocks` near ones then `far_blocks` far ones lowered by
        `far_bias`. Returns picks (KV, C, m) (block ids), their scores, and the first budget's size."""
        n_blocks, far_blocks, far_bias = budget
        nb = relevance.shape[-1]
        if near is None:  # one budget
            parts, sizes = [relevance], [n_blocks]
        else:
            parts, sizes = [relevance.masked_fill(~near, float("-inf"))], [n_blocks]
            if far_blocks:
                parts.append(relevance.masked_fill(near, float("-inf")) - far_bias)
                sizes.append(far_blocks)
        picks, scores = [], []
        for rel, m in zip(parts, sizes, strict=True):
            if spread:  # a block also counts as relevant as the `spread` blocks before it
                rel = spread_forward(rel, spread)
            values, indices = top_blocks(rel, min(m, nb))
            picks.append(indices + first)
            scores.append(values)
        return torch.cat(picks, -1), torch.cat(scores, -1), picks[0].shape[-1]

    def block_relevance(
        self,
        sel: torch.Tensor,
        scheme: str = "fixed",
        near: torch.Tensor | None = None,
        scale: float = 1.0,
        first: int = 0,
        exact: bool = False,
        far_means: bool = True,
    ) -> torch.Tensor:
        """Selectors -> (KV, C, nb - first) relevance of blocks first..nb-1 (`near` (C, nb - first)).

        sel (KV, C, D): one summed query per chunk; relevance = its inner product with the block's
        mean key (= the summed queries' total attention logit on the block's keys).
        sel (KV, C, Q, D): Q voters per chunk (zero rows: none); each attends over the block means
        (softmax of scale * q . mean key) and relevance = log of the largest share any voter
        gives the block. A sum lets the many queries that read nothing in particular drown the
        few that read one passage; a vote keeps that passage on top.

        Block means are of raw keys for `fixed` (the queries rotated to the fixed distance), of
        keys rotated by their positions for `true`; `clamped` selectors hold both halves
        [fixed | true] and `near` (C, nb) says which blocks lie within the trained context of the
        chunk (true score there, fixed-distance score beyond).

        exact (clamped, voters): a near block is instead scored by its keys themselves
        (`_exact_relevance`: the true half against the rotated keys, the exact logits). A mean
        key scores a block as if its keys were one: a block whose one key matches the voter
        ranks below a block of middling ones. Far blocks keep the means' score (far_means) or
        get the floor (the caller reads near blocks only)."""
        nb = self.n_blocks
        voting = sel.dim() == 4
        if exact and voting and scheme == "clamped":
            hit = self._exact_cache
            if hit is not None and hit[0] == (first, scale) and torch.equal(hit[1], sel) and torch.equal(hit[2], near):
                rel = hit[3]
            else:
                rel = self._exact_relevance(sel[..., self.head_dim :], near, scale, first)
                self._exact_cache = ((first, scale), sel, near, rel)
            if not far_means or bool(near.all()):  # far blocks: the floor (or none)
                return rel
            return torch.where(near, rel, self.block_relevance(sel, scheme, near, scale, first))  # far: means

        def dot(x: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:  # x (KV, C, [Q,] D) -> (KV, C, [Q,] nb)
            r = reps[:, first:nb]  # (KV, nb - first, D)
            return x @ (r[:, None] if voting else r).transpose(-1, -2)

        if scheme == "fixed":
            s = dot(sel, self.reps)
        elif scheme == "true":
            s = dot(sel, self.rreps)
        else:
            d = self.head_dim
            s = dot(sel[..., d:], self.rreps)
            if not bool(near.all()):  # blocks beyond the trained context: the fixed-distance score
                s = torch.where(near[:, None] if voting else near, s, dot(sel[..., :d], self.reps))
        if not voting:
            return s
        share = (s * scale).log_softmax(-1)  # (KV, C, Q, nb)
        # Zero rows are no voters; the floor is finite, so a chunk without any still picks blocks.
        share = share.masked_fill((sel == 0).all(-1)[..., None], -1e30)
        return share.amax(-2)

    def _exact_relevance(self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int) -> torch.Tensor:
        """Voters sel (KV, C, Q, D) at their absolute positions -> (KV, C, nb - first) relevance of
        blocks first.. (`near` (C, nb - first)): the log of the voters' summed softmax over the
        near blocks, each block scored by its best key's exact logit; zero rows are no voters.
        Far blocks get the floor.

        Why the best key: it keeps nearly all the attention mass a softmax over every memory
        would, with one exponential per block instead of one per memory; block means keep much
        less (docs/decisions.md)."""
        kv, nc, nq, d = sel.shape
        lo, near, pieces, voters, fused = self._voter_maxima(sel, near, scale, first)
        nbn = near.shape[1]
        best = fused.view(kv, nbn, nc, nq).permute(0, 2, 3, 1)  # (KV, C, Q, nbn) best key
        best.masked_fill_(~near[None, :, None], float("-inf"))
        share = best.softmax(-1).nan_to_num_(0.0)  # a chunk with nothing near: no share
        share = (share * (sel != 0).any(-1)[..., None]).sum(2)  # (KV, C, nbn): zero rows don't vote
        return torch.nn.functional.pad(share, (lo, 0)).clamp_min(1e-30).log()  # (KV, C, nb - first)

    def _voter_maxima(
        self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int
    ) -> tuple[int, torch.Tensor, list[tuple[int, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Voters sel (KV, C, Q, D) (the true half) -> lo (the first block, counted from
        `first`, that any chunk reads near), near[:, lo:], the rotated keys of those blocks (pieces:
        [(first id, (KV, len, D))]), the scaled voters (KV, C*Q, D) and their block maxima
        (KV, nbn, C*Q)."""
        b = self.block_size
        kv, nc, nq, d = sel.shape
        # Near blocks are a suffix of every chunk's blocks: score from the first near one only.
        lo = int(near.any(0).int().argmax())
        near = near[:, lo:]
        start = (first + lo) * b
        # Whole blocks (the buffer's capacity is whole blocks); the tail past n is masked below.
        # Rotated by their positions; two pieces where a ring wraps (block_max is per piece).
        pieces = self._rows(self.rkeys, start, start + near.shape[1] * b)  # [(first id, (KV, len, D))]
        voters = sel.reshape(kv, nc * nq, d).mul(scale).to(self.rkeys.dtype)  # (KV, C*Q, D)
        # In bfloat16 on AVX512-BF16, attn_kernel fuses the maxima into the product (float32
        # logits, never written out: copying the logits to float32 was a large part of the time);
        # where torch's matmul is faster (AMX) or the kernel cannot run, torch's ops.
        kernel = attn_kernel.preferred("block_max")
        parts = []
        for i, x in pieces:
            got = attn_kernel.block_max(x, voters, b, self.n - i) if kernel else None
            parts.append(attn_kernel.block_max_torch(x, voters, b, self.n - i) if got is None else got)
        fused = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return lo, near, pieces, voters, fused

    def _near_picks(
        self, sel: torch.Tensor, near: torch.Tensor, scale: float, first: int, spread: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """retrieve_blocks' near-only exact selection in two kernel calls (block_max, then
        attn_kernel.block_pick for the softmax, sum, log, spread and top m that took ~20 torch
        ops per layer): picks (KV, C, m') best first and their relevance. None where the kernels
        cannot run (the caller's torch path computes the same)."""
        key = (first, scale, spread, m)
        hit = self._pick_cache  # decoding asks once per token with the same voters
        if hit is not None and hit[0] == key and torch.equal(hit[1], sel) and torch.equal(hit[2], near):
            return hit[3]
        lo, nr, _, voters, fused = self._voter_maxima(sel[..., self.head_dim :], near, scale, first)
        got = attn_kernel.block_pick(fused, nr, voters, lo, spread, m, first)
        self._pick_cache = None if got is None else (key, sel, near, got)
        return got

    def gather_blocks(
        self, pick: torch.Tensor, raw_keys: bool = True, head0: int = 0, ok: torch.Tensor | None = None
    ) -> BlockRetrieval:
        """Blocks pick (KV', C, m) of the heads head0..head0+KV'-1 -> their entries as
        (KV'*C, m*b, ...) tensors (raw keys only when asked for: a third of the bytes copied);
        ok (KV', C, m): False marks a pick's entries invalid (not to be read)."""
        b = self.block_size
        kv, nc, m = pick.shape
        capb = self.capacity // b
        heads = torch.arange(head0, head0 + kv, device=self.device).view(kv, 1, 1)
        flat = ((pick % capb if self.ring else pick) + heads * capb).reshape(-1)

        def gather(buf: torch.Tensor) -> torch.Tensor:  # (KV, cap, D) -> (KV*C, m*b, D)
            # Rows of whole blocks (b*D contiguous elements): a 2-D index_select, 2.5x faster
            # than gathering (b, D) slabs from a 3-D view.
            return select_rows(buf.view(-1, b * self.head_dim), flat).view(kv * nc, m * b, -1)

        ids = (pick[..., None] * b + torch.arange(b, device=self.device)).view(kv * nc, m * b)
        valid = ids < self.n
        if ok is not None:
            valid &= ok.repeat_interleave(b, -1).view_as(valid)
        return BlockRetrieval(
            keys=gather(self.keys) if raw_keys or self.rkeys is None else None,
            rkeys=gather(self.rkeys) if self.rkeys is not None else None,
            values=gather(self.values),
            valid=valid,
            # Key positions only where real distances are used (not on the default fixed path).
            positions=None
            if self.rkeys is None
            else self.positions[: self.n].index_select(0, ids.clamp(max=self.n - 1).reshape(-1)).view_as(ids),
        )

    def block_attention(
        self, q: torch.Tensor, pick: torch.Tensor, ok: torch.Tensor | None, head0: int, rotated: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # (KV'*C, M, D), (KV'*C, M) float32
        """Attention of q (KV'*C, M, D) (rows head-major: head head0 + i // C, chunk i % C) over
        the blocks pick (KV', C, m) of heads head0.. as stored (rotated: the rotated keys, else
        the raw ones), read in place by attn_kernel.block_attention: what gather_blocks +
        model.attention_with_lse compute, without the gather (keys, values, positions, validity)
        or a mask; ok (KV', C, m) False masks a pick. None where the kernel cannot run or its
        attention is not the faster here (attn_kernel.preferred): the caller gathers instead."""
        if not attn_kernel.preferred("attention"):
            return None
        kv, nc, m = pick.shape
        heads = torch.arange(head0, head0 + kv, device=pick.device).repeat_interleave(nc)  # (KV'*C,)
        keys = self.rkeys if rotated else self.keys
        ok = None if ok is None else ok.reshape(kv * nc, m)
        packed = None  # the packed copies hold the last pk.shape[1] blocks
        if rotated and self.pk is not None and int(pick.min()) >= self.n_blocks - self.pk.shape[1]:
            packed = (self.pk, self.pv)
        return attn_kernel.block_attention(
            q, keys, self.values, heads, pick.reshape(kv * nc, m), ok, self.block_size, self.n, scale, self.ring, packed
        )


@dataclass
class BlockPicks:
    """LayerMemory.retrieve_blocks(gather=False): the blocks chosen, not yet gathered."""

    pick: torch.Tensor  # (KV, C, m) block ids, best first per budget
    ok: torch.Tensor | None  # (KV, C, m) False where a pick is not to be read (-inf relevance)
    raw_keys: bool  # whether the caller needs raw keys (gather_blocks' raw_keys)


def top_blocks(rel: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of rel (..., n) and their indices, best first, ties to the later
    entry (as attn_kernel.block_pick). spread_forward gives a block's next ones its relevance,
    so ties are common and decide which blocks a budget reads: the later ones are the passage's
    continuation, what spread is for (Lua at 8K: 3.903 with ties to the earlier block)."""
    values, indices = rel.flip(-1).sort(dim=-1, descending=True, stable=True)
    return values[..., :m], rel.shape[-1] - 1 - indices[..., :m]


def spread_forward(rel: torch.Tensor, spread: int) -> torch.Tensor:
    """rel (..., nb) -> max(rel[b - s] for s in 0..spread): each block inherits the relevance of
    the blocks just before it. The selector comes from the previous chunk's queries; when they
    matched a passage (a copy), this chunk reads on past it, so the passage's next blocks are
    the ones it needs."""
    out = rel
    for s in range(1, min(spread, rel.shape[-1] - 1) + 1):
        out = torch.maximum(out, torch.nn.functional.pad(rel[..., :-s], (s, 0), value=float("-inf")))
    return out
