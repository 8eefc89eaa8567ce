"""Give each KV head the number of memory blocks it needs: the model card's `memory-heads`
budgets (`layer.head:blocks`, best first).

    python benchmarks/head_budgets.py [--tokens 8192] [--docs a.txt,b.txt] [--json curves.json]
    python benchmarks/head_budgets.py --curves benchmarks/results/head_budget_curves.json[,more.json] [--total N]
    python benchmarks/head_budgets.py --query-heads --json curves_per_query_head.json

The second form reuses saved curves (several files: the mean over all their documents); with
the defaults either prints the card's memory-heads.

For each document (held out from the memory benchmark's, as for head_ranking.py), the first N
tokens stream through the model with block memory in every head (the card's settings
otherwise). In the last segment, for every memory layer and KV head, the blocks are ranked as
the head's selector ranks them (voters, exact selection, spread), and the head's output with
full attention over everything before is compared with its output when it reads only the
local window plus its best m blocks, for m in --steps. The difference, projected through each
query head's slice of the output matrix and summed over the KV head's query heads, is divided
by the layer's mean squared residual norm (head_ranking.py's measure; m = 0 is exactly its
"cut to the window"); each document's curves are normalised so their m = 0 values sum to 1,
and the documents are averaged.

Budgets are then given greedily: the next blocks go to the head whose curve drops most per
block (looking ahead to any larger step), until `--total` is spent: blocks summed over KV
heads (the attention's cost is proportional), plus a fixed cost per memory head and per memory
layer (`--head-cost`, `--layer-cost`, in blocks; selection, gathers and merges). The default
total is the cost of 36 heads x 96 blocks, the previous defaults. Prints the allocation and the
predicted remaining change (1.0 = no memory) of it and of top36 x 96 for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

import torch
from _meta import CORPUS

from memtx_cli.config import merge_config
from memtx_cli.engine.stream import Streamer
from memtx_cli.memory.blocks import spread_forward
from memtx_cli.model.llama import rotate_by
from memtx_cli.model.loading import load_model

HELD_OUT = "books/austen_northangerabbey.txt,code/cpython311_pydecimal.py,legal/GPL-3.txt"


@torch.inference_mode()
def head_curves(lm, ids: torch.Tensor, steps: list[int], query_heads: bool = False) -> dict[str, list[float]]:
    """'layer.head' -> output change (share of the residual) with the window + best m blocks;
    query_heads: 'layer.query_head' -> the same per query head (its slice of the output)."""
    c = dataclasses.replace(merge_config(lm.card.settings), memory_heads="all")
    st = Streamer(lm.model, c)
    seg, b, chunk = c.segment, c.block_size, c.block_chunk
    rels: dict[int, tuple] = {}
    queries: dict[int, tuple] = {}
    resid: dict[int, float] = {}
    for s in range(0, len(ids) - seg, seg):
        st.step(ids[s : s + seg])
    for i, mem in st.memories.items():  # record the last segment's selection and queries
        relevance = mem.block_relevance

        def rel(*a, i=i, orig=relevance, **kw):
            r = orig(*a, **kw)
            rels[i] = (r.float().cpu(), a[4], a[2].cpu())  # (KV, C, nb - first), first, near
            return r

        mem.block_relevance = rel
        attn = lm.model.layers[i].attn
        attend = attn.block_memory_attention

        def att(q, qr, groups, mr, *rest, i=i, orig=attend):
            queries[i] = (qr.float().cpu(), mr.q_pos.cpu(), len(mr.memory))
            return orig(q, qr, groups, mr, *rest)

        attn.block_memory_attention = att

    def norm(_m, a, i):  # the layer's mean squared residual norm
        resid[i] = float(a[0].float().pow(2).sum(-1).mean())

    hooks = [
        layer.register_forward_pre_hook(lambda m, a, i=i: norm(m, a, i)) for i, layer in enumerate(lm.model.layers)
    ]
    st.step(ids[len(ids) - seg :])
    for h in hooks:
        h.remove()
    inv = lm.model.inv_freq.cpu()
    n_heads, d = lm.args.n_heads, lm.args.head_dim
    out: dict[str, list[float]] = {}
    for i, mem in st.memories.items():
        qr, q_pos, n = queries[i]
        r, first, near = rels[i]
        nb = -(-n // b)
        score = torch.full((r.shape[0], r.shape[1], nb), float("-inf"))
        score[:, :, first : first + r.shape[2]] = spread_forward(r.masked_fill(~near, float("-inf")), c.block_spread)
        order = score.argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb).expand_as(order).contiguous())
        rank = rank.masked_fill(score == float("-inf"), 1 << 30)  # never read
        keys, vals = mem.rkeys[:, : n + seg].float().cpu(), mem.values[:, : n + seg].float().cpu()
        pos = mem.positions[: n + seg].cpu()  # the last segment's own keys are written by now
        qm = rotate_by(qr, inv, q_pos.view(1, 1, -1))  # (KV, G, T, D) at their positions
        g = qm.shape[1]
        chunk_of = q_pos // chunk - int(q_pos[0]) // chunk
        local = ((pos >= int(q_pos[0]) - seg) | (pos < c.sinks))[None]  # (1, N) XL cache + segment + sinks
        block = (torch.arange(n + seg) // b).clamp(max=nb - 1)
        wo = lm.model.layers[i].attn.wo.weight.float().cpu().view(lm.args.dim, n_heads, d)
        causal = pos[None] <= q_pos[:, None]  # (T, N)
        for h in range(qm.shape[0]):
            s = (qm[h] @ keys[h].T / d**0.5).masked_fill(~causal[None], float("-inf"))  # (G, T, N)
            full = s.softmax(-1) @ vals[h]  # (G, T, D)
            rk = rank[h][chunk_of][:, block]  # (T, N) rank of each memory's block for its chunk
            rk[:, n:] = 1 << 30
            curves = [[] for _ in range(g)]  # per query head j of the group
            for m in steps:
                part = s.masked_fill(~(local | (rk < m))[None], float("-inf")).softmax(-1) @ vals[h]
                for j in range(g):
                    moved = float(((full - part)[j] @ wo[:, h * g + j].T).pow(2).sum(-1).mean())
                    curves[j].append(moved / resid[i])
            if query_heads:  # 'layer.query_head', as in the card's query-head-ranking
                out.update({f"{i}.{h * g + j}": cv for j, cv in enumerate(curves)})
            else:
                out[f"{i}.{h}"] = [sum(x) for x in zip(*curves, strict=True)]
    return out


def allocate(
    curves: dict[str, list[float]], steps: list[int], total: float, cost: Callable[[dict[str, int]], float]
) -> dict[str, int]:
    """Greedy: blocks go to the head whose change drops most per unit of cost, until `total` is
    spent. cost(alloc) prices a whole allocation ({head: blocks}, heads without blocks left
    out), e.g. `cost_of`: the blocks plus fixed costs per memory head and layer (selection,
    gathers, merges); a step's price is what it adds."""
    at = dict.fromkeys(curves, 0)  # index into steps
    alloc: dict[str, int] = {}
    while True:
        best = None
        base = cost(alloc)
        for h, cv in curves.items():
            j = at[h]
            for j2 in range(j + 1, len(steps)):
                step = cost({**alloc, h: steps[j2]}) - base
                if base + step > total:
                    break
                gain = (cv[j] - cv[j2]) / step
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, h, j2)
        if best is None:
            return alloc
        _, h, at[h] = best
        alloc[h] = steps[at[h]]


