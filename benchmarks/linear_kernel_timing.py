"""Decoding's one-row products: linear.c against torch's F.linear, bfloat16.

    python benchmarks/linear_kernel_timing.py [--out FILE]

One row through 30 layers' weight matrices of SmolLM2-135M's shapes (q/k/v fused 960 x 576,
output 576 x 576, gate/up fused 3072 x 576, down 576 x 1536), distinct random weights per layer
(212 MB, streamed from memory as decoding streams the model's), then the 49,152 x 576 logits;
milliseconds per pass (median of 5 rounds of 10) and the weights' bytes per second, with the
configured thread count (torch's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _meta import emit, per_pass, run_metadata  # noqa: E402

from memtx_cli.kernels import attn as attn_kernel  # noqa: E402
from memtx_cli.kernels.linear import linear_unchecked  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if attn_kernel.load() is None:
        sys.exit("linear.c does not run on this CPU (AVX512-BF16 and a C compiler needed)")
    g = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(o, i, generator=g) * 0.05).bfloat16() for o, i in SHAPES] for _ in range(30)]
    head = (torch.randn(49152, 576, generator=g) * 0.05).bfloat16()
    x, h = torch.randn(1, 576, generator=g).bfloat16(), torch.randn(1, 1536, generator=g).bfloat16()
    nbytes = sum(w.numel() * 2 for ws in layers for w in ws)
    res: dict = {"meta": run_metadata(), "threads": torch.get_num_threads(), "weights_bytes": nbytes}
    with torch.inference_mode():
        for name, f in (("linear.c", linear_unchecked), ("F.linear", F.linear)):
            sec = per_pass(lambda f=f: [f(h if j == 3 else x, w) for ws in layers for j, w in enumerate(ws)])
            logits = per_pass(lambda f=f: f(x, head))
            res[name] = {"layers_ms": sec * 1e3, "gb_per_s": nbytes / sec / 1e9, "logits_ms": logits * 1e3}
    emit(res, a.out)


if __name__ == "__main__":
    main()
