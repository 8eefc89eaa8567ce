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

from memtx_cli.config import blocks_read
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


def _block_recall(lm: Any, ids: torch.Tensor, cfg: Any, k: int, log: Callable[[str], None]) -> tuple[dict, Any]:
    """Token-level recall@k of block retrieval with the settings as given (selector, votes,
    spread, positions, heads): the document streams with block memory; in its last segment
    each memory head's blocks, as its chunks chose them, are compared with every query head's
    exact top-k memories by attention score (queries and keys at their positions; only the
    memories a chunk may read at their real distance when clamped near-only, all otherwise),
    and with the share of each query's softmax over those memories that the chosen blocks hold."""
    import dataclasses
    import math

    from memtx_cli.engine.stream import Streamer
    from memtx_cli.model.llama import rotate_by

    c = dataclasses.replace(cfg, memory=True, retrieval="block")
    st = Streamer(lm.model, c)
    seg = c.segment
    picks: dict[int, list[torch.Tensor]] = {}
    queries: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    with torch.inference_mode():
        for s in range(0, len(ids) - seg, seg):
            st.step(ids[s : s + seg])
        for i, mem in st.memories.items():
            orig_retrieve = mem.retrieve_blocks

            def retrieve(*a: Any, i: int = i, orig: Any = orig_retrieve, **kw: Any) -> Any:
                got = orig(*a, **kw)
                picks.setdefault(i, []).append(got.pick.cpu())  # (KV, C, m), chunks in order
                return got

            mem.retrieve_blocks = retrieve  # type: ignore[method-assign]
            attn = lm.model.layers[i].attn
            orig_attn = attn.block_memory_attention

            def attend(q: Any, qr: Any, groups: Any, mr: Any, *rest: Any, i: int = i, orig: Any = orig_attn) -> Any:
                queries[i] = (qr.float().cpu(), mr.q_pos.cpu(), len(mr.memory))  # read before write
                return orig(q, qr, groups, mr, *rest)

            attn.block_memory_attention = attend  # type: ignore[method-assign]
        t0 = time.perf_counter()
        st.step(ids[len(ids) - seg :])
        seconds = time.perf_counter() - t0
    inv_freq = lm.model.inv_freq.cpu()
    b, chunk = c.block_size, c.block_chunk
    hit: list[float] = []
    total: list[float] = []
    mass: list[torch.Tensor] = []
    readable: list[torch.Tensor] = []
    for i, mem in st.memories.items():
        qr, q_pos, n = queries[i]  # (KV, G, T, D), (T,), memories when the segment read them
        pick = torch.cat(picks[i], 1)  # (KV, C, m)
        start = mem.block_starts().cpu()[torch.arange(n) // b]  # (n,) position of each entry's block start
        keys = (mem.rkeys if c.positions != "fixed" else mem.keys)[:, :n].float().cpu()  # (KV, n, D)
        if c.positions != "fixed":  # R(a)q . R(b)k: the real distance
            qm = rotate_by(qr, inv_freq, q_pos.view(1, 1, -1))
        else:  # every memory at the fixed distance
            qm = rotate_by(qr, inv_freq, torch.full((1, 1, 1), st.distance))
        chunk_of = (q_pos // chunk) - int(q_pos[0]) // chunk  # (T,) chunk index within the segment
        q_last = (q_pos // chunk + 1) * chunk - 1
        nb = -(-n // b)
        block_of = torch.arange(n) // b
        for h in range(qm.shape[0]):
            scores = (qm[h] @ keys[h].T) / math.sqrt(qm.shape[-1])  # (G, T, n) attention logits
            if c.positions == "clamped" and c.far_blocks == 0:  # near-only: within the trained context
                far = (q_last[:, None] - start[None]) > st.horizon  # (T, n), as retrieve_blocks decides
                scores = scores.masked_fill(far[None], float("-inf"))
            chosen = torch.zeros(pick.shape[1], nb, dtype=torch.bool)  # (C, nb) blocks each chunk read
            budget = st.head_blocks[i]  # per-head budgets: the head's first (best) blocks only
            ph = pick[h] if budget is None else pick[h][:, : int(budget[h])]
            chosen.scatter_(1, ph.clamp(max=nb - 1), True)
            read = chosen[chunk_of][:, block_of]  # (T, n) entries each token's chunk read
            top = scores.topk(min(k, n), -1)  # (G, T, k)
            valid = top.values > float("-inf")
            got = read[None].expand_as(scores).gather(-1, top.indices)  # (G, T, k)
            hit.append(float((got & valid).sum()))
            total.append(float(valid.sum()))
            w = torch.softmax(scores, -1).nan_to_num(0.0)  # (G, T, n); a row with nothing readable: 0
            mass.append((w * read[None]).sum(-1).flatten())
            readable.append((scores[0] > float("-inf")).sum(-1).float())  # (T,) memories each token may read
    recall, share = sum(hit) / max(sum(total), 1.0), float(torch.cat(mass).mean())
    row = {
        "index": f"block ({blocks_read(c.memory_heads, c.blocks)} x {c.block_size} per {c.block_chunk} queries, "
        f"votes {c.block_votes}, "
        f"spread {c.block_spread}, {c.positions}, heads {_short(c.memory_heads)})",
        "recall": recall,
        "attention_mass_read": share,
        "memories_readable": float(torch.cat(readable).mean()),
        "memories_read": b
        * float(  # per memory head, on average (heads may have budgets of their own)
            torch.cat(
                [
                    v.float().cpu() if v is not None else torch.full((st.memories[i].n_kv,), float(c.blocks))
                    for i, v in st.head_blocks.items()
                ]
            ).mean()
        ),
        "build_seconds": 0.0,
        "queries_per_s": sum(len(m) for m in mass) / seconds,
    }
    log(f"{row['index']}: token recall@{k} {recall:.3f}, share of the memory's attention mass read {share:.3f}")
    return row, st


def run_recall(
    corpus: Path,
    tokens: int,
    genre: str,
    kinds: list[str],
    cfg: Any,
    k: int = 32,
    model: str | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """recall@k of approximate indexes against exact search, on real keys and queries.

    Streams `tokens` tokens of a real document with exact (flat) memory, records the search
    vectors of the last segment's queries, then searches the same keys with each index kind.
    """
    import dataclasses

    import numpy as np

    from memtx_cli.engine.stream import Streamer
    from memtx_cli.memory.index import HeadIndex, IndexSpec
    from memtx_cli.model.llama import rotate_by

    lm = load_model(model or cfg.model, device=cfg.device, dtype=cfg.dtype)
    text = corpus_doc(corpus, genre).read_text(encoding="utf-8")
    ids = torch.tensor(lm.tokenizer.encode(text)[:tokens], device=lm.device)
    c = dataclasses.replace(cfg, memory=True, index="flat", retrieval="token")
    st = Streamer(lm.model, c)
    seg = c.segment
    # Index kinds search the token memory's recorded queries; block recall streams on its own.
    with torch.inference_mode():
        for s in range(0, len(ids) - seg, seg) if set(kinds) - {"block"} else ():
            st.step(ids[s : s + seg])
        recorded: dict[int, torch.Tensor] = {}
        for i, mem in st.memories.items():
            orig = mem.retrieve

            def rec(q: torch.Tensor, kk: int, i: int = i, orig: Any = orig) -> Any:
                recorded[i] = q.detach().float().cpu()
                return orig(q, kk)

            mem.retrieve = rec  # type: ignore[method-assign]
        if set(kinds) - {"block"}:
            st.step(ids[len(ids) - seg :])
    rows = []
    for kind in kinds:
        if kind == "block":
            row, bst = _block_recall(lm, ids, cfg, k, log)
            rows.append(row)
            if not len(next(iter(st.memories.values()))):
                st = bst  # block recall alone: its memory tells the entries and layers
            continue
        spec = IndexSpec(kind=kind, nprobe=cfg.nprobe)
        recalls, build_s, search_s, nq = [], 0.0, 0.0, 0
        for i, mem in st.memories.items():
            q = recorded[i]
            for h in range(mem.n_kv):
                keys_t = mem.keys[h, : len(mem)].float()
                if cfg.positions == "true":  # the index holds keys rotated by their positions
                    keys_t = rotate_by(keys_t, lm.model.inv_freq, mem.positions[: len(mem)])
                keys = keys_t.cpu().numpy()
                qh = np.ascontiguousarray(q[h].numpy())
                exact = mem.heads[h].search(qh, k, mem.keys[h, : len(mem)])
                t = time.perf_counter()
                # Added segment by segment, as streaming does: IVF trains once ivf_train_at keys arrived.
                idx = HeadIndex(mem.head_dim, spec)
                for s0 in range(0, len(keys), seg):
                    idx.add(
                        np.ascontiguousarray(keys[s0 : s0 + seg]),
                        np.arange(s0, min(s0 + seg, len(keys)), dtype=np.int64),
                    )
                build_s += time.perf_counter() - t
                t = time.perf_counter()
                got = idx.search(qh, k, mem.keys[h, : len(mem)])
                search_s += time.perf_counter() - t
                nq += len(qh)
                recalls.append(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)]))
        row = {
            "index": kind,
            "recall": float(np.mean(recalls)),
            "build_seconds": build_s,
            "queries_per_s": nq / search_s if search_s else float("nan"),
        }
        log(f"{kind}: recall@{k} {row['recall']:.3f}, build {build_s:.2f} s, {row['queries_per_s']:,.0f} queries/s")
        rows.append(row)
    return {
        "genre": genre,
        "tokens": tokens,
        "entries_per_head": len(next(iter(st.memories.values()))),
        "layers": list(st.memories),
        "positions": cfg.positions,
        "k": k,
        "rows": rows,
    }
