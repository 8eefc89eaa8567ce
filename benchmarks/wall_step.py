"""Wall time of a memory segment's parts: the same segments with the card's defaults and with
the window alone (interleaved, one process), the memory run's main functions timed by
wrapping them (no profiler; nested entries are indented and included in their parents).

    python benchmarks/wall_step.py [--tokens 65536] [--genre code] [--segments 8]

torch.profiler (`profile_step.py`) gives per-op self time but not the Python between ops;
this gives wall time per function, Python included.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch
from profile_step import streams  # same set-up (run from the repo root: benchmarks/ is on the path)

from memtx_cli import memory as mem_mod
from memtx_cli import model as model_mod
from memtx_cli.tasks.bench import GENRE_DOCS

SPENT: dict[str, float] = collections.defaultdict(float)
ACTIVE = {"run": ""}
TIMED = [
    (model_mod.Attention, "block_memory_attention", "block_memory_attention"),
    (mem_mod.LayerMemory, "retrieve_blocks", "  retrieve_blocks"),
    (mem_mod.LayerMemory, "gather_blocks", "  gather_blocks"),
    (mem_mod.LayerMemory, "block_attention", "  LayerMemory.block_attention (blocks read in place)"),
    (model_mod, "memory_bias", "  memory_bias"),
    (model_mod.Attention, "far_token_attention", "far_token_attention"),
    (mem_mod.LayerMemory, "retrieve_far", "  retrieve_far"),
    (mem_mod.LayerMemory, "far_attention", "  LayerMemory.far_attention (search + attention, fused)"),
    (model_mod.Attention, "merge_memory", "merge_memory (with the local attention)"),
    (model_mod, "attention_with_lse", "attention_with_lse (memory blocks and local)"),
    (model_mod, "memory_search_vectors", "memory_search_vectors"),
    (model_mod, "block_selectors", "block_selectors"),
    (mem_mod.LayerMemory, "add", "LayerMemory.add"),
]


def timed(owner: object, name: str, label: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def g(*a, **k):
        if ACTIVE["run"] != "memory":
            return f(*a, **k)
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            SPENT[label] += time.perf_counter() - t

    setattr(owner, name, g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--genre", default="code", choices=sorted(GENRE_DOCS))
    ap.add_argument("--segments", type=int, default=8)
    args = ap.parse_args()
    for owner, name, label in TIMED:
        timed(owner, name, label)
    ids, runs, seg, first = streams(args.tokens, args.genre, args.segments)
    n = args.tokens
    total: dict[str, float] = collections.defaultdict(float)
    with torch.inference_mode():
        for s in range(first, n, seg):
            for name, st in runs.items():
                ACTIVE["run"] = name
                t = time.perf_counter()
                st.step(ids[s : s + seg])
                total[name] += time.perf_counter() - t
                ACTIVE["run"] = ""
    per = 1e3 / args.segments
    print(
        f"ms per segment, {args.genre}, tokens {first}-{n}: "
        f"memory {total['memory'] * per:.1f}, window {total['window'] * per:.1f}"
    )
    for label, s in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {label:48s} {s * per:7.1f}")


if __name__ == "__main__":
    main()