def cost_of(alloc: dict[str, int], head_cost: int, layer_cost: int) -> int:
    """Blocks summed over KV heads, plus `head_cost` per memory head and `layer_cost` per memory layer."""
    return sum(alloc.values()) + head_cost * len(alloc) + layer_cost * len({h.split(".")[0] for h in alloc})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--docs", default=HELD_OUT)
    ap.add_argument("--total", type=int, default=0, help="cost to spend (default: that of top36 x 96 blocks)")
    ap.add_argument("--head-cost", type=int, default=20, help="fixed cost of a memory head, in blocks")
    ap.add_argument("--layer-cost", type=int, default=80, help="fixed cost of a memory layer, in blocks")
    ap.add_argument("--steps", default="0,16,32,48,64,80,96,128,160,192,224,256")
    ap.add_argument("--json", default="", help="write the curves here")
    ap.add_argument("--query-heads", action="store_true", help="measure per query head (with --json)")
    ap.add_argument("--curves", default="", help="read curves from --json files (comma-separated), not measure")
    args = ap.parse_args()
    if args.query_heads and not args.json:
        ap.error("--query-heads writes its curves to --json (benchmarks/query_budgets.py reads them)")
    steps = [int(x) for x in args.steps.split(",")]
    lm = load_model(args.model, device="cpu", dtype="auto")
    per_doc = []
    for name in args.curves.split(",") if args.curves else []:  # each file: the mean of its docs
        with open(name) as f:
            saved = json.load(f)
        keep = [j for j, m in enumerate(saved["steps"]) if m in steps]  # --steps picks among the saved
        steps = [saved["steps"][j] for j in keep]
        per_doc += [{h: [cv[j] for j in keep] for h, cv in saved["curves"].items()}] * len(saved["docs"].split(","))
    for doc in args.docs.split(",") if not args.curves else []:
        path = CORPUS / doc if not doc.startswith("/") else doc
        ids = torch.tensor(lm.tokenizer.encode(open(path, encoding="utf-8").read())[: args.tokens])
        ids = ids[: len(ids) // 512 * 512]  # whole segments (the GPL has 7,639 tokens)
        cv = head_curves(lm, ids, steps, args.query_heads)
        z = sum(v[0] for v in cv.values())
        per_doc.append({h: [x / z for x in v] for h, v in cv.items()})
        print(f"{doc}: {len(ids)} tokens", file=sys.stderr)
    curves = {h: [sum(d[h][j] for d in per_doc) / len(per_doc) for j in range(len(steps))] for h in per_doc[0]}
    if args.json and not args.curves:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "docs": args.docs, "curves": curves}, f)
    if args.query_heads:  # budgets are per KV head; benchmarks/query_budgets.py reads these curves
        return
    ranked = [p for p in merge_config(lm.card.settings).head_ranking.split(",") if p]
    before = dict.fromkeys(ranked[:36], 96)  # the defaults before budgets: top36 x 96 blocks
    total = args.total or cost_of(before, args.head_cost, args.layer_cost)
    got = allocate(curves, steps, total, lambda a: cost_of(a, args.head_cost, args.layer_cost))

    def left(alloc: dict[str, int]) -> float:
        return sum(cv[steps.index(alloc.get(h, 0))] for h, cv in curves.items())

    for name, a in (("budgets", got), ("top36 x 96", before)):
        layers = len({h.split(".")[0] for h in a})
        print(
            f"{name}: {len(a)} heads in {layers} layers, {sum(a.values())} blocks, cost "
            f"{cost_of(a, args.head_cost, args.layer_cost)}, change left {left(a):.3f} (no memory 1.000)",
            file=sys.stderr,
        )
    order = sorted(got, key=lambda h: (-got[h], ranked.index(h) if h in ranked else 0))
    print(",".join(f"{h}:{got[h]}" for h in order))


if __name__ == "__main__":
    main()
