"""Planning: settings and a model's shape -> which layers and heads read memory, and how much.

Pure functions of a Config and the model's numbers (layers, KV heads, query heads): the engine
asks them once per stream and hands each memory layer its plan; they never touch tensors.
"""

from __future__ import annotations

import re

from memtx_cli.config import Config, exact_block_select
from memtx_cli.errors import UsageError


def layers_for(cfg: Config, n_layers: int) -> list[int]:
    """Parse memory_layers against the model's depth; [] when memory is off."""
    if not cfg.memory:
        return []
    return parse_layers(cfg.memory_layers, n_layers)


def heads_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
    """Memory layer -> its KV heads with memory (None = all of them); {} when memory is off.
    n_heads (query heads) is needed by `topqN` only."""
    chosen = head_choice(cfg, n_layers, n_kv, n_heads)
    return {i: (None if len(h) == n_kv else sorted(h)) for i, h in chosen.items()}


def query_heads_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int) -> dict[int, list[list[int]] | None]:
    """Memory layer -> for each of its KV heads with memory (heads_for's order), the query
    heads of its group (0..G-1) that read memory; None = every query head of them all."""
    g = n_heads // n_kv
    out: dict[int, list[list[int]] | None] = {}
    for i, heads in head_choice(cfg, n_layers, n_kv, n_heads).items():
        qs = [sorted(range(g) if heads[h] is None else heads[h]) for h in sorted(heads)]
        out[i] = None if all(len(q) == g for q in qs) else qs
    return out


def blocks_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
    """Memory layer -> the blocks each of its memory KV heads reads (heads_for's order), None
    when every head reads `blocks` (only "layer.head:n" pairs give a head its own budget)."""
    spec = str(cfg.memory_heads).strip().lower()
    if ":" not in spec:
        return dict.fromkeys(heads_for(cfg, n_layers, n_kv, n_heads))
    own = parse_head_blocks(spec, n_layers, n_kv)
    out: dict[int, list[int] | None] = {}
    for i, heads in heads_for(cfg, n_layers, n_kv, n_heads).items():
        got = [own[i][h] or cfg.blocks for h in (heads if heads is not None else range(n_kv))]
        out[i] = None if all(n == cfg.blocks for n in got) else got
    return out


def head_choice(cfg: Config, n_layers: int, n_kv: int, n_heads: int) -> dict[int, dict[int, set[int] | None]]:
    """Memory layer -> {KV head: its query heads within the group with memory, None = all}."""
    layers = layers_for(cfg, n_layers)
    spec = str(cfg.memory_heads).strip().lower()
    if spec == "all":
        return {i: dict.fromkeys(range(n_kv)) for i in layers}
    query = spec.startswith("topq")
    if spec.startswith("top"):
        n = spec[4:] if query else spec[3:]
        ranking = cfg.query_head_ranking if query else cfg.head_ranking
        key = "query-head-ranking" if query else "head-ranking"
        ranked = [p for p in str(ranking).split(",") if p.strip()]
        if not n.isdigit() or int(n) < 1:
            raise UsageError(
                f"memory heads {cfg.memory_heads!r}: use topN (KV heads) or topqN (query heads) "
                "with N >= 1, e.g. top60 or topq144"
            )
        if not ranked:
            raise UsageError(
                f"memory heads {cfg.memory_heads!r} needs a {key} (the model card has none): "
                f"run benchmarks/head_ranking.py{' --query-heads' if query else ''} and set {key}, "
                "or list layer.head pairs"
            )
        spec = ",".join(ranked[: int(n)])
    chosen: dict[int, dict[int, set[int] | None]] = {}
    if query:
        if n_heads < n_kv:
            raise UsageError(f"memory heads {cfg.memory_heads!r}: the model's query heads are unknown")
        g = n_heads // n_kv
        for layer, qheads in parse_heads(spec, n_layers, n_heads, "query head").items():
            for j in qheads:
                got = chosen.setdefault(layer, {}).setdefault(j // g, set())
                got.add(j % g)
    else:
        for layer, kvs in parse_heads(spec, n_layers, n_kv).items():
            chosen[layer] = dict.fromkeys(kvs)
    out = {i: chosen[i] for i in layers if i in chosen}
    if layers and not out:
        raise UsageError(f"memory heads {cfg.memory_heads!r} select no head in memory layers {cfg.memory_layers}")
    return out


def far_rows_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int] | None]:
    """Memory layer -> the rows of its memory heads (heads_for's order) that read the far past:
    None = all of them, [] = none. far_heads lists candidates; those that are memory heads of
    far layers read it (the card's list stays valid when --memory-heads changes)."""
    heads = heads_for(cfg, n_layers, n_kv, n_heads)
    far = set(parse_layers(cfg.far_layers, n_layers)) if heads else set()
    if str(cfg.far_heads).strip().lower() == "all":
        return {i: (None if i in far else []) for i in heads}
    wanted = _head_list(cfg.far_heads, "far heads", "all or layer.head pairs", n_layers, n_kv)
    out: dict[int, list[int] | None] = {}
    for i, hs in heads.items():
        order = list(range(n_kv)) if hs is None else hs
        out[i] = [r for r, h in enumerate(order) if i in far and h in wanted.get(i, set())]
    return out


