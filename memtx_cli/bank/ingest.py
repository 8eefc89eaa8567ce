"""Ingest: stream documents through the engine with memory and keep their K/V in a bank.

Each document streams exactly as `memtx score` streams it (segments, XL cache, sinks, memory of
its own past), without the output head: only the K/V of the memory layers are kept. Every
token's K/V go to the bank in blocks of `block_size` consecutive tokens, with provenance
(document, token offset, character offset). The bank commits after every document.

Per document: unchanged (same path, same sha256) -> no-op; same content already in the bank
under another path -> recorded as an alias (deduplication); changed -> the old version is
removed (committed) and the new one ingested.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtx_cli.bank.codec import TRAIN_ROWS
from memtx_cli.bank.format import DocRecord, Geometry, check_model, now
from memtx_cli.bank.reader import decode_text, read_bytes
from memtx_cli.bank.store import Bank
from memtx_cli.bank.words import token_words
from memtx_cli.config import Config
from memtx_cli.engine import plan
from memtx_cli.engine.stream import Streamer
from memtx_cli.errors import MemtxError, UsageError
from memtx_cli.model.loading import LoadedModel


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    aliased: list[str] = field(default_factory=list)  # identical content already in the bank
    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    evicted_blocks: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": len(self.added),
            "unchanged": len(self.unchanged),
            "aliased": len(self.aliased),
            "replaced": len(self.replaced),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "warnings": self.warnings,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "evicted_blocks": self.evicted_blocks,
        }


# progress(event) with event = {"doc": i, "docs": n, "path": str, "done": tokens, "total": tokens}
IngestProgress = Callable[[dict[str, Any]], None]


def model_identity(lm: LoadedModel) -> dict[str, Any]:
    return {
        "name": lm.name,
        "weights_fingerprint": lm.fingerprint,
        "tokenizer_fingerprint": lm.tokenizer.fingerprint,
        "n_layers": lm.args.n_layers,
        "context_length": lm.args.context_length,
    }


def open_or_create_bank(
    path: Path,
    lm: LoadedModel,
    cfg: Config,
    capacity: int,
    evict: str,
    seed: int = 0,
    precision: str | None = None,
) -> Bank:
    """Open the bank for writing (checking the model), or create it with cfg's geometry."""
    if cfg.retrieval != "block" or cfg.positions == "true":
        raise MemtxError(
            "banks hold block memories read at the fixed distance: use --retrieval block, --positions fixed or clamped"
        )
    if not plan.heads_for(cfg, lm.args.n_layers, lm.args.n_kv_heads, lm.args.n_heads):
        raise MemtxError("ingest needs memory layers (drop --no-memory)")
    if Bank.is_bank(path):
        bank = Bank.open(path, writer=True, verify=False)
        try:
            check_model(bank, model_identity(lm))
            if precision and precision != bank.precision:
                raise MemtxError(f"bank {path} stores {bank.precision}; --precision {precision} needs a new bank")
            if capacity:  # the capacity / policy of a run applies from now on
                bank.manifest["eviction"] = {"capacity": capacity, "policy": evict, "seed": seed}
        except Exception:
            bank.close()
            raise
        return bank
    if path.exists() and not path.is_dir():
        raise MemtxError(f"{path} exists and is a file; --out names a bank directory")
    stored = plan.bank_heads_for(cfg, lm.args.n_layers, lm.args.n_kv_heads, lm.args.n_heads)
    if not stored:
        raise UsageError(f"bank-heads {cfg.bank_heads!r} names none of the memory heads")
    layers = sorted(stored)
    every = all(len(stored[i]) == lm.args.n_kv_heads for i in layers)
    heads = None if every else [stored[i] for i in layers]
    geo = Geometry(layers, lm.args.n_kv_heads, lm.args.head_dim, cfg.block_size, heads)
    evict_cfg = {"capacity": capacity, "policy": evict, "seed": seed}
    return Bank.create(path, model_identity(lm), geo, cfg.to_dict(), evict_cfg, precision or "float16")


def writing_settings(cfg: Config) -> Config:
    """The settings a document streams into a bank with. A bank's entries are read by other
    texts at the fixed distance, never at their real one, so with `sink-positions: auto` the
    sinks sit just before the window: entries computed with the sinks at their real distance
    (thousands of tokens back) were not copied by a reader from about 7K tokens on."""
    return replace(cfg, sink_positions="window") if cfg.sink_positions == "auto" else cfg


