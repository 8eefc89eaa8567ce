"""Decoding's matrix-vector products from a GGUF file's quantized weights: the Python face of
quant.c.

A GGUF model's Q4_1 and Q8_0 matrices are kept beside their float32 copy as `Blocks`: codes
and float32 scales per run of 32 weights. Decoding multiplies one row by every matrix, a pass
bound by memory bandwidth, and quant.c streams a sixth (Q4_1) or a quarter (Q8_0) of the bytes
of the float32 weights: the same weights exactly, summed in another order (agreement to
float32 rounding). `linear` returns None wherever it does not apply (more than `ROWS` rows,
not float32, autograd, no kernel on this CPU, or F.linear timed faster here) and the caller
uses F.linear.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memtx_cli.kernels import attn
from memtx_cli.kernels.build import load_portable

ROWS = 4  # rows of x at most: decoding feeds one; prompts take torch's GEMM
BLOCK = 32  # weights per block
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # float16 d (and m for Q4_1), then the codes
KINDS = tuple(BLOCK_BYTES)


@dataclass
class Blocks:
    """One matrix (O, I) as GGUF blocks: Q4_1 codes (O, I/2) uint8 (two per byte: a block's
    first 16 weights in the low nibbles) with scales (O, I/32, 2) float32 (d, m); or Q8_0
    codes (O, I) int8 with scales (O, I/32) float32 (d)."""

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scales.shape[1] * BLOCK

    def dequantize(self) -> torch.Tensor:
        """The float32 weights (O, I): d * q (+ m), one rounding, as GGUF's dequantization."""
        o = self.codes.shape[0]
        if self.kind == "q8_0":
            return (self.scales[..., None] * self.codes.view(o, -1, BLOCK).float()).reshape(o, -1)
        q = self.codes.view(o, -1, 16)
        codes = torch.cat([q & 0x0F, q >> 4], dim=-1).float()
        return torch.addcmul(self.scales[..., 1:2], self.scales[..., 0:1], codes).reshape(o, -1)


def from_blocks(kind: str, raw: np.ndarray | torch.Tensor) -> Blocks:
    """GGUF blocks as stored, (O, I/32 * bytes per block) bytes per row -> Blocks."""
    b = torch.as_tensor(np.ascontiguousarray(raw)).view(torch.uint8)
    o = b.shape[0]
    b = b.reshape(o, -1, BLOCK_BYTES[kind])
    if kind == "q8_0":
        d = b[..., :2].contiguous().view(torch.float16).float().reshape(o, -1)
        return Blocks(kind, b[..., 2:].contiguous().view(torch.int8).reshape(o, -1), d)
    dm = b[..., :4].contiguous().view(torch.float16).float().reshape(o, -1, 2)
    return Blocks(kind, b[..., 4:].reshape(o, -1).contiguous(), dm.contiguous())


_WINS: dict[str, bool] = {}


def preferred() -> bool:
    """MEMTX_KERNEL=1 always (where it runs), 0 never; otherwise the faster of quant.c and
    F.linear on this CPU, timed once per process on one layer's shapes."""
    mode = os.environ.get("MEMTX_KERNEL", "auto")
    if mode == "0" or load_portable() is None:
        return False
    if mode == "1":
        return True
    if "quant" not in _WINS:
        _WINS["quant"] = _kernel_wins()
    return _WINS["quant"]


def _kernel_wins() -> bool:
    """One decoded row through one layer's four matrices, as Q4_1 (13 MB in float32: more than
    a core's caches, as a model's weights are)."""
    g = torch.Generator().manual_seed(0)
    mats = []
    for o, i in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
        raw = torch.randint(0, 256, (o, i // BLOCK, BLOCK_BYTES["q4_1"]), dtype=torch.uint8, generator=g)
        raw[..., :4] = torch.tensor([0.01, 0.0], dtype=torch.float16).view(torch.uint8)  # finite d, m
        b = from_blocks("q4_1", raw.reshape(o, -1))
        mats.append((b, b.dequantize(), torch.randn(1, i, generator=g)))
    with torch.inference_mode():
        ours, theirs = attn._median_times(
            [lambda: [linear_unchecked(x, b) for b, _, x in mats], lambda: [F.linear(x, w) for _, w, x in mats]]
        )
    return ours <= theirs


def linear(x: torch.Tensor, blocks: Blocks | None) -> torch.Tensor | None:
    """x (..., I) . W^T (W held by blocks) -> (..., O) float32 by quant.c, or None (see the module)."""
    if blocks is None:
        return None
    i = x.shape[-1]
    if (
        x.numel() > ROWS * i
        or x.dtype != torch.float32
        or blocks.shape[1] != i
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and x.requires_grad)
        or not attn.enabled()
        or not preferred()
    ):
        return None
    return linear_unchecked(x.reshape(-1, i).contiguous(), blocks).view(*x.shape[:-1], blocks.shape[0])


def linear_unchecked(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """quant.c on a contiguous float32 x (M, I), no checks (the kernel loads)."""
    m, i, o = x.shape[0], x.shape[1], blocks.shape[0]
    y = torch.empty(m, o, dtype=torch.float32)
    lib = load_portable()
    assert lib is not None
    fn = lib.memtx_q4_linear if blocks.kind == "q4_1" else lib.memtx_q8_linear
    rc = fn(
        x.data_ptr(), blocks.codes.data_ptr(), blocks.scales.data_ptr(), m, i, o, y.data_ptr(), torch.get_num_threads()
    )
    if rc != 0:
        raise MemoryError("quant kernel: out of memory")
    return y
