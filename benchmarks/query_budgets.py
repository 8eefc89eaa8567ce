"""Would block budgets per query head beat budgets per KV head? A check on measured curves.

    python benchmarks/head_budgets.py --query-heads --json benchmarks/results/head_budget_curves_query.json
    python benchmarks/query_budgets.py benchmarks/results/head_budget_curves_query.json

The first command measures, per query head, how far its output moves from full attention's
with the window plus its best m blocks (head_budgets.py's measure, per query head's slice of
the output matrix). This script prices an allocation as the work it causes: every block a
query head reads costs one unit (its share of the flash attention), every block a KV head
gathers (the most any of its query heads reads) one more (the gathers cost about as much per
block as a query head's attention: 1.06 s of gathers and ~3.1 s of memory flash calls for
2,336 blocks x 3 query heads, over the last 16 segments of a 64K Lua run, cProfile, scratch),
plus fixed costs per memory KV head (80) and layer (320). It prints the change the card's
KV-head budgets leave, then head_budgets.allocate's greedy per query head at the same cost
and at less.
"""

from __future__ import annotations

import json
import sys

from head_budgets import allocate  # the same greedy as the card's budgets (benchmarks/ is on sys.path)

from memtx_cli.config import merge_config
from memtx_cli.model.cards import find_card

G = 3  # query heads per KV head (SmolLM2-135M: 9 / 3)
HEAD_COST, LAYER_COST = 80, 320


def cost(qb: dict[str, int]) -> float:
    kvmax: dict[tuple[int, int], int] = {}
    for q, b in qb.items():
        if b:
            layer, qh = map(int, q.split("."))
            kvmax[(layer, qh // G)] = max(kvmax.get((layer, qh // G), 0), b)
    layers = {layer for layer, _ in kvmax}
    return sum(qb.values()) + sum(kvmax.values()) + HEAD_COST * len(kvmax) + LAYER_COST * len(layers)


def main() -> None:
    saved = json.load(open(sys.argv[1]))
    steps, curves = saved["steps"], saved["curves"]
    spec = merge_config(find_card("smollm2-135m").settings).memory_heads
    card = {}
    for part in spec.split(","):
        head, blocks = part.split(":")
        layer, kv = map(int, head.split("."))
        card.update({f"{layer}.{kv * G + j}": int(blocks) for j in range(G)})

    def left(qb: dict[str, int]) -> float:
        return sum(cv[steps.index(qb.get(q, 0))] for q, cv in curves.items())

    print(f"card (per KV head): change left {left(card):.4f}, cost {cost(card):.0f}")
    for frac in (1.0, 0.8, 0.6):
        qb = allocate(curves, steps, cost(card) * frac, cost)
        same = sum(
            1
            for layer_kv in {(q.split(".")[0], int(q.split(".")[1]) // G) for q in qb}
            if len({qb.get(f"{layer_kv[0]}.{layer_kv[1] * G + j}", 0) for j in range(G)}) == 1
        )
        kvs = len({(q.split(".")[0], int(q.split(".")[1]) // G) for q, b in qb.items() if b})
        print(
            f"per query head at {frac:.0%} of that cost: change left {left(qb):.4f}, "
            f"{sum(1 for b in qb.values() if b)} query heads in {kvs} KV heads, {same} of them one budget for all {G}"
        )


if __name__ == "__main__":
    main()
