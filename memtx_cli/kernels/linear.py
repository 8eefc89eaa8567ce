"""Decoding's matrix-vector products in bfloat16: the Python face of linear.c.

Decoding multiplies one row by each weight matrix: a pass over the weights bound by memory
bandwidth, which linear.c streams faster than torch's bfloat16 path on the AVX512-BF16 CPUs
measured (docs/decisions.md). `linear` returns None wherever it does not apply (more than
`ROWS` rows, float32, a bias, autograd, no kernel on this CPU, or torch timed faster here) and
the caller uses F.linear: results agree to bfloat16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memtx_cli.kernels import attn

ROWS = 4  # rows of x at most: decoding feeds one; prompts take torch's GEMM


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (..., I) . w (O, I)^T -> (..., O) in bfloat16 by linear.c, or None (see the module)."""
    i = x.shape[-1]
    if (
        x.numel() > ROWS * i
        or x.dtype != torch.bfloat16
        or w.dtype != torch.bfloat16
        or i % 32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        or not w.is_contiguous()
        or not attn.preferred("linear")
    ):
        return None
    return linear_unchecked(x.reshape(-1, i).contiguous(), w).view(*x.shape[:-1], w.shape[0])


def linear_or_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), by linear.c where `linear` applies (no bias, a few rows)."""
    y = linear(x, w) if bias is None else None
    return F.linear(x, w, bias) if y is None else y


def kernel_wins() -> bool:
    """Time linear.c against F.linear on one decoded row through four weight matrices of one
    layer's shapes (14 MB: more than a core's caches, as a model's weights are)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g).to(torch.bfloat16) for o, i in ((960, 576), (576, 576), (3072, 576))] * 2
    x = torch.randn(1, 576, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        ours, theirs = attn._median_times(
            [lambda: [linear_unchecked(x, w) for w in ws], lambda: [F.linear(x, w) for w in ws]]
        )
    return ours <= theirs


def linear_unchecked(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear.c on a contiguous bfloat16 x (M, I) and w (O, I), no checks (the kernel loads)."""
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    attn._run("linear", x.data_ptr(), w.data_ptr(), x.shape[0], x.shape[1], w.shape[0], y.data_ptr())
    return y
