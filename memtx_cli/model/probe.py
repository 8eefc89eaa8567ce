"""Where a model looks: the attention some query heads put on each token of a text.

Plain causal attention over the whole text (no memory), computed exactly in float32 for the
listed heads beside the model's own forward pass, which runs only up to the last listed layer.
`ask` uses it to find the lines of quoted sources that a question's tokens attend to.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from memtx_cli.errors import UsageError
from memtx_cli.model.llama import Transformer, apply_rope


def parse_query_heads(spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """ "18.6,21.2" -> [(18, 6), (21, 2)]: query heads as layer.query_head pairs."""
    out = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        layer, dot, head = part.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise UsageError(f"quote heads: {part!r} is not layer.query_head (e.g. 18.6)")
        pair = (int(layer), int(head))
        if pair[0] >= n_layers or pair[1] >= n_heads:
            raise UsageError(f"quote heads: {part} is outside the model's {n_layers} layers x {n_heads} query heads")
        out.append(pair)
    return out


@torch.inference_mode()
def attention_rows(
    model: Transformer, ids: torch.Tensor, heads: list[tuple[int, int]], first_query: int
) -> torch.Tensor:  # (len(heads), T) float32
    """For each of `heads` ((layer, query head) pairs), the attention the queries at positions
    first_query..T-1 of `ids` (T,) put on each token, averaged over those queries: each row
    sums to 1 over the tokens its queries see."""
    t = ids.shape[0]
    if not heads or not 0 <= first_query < t:
        raise UsageError(f"attention_rows needs heads and a query position in 0..{t - 1}, got {first_query}")
    by_layer: dict[int, list[int]] = defaultdict(list)  # layer -> indices into heads
    for n, (layer, _) in enumerate(heads):
        by_layer[layer].append(n)
    group = model.args.n_heads // model.args.n_kv_heads
    scale = model.args.head_dim**-0.5
    x = model.embed(ids[None])
    rope = model.rope(t, ids.device)
    cos, sin = rope
    pos = torch.arange(t, device=ids.device)
    hidden = pos[None, :] > pos[first_query:, None]  # (nq, T): query p sees keys 0..p
    out = torch.zeros(len(heads), t, dtype=torch.float32, device=ids.device)
    for i, block in enumerate(model.layers[: max(by_layer) + 1]):
        if i in by_layer:
            hs = [heads[n][1] for n in by_layer[i]]
            q, k, _ = block.attn.project(block.attn_norm(x))  # (1, H, T, D), (1, KV, T, D)
            q = apply_rope(q[:, :, first_query:], cos[first_query:], sin[first_query:])[0, hs].float()
            k = apply_rope(k, cos, sin)[0, [h // group for h in hs]].float()
            s = (q @ k.transpose(-1, -2)) * scale  # (h, nq, T)
            out[by_layer[i]] = s.masked_fill(hidden, float("-inf")).softmax(-1).mean(1)
        x, _ = block(x, None, rope, None)
    return out
