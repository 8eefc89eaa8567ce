"""Benchmarks (library side; the CLI only displays what these return).

`run_throughput`: tokens/s of memtx scoring (window and full modes) against Hugging Face
`transformers` on the same ids in the same process, and as a fraction of the matmul peak
measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memtx_cli.engine.stream import full_nll, stream_nll
from memtx_cli.errors import MemtxError
from memtx_cli.model.loading import load_model

REPO = Path(__file__).resolve().parents[2]  # the checkout (sample_docs)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_text() -> Path:
    p = REPO / "sample_docs/legal/GPL-3.txt"
    if p.is_file():
        return p
    raise MemtxError("no default benchmark text found; pass --text FILE")


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n matmul: best of repeated runs for about `seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_token(args: Any, n: int, window: int | None) -> float:
    """Matmul FLOPs per token: weights (2 x params incl. the head) + causal attention.

    Attention: QK^T and PV cost 4*H*D per (query, key) pair; a causal query sees on average
    n/2 keys in full mode, and ~1.5 segments (S + S/2) with segments + XL cache.
    """
    d, h, kv, f, hd = args.dim, args.n_heads, args.n_kv_heads, args.ffn_dim, args.head_dim
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f
    params = args.n_layers * per_layer + d * args.vocab_size
    ctx = n / 2 if window is None else min(1.5 * window, n / 2)
    return 2 * params + args.n_layers * 4 * h * hd * ctx


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up: oneDNN builds its kernels for these shapes on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _transformers_runner(gguf_path: Path, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=dtype)
    hf.eval()

    @torch.inference_mode()
    def run(ids: torch.Tensor) -> torch.Tensor:
        logits = hf(input_ids=ids[None]).logits[0, :-1].float()
        return F.cross_entropy(logits, ids[1:], reduction="none")

    return run


def run_throughput(
    lengths: list[int],
    dtypes: list[str],
    repeats: int = 3,
    with_transformers: bool = True,
    text_path: str | None = None,
    model: str | None = None,
    threads: int | None = None,
    segment: int = 512,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    for d in dtypes:
        if d not in DTYPES:
            raise MemtxError(f"unknown dtype {d!r} (use float32, bfloat16)")
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, device="cpu", dtype="float32")
    path = Path(text_path) if text_path else default_text()
    base = lm.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
    need = max(lengths)
    # Throughput does not depend on the content: longer runs repeat the text's ids.
    ids_all = torch.tensor((base * (need // len(base) + 1))[:need])
    log(f"ids: {path.name} ({len(base)} tokens{', repeated' if need > len(base) else ''})")
    peak = {name: matmul_peak(DTYPES[name]) for name in DTYPES}
    log(f"matmul peak: float32 {peak['float32']:.0f}, bfloat16 {peak['bfloat16']:.0f} GFLOP/s")
    gguf_path = lm.card.weights_path() if lm.card.weights.get("format") == "gguf" else None
    rows = []
    for dname in dtypes:
        dt = DTYPES[dname]
        lm.model.to(dt)
        tf = _transformers_runner(gguf_path, dt) if (with_transformers and gguf_path) else None
        if with_transformers and tf is None:
            log("transformers is not installed (pip install -e '.[dev]'): skipping its column")
        for n in lengths:
            ids = ids_all[:n]
            t_win, _ = _median_time(lambda ids=ids: stream_nll(lm.model, ids, segment), repeats)
            t_full, nll = _median_time(lambda ids=ids: full_nll(lm.model, ids, lm.args.context_length), repeats)
            row = {
                "dtype": dname,
                "tokens": n,
                "window_tokens_per_s": n / t_win,
                "full_tokens_per_s": n / t_full,
                "ppl_full": float(nll.double().mean().exp()),
                "full_fraction_of_peak": n / t_full * flops_per_token(lm.args, n, None) / 1e9 / peak[dname],
                "full_fraction_of_bf16_peak": n / t_full * flops_per_token(lm.args, n, None) / 1e9 / peak["bfloat16"],
                "window_fraction_of_peak": n / t_win * flops_per_token(lm.args, n, segment) / 1e9 / peak[dname],
            }
            if tf is not None:
                t_tf, nll_tf = _median_time(lambda ids=ids, tf=tf: tf(ids), repeats)
                row["transformers_tokens_per_s"] = n / t_tf
                row["ppl_transformers"] = float(nll_tf.double().mean().exp())
            log(f"{dname} {n}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
        tf = None  # free the transformers model before the next dtype
    return {
        "model": lm.name,
        "threads": torch.get_num_threads(),
        "text": path.name,
        "peak_gflops": peak,
        "repeats": repeats,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Memory: quality (window / memory / full) and cost, on real documents of three genres

GENRE_DOCS = {
    "book": "books/austen_persuasion.txt",
    "code": "code/lua54_interpreter_repo.c.txt",
    # One 156K-token file that keeps calling the helpers it defined earlier (lodash's baseXxx).
    "code-js": "code/lodash.js",
    "legal": "legal/spdx_license_list_texts.txt",
    # Ten versions of one constitution, each ~6,700 tokens after the one it amends: the
    # near-duplicate recall a memory is for, past the window but within the trained context.
    "legal-versions": "legal/debian_constitution_all_versions.txt",
}


def corpus_doc(corpus: Path, genre: str) -> Path:
    """The benchmark document of a genre within a corpus directory (GENRE_DOCS)."""
    if genre not in GENRE_DOCS:
        raise MemtxError(f"unknown genre {genre!r} (use {', '.join(GENRE_DOCS)})")
    path = Path(corpus) / GENRE_DOCS[genre]
    if not path.is_file():
        raise MemtxError(f"{path} not found: --corpus must hold {GENRE_DOCS[genre]}")
    return path


def run_memory_bench(
    corpus: Path,
    lengths: list[int],
    genres: list[str],
    cfg: Any,
    model: str | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Perplexity and tokens/s of window-only vs memory (and full attention up to the trained
    context) on the first N tokens of a document per genre; `cfg` holds the memory settings."""
    import dataclasses
    import math

    from memtx_cli.engine.stream import run_streams

    lm = load_model(model or cfg.model, device=cfg.device, dtype=cfg.dtype)
    rows = []
    for genre in genres:
        path = corpus_doc(corpus, genre)
        all_ids = lm.tokenizer.encode(path.read_text(encoding="utf-8"))
        for n in lengths:
            if n > len(all_ids):
                log(f"{genre}: only {len(all_ids)} tokens, skipping {n}")
                continue
            ids = torch.tensor(all_ids[:n], device=lm.device)
            row: dict[str, Any] = {"genre": genre, "doc": path.name, "tokens": n}
            # Window and memory interleaved segment by segment: their tok/s see the same machine.
            runs = run_streams(lm.model, ids, [dataclasses.replace(cfg, memory=m) for m in (False, True)])
            for name, (nll, st, sec) in zip(("window", "memory"), runs, strict=True):
                row[f"ppl_{name}"] = float(nll.double().mean().exp())
                row[f"tokens_per_s_{name}"] = n / sec
                if name == "memory":
                    row["retrieval_seconds"] = st.retrieval_seconds
                    row["memory_seconds"] = sec
            row["memory_cost"] = 1 - row["tokens_per_s_memory"] / row["tokens_per_s_window"]
            if n <= lm.args.context_length:
                nll = full_nll(lm.model, ids, lm.args.context_length)
                row["ppl_full"] = float(nll.double().mean().exp())
                lw, lmem, lf = (math.log(row[k]) for k in ("ppl_window", "ppl_memory", "ppl_full"))
                row["gap_recovered"] = (lw - lmem) / (lw - lf) if lw != lf else float("nan")
            log(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            rows.append(row)
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "settings": cfg.memory_settings(),
        "rows": rows,
    }


def _short(heads: str) -> str:
    """A long head list (per-head budgets) named by its size."""
    n = len([p for p in str(heads).split(",") if p.strip()])
    return heads if len(heads) <= 24 else f"{n} listed"