@torch.inference_mode()
def stream_into_bank(
    lm: LoadedModel,
    bank: Bank,
    doc_id: int,
    ids: list[int],
    offsets: list[tuple[int, int]],
    cfg: Config,
    progress: Callable[[int, int], None] = lambda d, t: None,
    words: np.ndarray | None = None,
) -> tuple[list[int], list[int]]:
    """Stream one document, writing its K/V into free blocks; returns (blocks, valid counts).
    Nothing is committed here."""
    bs = bank.geo.block_size
    layers = bank.geo.layers
    streamer = Streamer(lm.model, writing_settings(cfg), expected_tokens=len(ids))
    x = torch.tensor(ids, dtype=torch.long, device=lm.device)
    n = len(ids)
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in layers}
    pend_n = 0
    start = 0  # token offset of the first pending entry
    blocks: list[int] = []
    valid: list[int] = []
    char_off = np.asarray([o[0] for o in offsets], dtype=np.int64)

    def flush(final: bool) -> None:
        nonlocal pend_n, start
        if bank.needs_training:  # a new bank's codec learns from its first TRAIN_ROWS tokens
            if pend_n < TRAIN_ROWS and not final or pend_n == 0:
                return
            bank.train_codec({i: tuple(np.concatenate(x) for x in zip(*pending[i], strict=True)) for i in layers})
        take = pend_n if final else pend_n - pend_n % bs  # whole blocks; the rest waits
        if take <= 0:
            return
        kv = {}
        for i in layers:
            k = np.concatenate([a for a, _ in pending[i]])
            v = np.concatenate([b for _, b in pending[i]])
            kv[i] = (k[:take], v[:take])
            pending[i] = [(k[take:], v[take:])]
        prov = np.stack([np.full(take, doc_id), np.arange(start, start + take), char_off[start : start + take]], 1)
        got = bank.allocate(-(-take // bs), set(blocks))
        bank.write_blocks(got, kv, prov, None if words is None else words[start : start + take])
        blocks.extend(got)
        valid.extend(min(bs, take - j * bs) for j in range(len(got)))
        start += take
        pend_n -= take

    # The document's first `sinks` tokens stay out of the bank, as they stay out of its own
    # memory: their keys draw attention from every query (that is what makes them sinks), so
    # as memories they would be retrieved for everything.
    skip = min(cfg.sinks, n)
    start = skip
    for s in range(0, n, cfg.segment):
        streamer.step(x[s : s + cfg.segment])
        t = min(cfg.segment, n - s)
        lo = max(0, skip - s)  # rows of this segment that are sinks
        for i in layers:
            kv = streamer.last_kv[i]  # (1, KV, T, D) raw
            heads = bank.geo.stored(i)  # (T, stored KV, D) below
            k = kv.k[0, heads, lo:].transpose(0, 1).to(torch.float16).cpu().numpy()
            v = kv.v[0, heads, lo:].transpose(0, 1).to(torch.float16).cpu().numpy()
            pending[i].append((k, v))
        pend_n += max(0, t - lo)
        flush(final=False)
        progress(min(s + cfg.segment, n), n)
    flush(final=True)
    return blocks, valid


def add_document(
    lm: LoadedModel,
    bank: Bank,
    key: str,
    sha: str,
    size: int,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    cfg: Config,
    progress: Callable[[int, int], None] = lambda d, t: None,
) -> int:
    """Stream one tokenized document into the bank with its words, record it, evict to capacity
    and commit; returns the number of blocks evicted."""
    doc_id = int(bank.manifest["next_doc_id"])
    words = token_words(text, offsets) if bank.has_words else None
    blocks, valid = stream_into_bank(lm, bank, doc_id, ids, offsets, cfg, progress, words)
    bank.attach_blocks(doc_id, blocks, valid)
    bank.add_document(
        DocRecord(
            id=doc_id,
            path=key,
            sha256=sha,
            size=size,
            tokens=len(ids),
            chars=len(text),
            entries=sum(valid),
            blocks=blocks,
            ingested_at=now(),
        )
    )
    evicted = len(bank.evict_to_capacity(protect=set(blocks)))
    bank.commit()
    return evicted


def remember_text(lm: LoadedModel, bank: Bank, key: str, text: str, cfg: Config) -> int:
    """Append a text (a conversation) to the bank as a document named `key`; returns its tokens."""
    ids, offsets = lm.tokenizer.encode_with_offsets(text)
    if not ids:
        return 0
    data = text.encode("utf-8")
    add_document(lm, bank, key, hashlib.sha256(data).hexdigest(), len(data), text, ids, offsets, cfg)
    return len(ids)


def ingest(
    lm: LoadedModel,
    bank: Bank,
    files: list[Path],
    cfg: Config,
    progress: IngestProgress = lambda e: None,
    max_tokens: int = 0,
) -> IngestReport:
    cfg.validate_for(lm.args.context_length)
    if max_tokens < 0:
        raise UsageError(f"max-tokens must be >= 0 (0 = whole documents), got {max_tokens}")
    rep = IngestReport()
    t_start = time.perf_counter()
    for i, path in enumerate(files):
        key = str(path)
        try:
            data = read_bytes(path)
        except MemtxError as e:
            rep.skipped.append((key, str(e).removeprefix(f"{key} ").removeprefix(f"cannot read {key}: ")))
            continue
        try:
            text, warnings = decode_text(data, key)
        except MemtxError as e:
            rep.skipped.append((key, "binary" if "binary" in str(e) else "not UTF-8"))
            continue
        rep.warnings += warnings
        if not text.strip():
            rep.skipped.append((key, "empty"))
            continue
        sha = hashlib.sha256(data).hexdigest()
        existing = bank.find_doc(key)
        if existing is not None and existing.sha256 == sha:
            rep.unchanged.append(key)
            continue
        if existing is not None:  # changed: drop the old version first, committed
            if existing.path == key:
                bank.remove_document(existing.id)
            else:
                existing.aliases.remove(key)
            bank.commit()
            rep.replaced.append(key)
        same = next((d for d in bank.docs.values() if d.sha256 == sha), None)
        if same is not None:
            same.aliases.append(key)
            bank.commit()
            rep.aliased.append(key)
            continue
        ids, offsets = lm.tokenizer.encode_with_offsets(text)
        if max_tokens:
            ids, offsets = ids[:max_tokens], offsets[:max_tokens]
        if not ids:
            rep.skipped.append((key, "empty"))
            continue

        def prog(done: int, total: int, i: int = i, key: str = key) -> None:
            progress({"doc": i, "docs": len(files), "path": key, "done": done, "total": total})

        rep.evicted_blocks += add_document(lm, bank, key, sha, len(data), text, ids, offsets, cfg, prog)
        rep.added.append(key)
        rep.tokens += len(ids)
    bank.trim()
    bank.give_back()  # free blocks a reader held during the ingest: their space goes back now
    rep.seconds = time.perf_counter() - t_start
    return rep


def ingest_files(
    paths: list[str],
    out: Path,
    flags: dict[str, Any],
    sets: list[str] | None = None,
    config_file: str | None = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    follow_symlinks: bool = False,
    capacity: int = 0,
    evict: str = "fifo",
    precision: str | None = None,
    max_tokens: int | None = None,
    progress: Callable[[list[Path]], Any] | None = None,
    ray: str | None = None,
    workers: int = 2,
) -> tuple[IngestReport, dict[str, Any]]:
    """`memtx ingest` below the CLI: paths checked and selected, settings resolved, the model
    loaded, the bank opened or created and filled. Returns the report (its `skipped` lists the
    files left out and why) and the bank's info. progress(files) -> a context manager yielding an event callback."""
    import contextlib

    from memtx_cli.bank.corpus import select_files
    from memtx_cli.bank.format import EVICTION
    from memtx_cli.engine.session import load_for, resolve_settings

    if evict not in EVICTION:
        raise UsageError(f"--evict must be one of {', '.join(EVICTION)}, got {evict!r}")
    if capacity < 0:
        raise UsageError(f"--capacity must be >= 0, got {capacity}")
    if max_tokens is not None and max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0 (0 = whole documents), got {max_tokens}")
    sel = select_files(paths, include, exclude, out, follow_symlinks)  # bad paths fail before anything is written
    cfg, _ = resolve_settings(flags, sets, config_file)
    lm = load_for(cfg)
    if ray:  # workers of a Ray cluster ingest, this process merges (bank/ray_ingest.py)
        from memtx_cli.bank.ray_ingest import ingest_on_ray

        got = ingest_on_ray(
            ray,
            sel.files,
            out,
            flags,
            sets,
            config_file,
            workers,
            lambda: open_or_create_bank(out, lm, cfg, capacity, evict, precision=precision),
            precision,
            max_tokens or 0,
        )
        rep = IngestReport(
            added=got["added"],
            unchanged=got["unchanged"],
            skipped=sel.skipped + got["skipped"],
            warnings=got["warnings"],
            tokens=got["tokens"],
            seconds=got["seconds"],
        )
        return rep, got["info"]
    bank = open_or_create_bank(out, lm, cfg, capacity, evict, precision=precision)
    try:
        with progress(sel.files) if progress else contextlib.nullcontext(lambda e: None) as cb:
            rep = ingest(lm, bank, sel.files, cfg, cb, max_tokens=max_tokens or 0)
        info = bank.info()
    finally:
        bank.close()
    rep.skipped = sel.skipped + rep.skipped
    return rep, info
