"""A/B timing of versions of the attention kernel (kernels/attn.c): each source compiled apart, calls interleaved in one
process (medians), the same inputs for all.

    git show 726c912:memtx_cli/kernels/attn.c > /tmp/old.c
    python benchmarks/kernel_ab.py /tmp/old.c memtx_cli/kernels/attn.c [--real 65536] [--reps 7]

Times, per source:
- far reads of one head (attn_kernel.far_attention: 512 tokens, 32 memories each, 3 query heads)
  over 1,024 / 4,096 / 16,384 / 56,000 keys; random keys, or with --real N the far-read inputs
  of the Lua sources' last segment at N tokens (the card's defaults; the first far head), each
  length a prefix of those keys. Also whether every source read the same keys;
- attention (B, 192 queries, S keys) and block_attention (B chunks x 192 queries, nbk blocks of
  32 from a 10,240-row buffer), in ns per score.
docs/decisions.md's far-scan figures come from this comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memtx_cli import attn_kernel as ak


def compile_all(sources: list[str], where: Path) -> list[ctypes.CDLL]:
    libs = []
    for i, src in enumerate(sources):
        so = where / f"v{i}.so"
        subprocess.run(["cc", *ak.FLAGS, "-shared", "-fPIC", src, "-o", str(so), "-lm"], check=True)
        lib = ctypes.CDLL(str(so))
        for name, args in ak.SIGNATURES.items():
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = args, ctypes.c_int
        libs.append(lib)
    return libs


def signature(src: str, name: str) -> str:
    """The C declaration of memtx_<name> in a source (to time only what every version can run
    with this memtx's ctypes signatures)."""
    text = Path(src).read_text()
    at = text.find(f"int memtx_{name}(")
    return "" if at < 0 else " ".join(text[at : text.find("{", at)].split())


def interleaved(libs: list[ctypes.CDLL], call: Callable[[], object], reps: int) -> tuple[list[float], list[object]]:
    """Median seconds of call() with each library loaded, interleaved; the first results."""
    times: list[list[float]] = [[] for _ in libs]
    first: list[object] = []
    for rep in range(reps + 1):
        for i, lib in enumerate(libs):
            ak._lib = lib
            t = time.perf_counter()
            out = call()
            if rep:  # the first round warms up
                times[i].append(time.perf_counter() - t)
            else:
                first.append(out)
    return [statistics.median(t) for t in times], first


def real_far_inputs(n: int) -> dict[str, torch.Tensor]:
    """The first far head's far_attention inputs in the last segment of the Lua sources' first n tokens."""
    from _meta import CORPUS

    from memtx_cli import memory as mem_mod
    from memtx_cli.config import merge_config
    from memtx_cli.engine.stream import Streamer
    from memtx_cli.model.loading import load_model
    from memtx_cli.tasks.bench import GENRE_DOCS

    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    cfg = merge_config(lm.card.settings)
    ids = torch.tensor(lm.tokenizer.encode((CORPUS / GENRE_DOCS["code"]).read_text())[:n])
    st = Streamer(lm.model, cfg, expected_tokens=n)
    saved: dict[str, torch.Tensor] = {}
    orig = mem_mod.LayerMemory.far_attention

    def spy(self, q, qa, bound, k, scale, bias, rows=None):  # type: ignore[no-untyped-def]
        if not saved:
            h = rows[0] if rows else 0
            saved.update(
                keys=self.keys[h, : self.n].clone(),
                values=self.values[h, : self.n].clone(),
                qs=q[0].float().clone(),
                qa=qa[0].clone(),
                bound=bound.clone(),
            )
        return orig(self, q, qa, bound, k, scale, bias, rows)

    with torch.inference_mode():
        for s in range(0, n - 512, 512):
            st.step(ids[s : s + 512])
        mem_mod.LayerMemory.far_attention = spy
        try:
            st.step(ids[n - 512 : n])
        finally:
            mem_mod.LayerMemory.far_attention = orig
    if not saved:
        raise SystemExit(f"no far reads at {n} tokens (needs more than the trained context)")
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", help="versions of kernels/attn.c")
    ap.add_argument("--real", type=int, default=0, help="far reads on the Lua run's keys at this many tokens")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if ak.load() is None:
        raise SystemExit("attn_kernel cannot run here (needs AVX512-BF16, Linux and a C compiler)")
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        libs = compile_all(args.sources, Path(tmp))
        print("sources:", ", ".join(args.sources))
        real = real_far_inputs(args.real) if args.real else None
        print("far reads, one head, 512 tokens (ms; same keys read):", "real" if real else "random", "keys")
        for n in (1024, 4096, 16384, 56000):
            if real is not None:
                if n > real["keys"].shape[0]:
                    continue
                keys, values, qs, qa = real["keys"][:n], real["values"][:n], real["qs"], real["qa"]
                bound = (real["bound"] - real["bound"].max() + n).clamp(min=0)
            else:
                keys, values = torch.randn(n, 64, generator=g).to(bf), torch.randn(n, 64, generator=g).to(bf)
                qs, qa = torch.randn(512, 64, generator=g), torch.randn(3, 512, 64, generator=g).to(bf)
                bound = torch.full((512,), n)
            t, outs = interleaved(
                libs,
                lambda k=keys, v=values, q=qs, a=qa, b=bound: ak.far_attention(k, v, q, a, b, 32, 0.125, 2.0, True),
                args.reps,
            )
            same = all(torch.equal(outs[0][2].sort(-1).values, o[2].sort(-1).values) for o in outs)
            print(f"  {n:6d} keys: " + " / ".join(f"{x * 1e3:.2f}" for x in t) + f"  same: {same}")
        print("attention (B, queries, keys), ns per score:")
        for b, m, s in [(8, 192, 1024), (8, 192, 3072), (3, 1536, 1029)]:
            q, k, v = (torch.randn(b, x, 64, generator=g).to(bf) for x in (m, s, s))
            t, _ = interleaved(libs, lambda q=q, k=k, v=v: ak.attention(q, k, v, None, 0.125), args.reps)
            print(f"  ({b}, {m}, {s}): " + " / ".join(f"{x / (b * m * s) * 1e9:.3f}" for x in t))
        if len({signature(src, "block_attention") for src in args.sources}) > 1:
            print("block_attention: the sources' signatures differ; not timed")
            return
        print("block_attention (chunks, blocks of 32 read), ns per score:")
        kb, vb = torch.randn(3, 10240, 64, generator=g).to(bf), torch.randn(3, 10240, 64, generator=g).to(bf)
        for b, nbk in [(24, 16), (24, 48), (8, 224)]:
            q = torch.randn(b, 192, 64, generator=g).to(bf)
            heads = torch.arange(b) % 3
            blocks = torch.stack([torch.randperm(300, generator=g)[:nbk] for _ in range(b)])
            t, _ = interleaved(
                libs,
                lambda q=q, h=heads, bl=blocks: ak.block_attention(q, kb, vb, h, bl, None, 32, 10240, 0.125),
                args.reps,
            )
            print(f"  ({b}, {nbk}): " + " / ".join(f"{x / (b * 192 * nbk * 32) * 1e9:.3f}" for x in t))


if __name__ == "__main__":
    main()
