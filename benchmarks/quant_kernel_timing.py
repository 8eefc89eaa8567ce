"""Decoding's one-row products from the GGUF file's blocks: quant.c against F.linear, float32.

    python benchmarks/quant_kernel_timing.py [--out FILE]

The default model loaded in float32: one row through its 30 layers' 120 matrices (Q4_1 blocks
for quant.c, the same weights in float32 for F.linear), then the 49,152 x 576 logits (Q8_0
blocks of the tied embedding); milliseconds per pass (median of 5 rounds of 10) and the bytes
each streams per pass, with the configured thread count (torch's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _meta import emit, per_pass, run_metadata  # noqa: E402

from memtx_cli.kernels import quant  # noqa: E402
from memtx_cli.kernels.build import load_portable  # noqa: E402
from memtx_cli.model.llama import Linear  # noqa: E402
from memtx_cli.model.loading import load_model  # noqa: E402


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if load_portable() is None:
        sys.exit("quant.c does not run on this CPU (AVX2, FMA and a C compiler needed)")
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    mats = [m for m in lm.model.modules() if isinstance(m, Linear) and m.blocks is not None]
    head, emb = lm.model.head_blocks["embed"], lm.model.embed.weight
    g = torch.Generator().manual_seed(0)
    xs = {i: torch.randn(1, i, generator=g) for i in {m.in_features for m in mats}}
    res: dict = {"meta": run_metadata(), "threads": torch.get_num_threads(), "matrices": len(mats)}
    with torch.inference_mode():
        ours = per_pass(lambda: [quant.linear_unchecked(xs[m.in_features], m.blocks) for m in mats])
        theirs = per_pass(lambda: [F.linear(xs[m.in_features], m.weight) for m in mats])
        x = xs[emb.shape[1]]
        res["quant.c"] = {
            "layers_ms": ours * 1e3,
            "layers_bytes": nbytes(*[t for m in mats for t in (m.blocks.codes, m.blocks.scales)]),
            "logits_ms": per_pass(lambda: quant.linear_unchecked(x, head)) * 1e3,
            "logits_bytes": nbytes(head.codes, head.scales),
        }
        res["F.linear"] = {
            "layers_ms": theirs * 1e3,
            "layers_bytes": nbytes(*[m.weight for m in mats]),
            "logits_ms": per_pass(lambda: F.linear(x, emb)) * 1e3,
            "logits_bytes": nbytes(emb),
        }
    for r in (res["quant.c"], res["F.linear"]):
        r["layers_gb_per_s"] = r["layers_bytes"] / r["layers_ms"] / 1e6
    emit(res, a.out)


if __name__ == "__main__":
    main()
