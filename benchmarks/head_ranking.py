"""Rank a model's KV heads by how much they need memory: the `head-ranking` of a model card.

    python benchmarks/head_ranking.py [--model smollm2-135m] [--tokens 8192] [--docs a.txt,b.txt]

For each document (held out from the memory benchmark's), full causal attention runs over the
first N tokens. For every layer and query head, the head's output with full attention is
compared with its output when cut to the local window the streaming engine gives it (sinks +
`window` tokens); the difference, projected through the head's slice of the output matrix,
is its contribution to the residual stream that only long context provides. Squared norms are
averaged over the queries past position 2,048, divided by the layer's mean squared residual
norm, summed over a KV head's query heads, and normalised per document so each document weighs
the same. Prints the KV heads (layer.head) best first, comma-separated: `--memory-heads topN`
takes the first N. With `--query-heads`, ranks the query heads instead (layer.query_head, not
summed per KV head): the card's `query-head-ranking`, which `--memory-heads topqN` reads.

This is the DuoAttention idea (retrieval heads vs streaming heads, Xiao et al. 2024) measured
directly instead of with trained gates.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from memtx_cli.model.llama import apply_rope
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS

# Not the memory benchmark's documents (Persuasion, the Lua sources, the SPDX texts, the Debian
# constitution's versions).
HELD_OUT = "books/austen_northangerabbey.txt,code/cpython311_pydecimal.py,legal/GPL-3.txt"


@torch.inference_mode()
def head_need(lm, ids: torch.Tensor, window: int, sinks: int, start: int) -> torch.Tensor:
    """(layers, query heads) share of the residual change that needs keys beyond the window."""
    m, a = lm.model, lm.args
    n, h, d = ids.shape[0], a.n_heads, a.head_dim
    pos = torch.arange(n, device=ids.device)
    dist = pos[:, None] - pos[None]
    allowed = (dist >= 0) & ((dist < window) | (pos[None] < sinks))
    wbias = torch.zeros(n, n, dtype=m.embed.weight.dtype, device=ids.device).masked_fill_(~allowed, float("-inf"))
    need = torch.zeros(a.n_layers, h)
    x = m.embed(ids[None])  # (1, T, C)
    cos, sin = m.rope(n, ids.device)
    for li, layer in enumerate(m.layers):
        at = layer.attn
        q, k, v = at.project(layer.attn_norm(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (1, H, T, D)
        local = F.scaled_dot_product_attention(q[:, :, start:], k, v, attn_mask=wbias[start:], enable_gqa=True)
        delta = full[0, :, start:] - local[0]  # (H, T', D)
        w = at.wo.weight.view(a.dim, h, d)  # (C, H, D): head h's slice of the output projection
        moved = torch.einsum("htd,chd->htc", delta.float(), w.float()).pow(2).sum(-1).mean(-1)  # (H,)
        need[li] = moved.cpu() / x[0, start:].float().pow(2).sum(-1).mean().cpu()
        x = x + at.wo(full.transpose(1, 2).reshape(1, n, -1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return need / need.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--docs", default=HELD_OUT, help="comma-separated paths under ../shared/corpus")
    ap.add_argument("--window", type=int, default=1024, help="local keys besides the sinks (segment x 2)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--start", type=int, default=2048, help="queries before this position are not counted")
    ap.add_argument("--query-heads", action="store_true", help="rank query heads (layer.query_head), not KV heads")
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu", dtype="auto")
    total = 0
    for doc in args.docs.split(","):
        t = time.perf_counter()
        ids = torch.tensor(lm.tokenizer.encode((CORPUS / doc).read_text(encoding="utf-8"))[: args.tokens])
        total = total + head_need(lm, ids, args.window, args.sinks, min(args.start, len(ids) // 2))
        print(f"{doc}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    a = lm.args
    if not args.query_heads:  # a KV head's need: the sum of its query heads' (q head j -> KV head j // G)
        total = total.view(a.n_layers, a.n_kv_heads, a.n_heads // a.n_kv_heads).sum(-1)
    per_layer = total.shape[1]
    order = total.flatten().argsort(descending=True).tolist()
    print(",".join(f"{i // per_layer}.{i % per_layer}" for i in order))


if __name__ == "__main__":
    main()