def far_bias_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[float] | None]:
    """Memory layer -> the prior of each of its far-reading rows (far_rows_for's order): 0 for
    the recall heads, far-bias for the others; None where every row has far-bias."""
    heads = heads_for(cfg, n_layers, n_kv, n_heads)
    if not str(cfg.recall_heads).strip():
        return {i: None for i in heads}
    recall = _head_list(cfg.recall_heads, "recall heads", "layer.head pairs", n_layers, n_kv)
    out: dict[int, list[float] | None] = {}
    for i, rows in far_rows_for(cfg, n_layers, n_kv, n_heads).items():
        order = list(range(n_kv)) if heads[i] is None else heads[i]
        rows = list(range(len(order))) if rows is None else rows
        out[i] = [0.0 if order[r] in recall.get(i, set()) else cfg.far_bias for r in rows]
    return out


def bank_heads_for(cfg: Config, n_layers: int, n_kv: int, n_heads: int = 0) -> dict[int, list[int]]:
    """Memory layer -> the KV heads a new bank stores (and reads): the memory heads, those in
    bank_heads unless it is all; layers left without one are absent."""
    heads = heads_for(cfg, n_layers, n_kv, n_heads)
    spec = str(cfg.bank_heads).strip().lower()
    wanted = None
    if spec != "all":
        wanted = _head_list(cfg.bank_heads, "bank heads", "all or layer.head pairs", n_layers, n_kv)
    out: dict[int, list[int]] = {}
    for i, hs in heads.items():
        got = [h for h in (range(n_kv) if hs is None else hs) if wanted is None or h in wanted.get(i, set())]
        if got:
            out[i] = got
    return out


def near_blocks_only(cfg: Config, far_blocks: int) -> bool:
    """Whether a memory layer with this far-block budget reads memory as blocks within the
    trained context only, through their rotated keys: clamped blocks, near ones only, selected
    exactly by voters."""
    return (
        cfg.retrieval == "block"
        and cfg.positions == "clamped"
        and exact_block_select(cfg.memory_settings())
        and cfg.block_votes > 0
        and far_blocks == 0
    )


def _head_list(spec: str, what: str, forms: str, n_layers: int, n_kv: int) -> dict[int, set[int]]:
    """parse_heads with the setting's name and accepted forms in its one-line error."""
    try:
        return parse_heads(spec, n_layers, n_kv)
    except UsageError:
        raise UsageError(
            f"{what} {spec!r}: use {forms}, e.g. 18.2,23.0 (the model has {n_layers} layers x {n_kv} KV heads)"
        ) from None


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """ "all" | "8,16,24" | "10-19" | "4,20-29" -> sorted layer indices, each checked."""
    spec = str(spec).strip().lower()
    if spec in ("all", "*"):
        return list(range(n_layers))
    if spec == "auto":
        return list(range(n_layers // 2, n_layers))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if m is None:
            raise UsageError(f"memory layers {spec!r}: use all, a list like 8,16,24 or a range like 10-19")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for i in range(lo, hi + 1):
            if not 0 <= i < n_layers:
                raise UsageError(
                    f"memory layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})"
                )
            out.add(i)
    if not out:
        raise UsageError(f"memory layers {spec!r} selects no layer")
    return sorted(out)


def parse_heads(spec: str, n_layers: int, n_kv: int, what: str = "KV head") -> dict[int, set[int]]:
    """ "18.2,8.0,23.0" (layer.head pairs; n_kv heads per layer) -> {layer: {heads}}, each checked.
    A pair may carry its own block budget, "18.2:224" (`parse_head_blocks` reads it)."""
    return {layer: set(heads) for layer, heads in parse_head_blocks(spec, n_layers, n_kv, what).items()}


def parse_head_blocks(spec: str, n_layers: int, n_kv: int, what: str = "KV head") -> dict[int, dict[int, int]]:
    """ "18.2:224,8.0" -> {layer: {head: blocks}}, 0 where the pair gives no budget of its own."""
    out: dict[int, dict[int, int]] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        m = re.fullmatch(r"(\d+)\.(\d+)(?::(\d+))?", part)
        if m is None or m.group(3) is not None and (int(m.group(3)) < 1 or what != "KV head"):
            raise UsageError(
                f"memory heads {spec!r}: use all, topN, topqN or layer.head pairs like 18.2,8.0 "
                "(KV heads may carry their own block budget >= 1: 18.2:224,8.0:32)"
            )
        layer, head = int(m.group(1)), int(m.group(2))
        if not 0 <= layer < n_layers or not 0 <= head < n_kv:
            raise UsageError(
                f"memory head {part} is out of range: the model has {n_layers} layers and {n_kv} {what}s per layer"
            )
        out.setdefault(layer, {})[head] = int(m.group(3) or 0)
    if not out:
        raise UsageError(f"memory heads {spec!r} selects no head")
    return out
