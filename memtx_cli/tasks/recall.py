"""`memtx bench recall`: recall@k of approximate FAISS indexes against exact search, and the
token-level recall of block retrieval, on real keys and queries from the model."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtx_cli.config import blocks_read
from memtx_cli.model.llama import rotate_by
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import _short, corpus_doc


def run_recall(
    corpus: Path,
    tokens: int,
    genre: str,
    kinds: list[str],
    cfg: Any,
    k: int = 32,
    model: str | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """recall@k of approximate indexes against exact search, on real keys and queries.

    Streams `tokens` tokens of a real document with exact (flat) memory, records the search
    vectors of the last segment's queries, then searches the same keys with each index kind.
    """
    lm = load_model(model or cfg.model, device=cfg.device, dtype=cfg.dtype)
    text = corpus_doc(corpus, genre).read_text(encoding="utf-8")
    ids = torch.tensor(lm.tokenizer.encode(text)[:tokens], device=lm.device)
    # Index kinds search the token memory's recorded queries; block recall streams on its own.
    st, recorded = _record_token_queries(lm, ids, cfg, bool(set(kinds) - {"block"}))
    rows = []
    for kind in kinds:
        if kind == "block":
            row, bst = block_recall(lm, ids, cfg, k, log)
            rows.append(row)
            if not len(next(iter(st.memories.values()))):
                st = bst  # block recall alone: its memory tells the entries and layers
            continue
        row = _index_recall(kind, st, recorded, cfg, k, lm.model.inv_freq)
        log(
            f"{kind}: recall@{k} {row['recall']:.3f}, build {row['build_seconds']:.2f} s, "
            f"{row['queries_per_s']:,.0f} queries/s"
        )
        rows.append(row)
    return {
        "genre": genre,
        "tokens": tokens,
        "entries_per_head": len(next(iter(st.memories.values()))),
        "layers": list(st.memories),
        "positions": cfg.positions,
        "k": k,
        "rows": rows,
    }


def _record_token_queries(lm: Any, ids: torch.Tensor, cfg: Any, run: bool) -> tuple[Any, dict[int, torch.Tensor]]:
    """Stream `ids` with exact token memory; the last segment's search vectors per layer."""
    from memtx_cli.engine.stream import Streamer

    c = dataclasses.replace(cfg, memory=True, index="flat", retrieval="token")
    st = Streamer(lm.model, c)
    seg = c.segment
    recorded: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for s in range(0, len(ids) - seg, seg) if run else ():
            st.step(ids[s : s + seg])
        for i, mem in st.memories.items():
            orig = mem.retrieve

            def rec(q: torch.Tensor, kk: int, i: int = i, orig: Any = orig) -> Any:
                recorded[i] = q.detach().float().cpu()
                return orig(q, kk)

            mem.retrieve = rec  # type: ignore[method-assign]
        if run:
            st.step(ids[len(ids) - seg :])
    return st, recorded


def _index_recall(
    kind: str, st: Any, recorded: dict[int, torch.Tensor], cfg: Any, k: int, inv_freq: torch.Tensor
) -> dict[str, Any]:
    """One index kind over every memory head's keys, searched with the recorded queries."""
    from memtx_cli.memory.index import HeadIndex, IndexSpec

    spec = IndexSpec(kind=kind, nprobe=cfg.nprobe)
    seg = cfg.segment
    recalls, build_s, search_s, nq = [], 0.0, 0.0, 0
    for i, mem in st.memories.items():
        q = recorded[i]
        for h in range(mem.n_kv):
            keys_t = mem.keys[h, : len(mem)].float()
            if cfg.positions == "true":  # the index holds keys rotated by their positions
                keys_t = rotate_by(keys_t, inv_freq, mem.positions[: len(mem)])
            keys = keys_t.cpu().numpy()
            qh = np.ascontiguousarray(q[h].numpy())
            exact = mem.heads[h].search(qh, k, mem.keys[h, : len(mem)])
            t = time.perf_counter()
            # Added segment by segment, as streaming does: IVF trains once ivf_train_at keys arrived.
            idx = HeadIndex(mem.head_dim, spec)
            for s0 in range(0, len(keys), seg):
                ids = np.arange(s0, min(s0 + seg, len(keys)), dtype=np.int64)
                idx.add(np.ascontiguousarray(keys[s0 : s0 + seg]), ids)
            build_s += time.perf_counter() - t
            t = time.perf_counter()
            got = idx.search(qh, k, mem.keys[h, : len(mem)])
            search_s += time.perf_counter() - t
            nq += len(qh)
            recalls.append(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)]))
    return {
        "index": kind,
        "recall": float(np.mean(recalls)),
        "build_seconds": build_s,
        "queries_per_s": nq / search_s if search_s else float("nan"),
    }


