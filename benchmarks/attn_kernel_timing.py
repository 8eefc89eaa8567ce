"""attn_kernel against the torch paths it replaces, on random bfloat16 inputs of the shapes the
default model's scoring uses (one process, interleaved, median of `--reps`).

    python benchmarks/attn_kernel_timing.py [--reps 20]

- attention: ns per query-key score, attn_kernel.attention vs torch's CPU flash kernel
  (`_scaled_dot_product_flash_attention_for_cpu`, what SDPA calls), and the largest output
  difference between them (bfloat16 rounding);
- block maxima of exact selection (3 heads, 7,616 keys, 96 voters): attn_kernel.block_max vs a
  bfloat16 matmul, its float32 copy and amax over blocks of 32;
- far reads of one head for a 512-token segment (its 8 chunks, 32 memories per token among
  28,000 / 56,000, 3 query heads attending): attn_kernel.far_attention (via
  LayerMemory.far_attention) vs model.far_reads (retrieve_far per chunk, attention in torch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from memtx_cli.attention.far import far_reads
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.memory.index import IndexSpec
from memtx_cli.memory.store import LayerMemory

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if attn_kernel.load() is None:
        raise SystemExit("attn_kernel cannot run here (needs AVX512-BF16, Linux and a C compiler)")
    bf = torch.bfloat16
    print(f"threads {torch.get_num_threads()}")
    print("attention (B, queries, keys): kernel / flash ns per score, max |difference|")
    for b, m, s in [(24, 192, 512), (8, 192, 1024), (8, 192, 3072), (8, 192, 7168), (3, 1536, 1029), (3, 3, 1024)]:
        q, k, v = torch.randn(b, m, 64, dtype=bf), torch.randn(b, s, 64, dtype=bf), torch.randn(b, s, 64, dtype=bf)
        t = timed(
            {
                "kernel": lambda q=q, k=k, v=v: attn_kernel.attention(q, k, v, None, 0.125),
                "flash": lambda q=q, k=k, v=v: FLASH(q[None], k[None], v[None], 0.0, False, scale=0.125),
            },
            args.reps,
        )
        diff = (
            (
                attn_kernel.attention(q, k, v, None, 0.125)[0].float()
                - FLASH(q[None], k[None], v[None], 0.0, False, scale=0.125)[0][0].float()
            )
            .abs()
            .max()
        )
        n = b * m * s
        print(f"  ({b}, {m}, {s}): {t['kernel'] / n * 1e9:.2f} / {t['flash'] / n * 1e9:.2f} ns, {diff:.4f}")
    keys, voters = torch.randn(3, 7616, 64, dtype=bf), torch.randn(3, 96, 64, dtype=bf)

    def torch_maxima() -> torch.Tensor:
        return (keys @ voters.transpose(1, 2)).float().view(3, 238, 32, 96).amax(2)

    t = timed({"kernel": lambda: attn_kernel.block_max(keys, voters, 32, 7616), "torch": torch_maxima}, args.reps)
    print(f"block maxima (3, 7616 keys, 96 voters): kernel {t['kernel'] * 1e3:.2f} ms, torch {t['torch'] * 1e3:.2f} ms")
    for n in (28000, 56000):
        mem = LayerMemory(1, 64, IndexSpec("flat"), dtype=bf, block_size=32, capacity=n)
        mem.add(torch.randn(1, n, 64), torch.randn(1, n, 64), torch.arange(n))
        qs, qa = torch.randn(1, 512, 64).bfloat16().float(), torch.randn(1, 3, 512, 64, dtype=bf)
        chunk_of = torch.arange(512) // 64
        bound = n - 512 + chunk_of * 64  # each chunk's far past ends where its own does
        how = SimpleNamespace(memory=mem, far_top_k=32, far_bias=2.0, far_bank=False, far_row_bias=None, far_pages=0)
        t = timed(
            {
                "kernel": lambda b=bound, m=mem, q=qs, a=qa: m.far_attention(q, a, b, 32, 0.125, 2.0),
                "torch": lambda b=bound, q=qs, a=qa, c=chunk_of, h=how: far_reads(q, a, b, c, h, 0.125, None),
            },
            args.reps,
        )
        print(
            f"far reads ({n} keys, 512 tokens, 3 heads, 32 each): "
            f"kernel {t['kernel'] * 1e3:.2f} ms, torch {t['torch'] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