def block_recall(lm: Any, ids: torch.Tensor, cfg: Any, k: int, log: Callable[[str], None]) -> tuple[dict, Any]:
    """Token-level recall@k of block retrieval with the settings as given (selector, votes,
    spread, positions, heads): the document streams with block memory; in its last segment
    each memory head's blocks, as its chunks chose them, are compared with every query head's
    exact top-k memories by attention score (queries and keys at their positions; only the
    memories a chunk may read at their real distance when clamped near-only, all otherwise),
    and with the share of each query's softmax over those memories that the chosen blocks hold."""
    c = dataclasses.replace(cfg, memory=True, retrieval="block")
    st, picks, queries, seconds = _record_block_reads(lm, ids, c)
    hit, total, mass, readable = 0.0, 0.0, [], []
    for i, mem in st.memories.items():
        h_, t_, m_, r_ = _score_block_reads(mem, st, c, picks[i], queries[i], k, lm.model.inv_freq.cpu(), i)
        hit, total = hit + h_, total + t_
        mass += m_
        readable += r_
    recall, share = hit / max(total, 1.0), float(torch.cat(mass).mean())
    budgets = [
        v.float().cpu() if v is not None else torch.full((st.memories[i].n_kv,), float(c.blocks))
        for i, v in st.head_blocks.items()
    ]
    row = {
        "index": f"block ({blocks_read(c.memory_heads, c.blocks)} x {c.block_size} per {c.block_chunk} queries, "
        f"votes {c.block_votes}, spread {c.block_spread}, {c.positions}, heads {_short(c.memory_heads)})",
        "recall": recall,
        "attention_mass_read": share,
        "memories_readable": float(torch.cat(readable).mean()),
        "memories_read": c.block_size * float(torch.cat(budgets).mean()),  # per memory head, on average
        "build_seconds": 0.0,
        "queries_per_s": sum(len(m) for m in mass) / seconds,
    }
    log(f"{row['index']}: token recall@{k} {recall:.3f}, share of the memory's attention mass read {share:.3f}")
    return row, st


def _record_block_reads(lm: Any, ids: torch.Tensor, c: Any) -> tuple[Any, dict, dict, float]:
    """Stream `ids` with block memory; in the last segment, record each layer's picks and the
    queries (with their positions and the memory's size when they read it)."""
    from memtx_cli.engine.stream import Streamer

    st = Streamer(lm.model, c)
    seg = c.segment
    picks: dict[int, list[torch.Tensor]] = {}
    queries: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    with torch.inference_mode():
        for s in range(0, len(ids) - seg, seg):
            st.step(ids[s : s + seg])
        for i, mem in st.memories.items():
            orig_retrieve = mem.retrieve_blocks

            def retrieve(*a: Any, i: int = i, orig: Any = orig_retrieve, **kw: Any) -> Any:
                got = orig(*a, **kw)
                picks.setdefault(i, []).append(got.pick.cpu())  # (KV, C, m), chunks in order
                return got

            mem.retrieve_blocks = retrieve  # type: ignore[method-assign]
            attn = lm.model.layers[i].attn
            orig_attn = attn.block_memory_attention

            def attend(q: Any, qr: Any, groups: Any, mr: Any, *rest: Any, i: int = i, orig: Any = orig_attn) -> Any:
                queries[i] = (qr.float().cpu(), mr.q_pos.cpu(), len(mr.memory))  # read before write
                return orig(q, qr, groups, mr, *rest)

            attn.block_memory_attention = attend  # type: ignore[method-assign]
        t0 = time.perf_counter()
        st.step(ids[len(ids) - seg :])
        seconds = time.perf_counter() - t0
    return st, picks, queries, seconds


def _score_block_reads(
    mem: Any, st: Any, c: Any, layer_picks: list[torch.Tensor], query: tuple, k: int, inv_freq: torch.Tensor, i: int
) -> tuple[float, float, list[torch.Tensor], list[torch.Tensor]]:
    """One layer: exact top-k memories found in the chunks' blocks, and the attention mass they hold."""
    qr, q_pos, n = query  # (KV, G, T, D), (T,), memories when the segment read them
    b, chunk = c.block_size, c.block_chunk
    pick = torch.cat(layer_picks, 1)  # (KV, C, m)
    start = mem.block_starts().cpu()[torch.arange(n) // b]  # (n,) position of each entry's block start
    keys = (mem.rkeys if c.positions != "fixed" else mem.keys)[:, :n].float().cpu()  # (KV, n, D)
    if c.positions != "fixed":  # R(a)q . R(b)k: the real distance
        qm = rotate_by(qr, inv_freq, q_pos.view(1, 1, -1))
    else:  # every memory at the fixed distance
        qm = rotate_by(qr, inv_freq, torch.full((1, 1, 1), st.distance))
    chunk_of = (q_pos // chunk) - int(q_pos[0]) // chunk  # (T,) chunk index within the segment
    q_last = (q_pos // chunk + 1) * chunk - 1
    nb = -(-n // b)
    block_of = torch.arange(n) // b
    hit = total = 0.0
    mass, readable = [], []
    for h in range(qm.shape[0]):
        scores = (qm[h] @ keys[h].T) / math.sqrt(qm.shape[-1])  # (G, T, n) attention logits
        if c.positions == "clamped" and c.far_blocks == 0:  # near-only: within the trained context
            far = (q_last[:, None] - start[None]) > st.horizon  # (T, n), as retrieve_blocks decides
            scores = scores.masked_fill(far[None], float("-inf"))
        chosen = torch.zeros(pick.shape[1], nb, dtype=torch.bool)  # (C, nb) blocks each chunk read
        budget = st.head_blocks[i]  # per-head budgets: the head's first (best) blocks only
        ph = pick[h] if budget is None else pick[h][:, : int(budget[h])]
        chosen.scatter_(1, ph.clamp(max=nb - 1), True)
        read = chosen[chunk_of][:, block_of]  # (T, n) entries each token's chunk read
        top = scores.topk(min(k, n), -1)  # (G, T, k)
        valid = top.values > float("-inf")
        got = read[None].expand_as(scores).gather(-1, top.indices)  # (G, T, k)
        hit += float((got & valid).sum())
        total += float(valid.sum())
        w = torch.softmax(scores, -1).nan_to_num(0.0)  # (G, T, n); a row with nothing readable: 0
        mass.append((w * read[None]).sum(-1).flatten())
        readable.append((scores[0] > float("-inf")).sum(-1).float())  # (T,) memories each token may read
    return hit, total, mass, readable
