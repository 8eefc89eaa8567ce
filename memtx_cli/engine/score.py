"""Scoring: a document's perplexity, streamed with memory (engine/stream.py) or with full
attention (the reference), and the session step below the CLI: settings resolved, bank opened
and checked, model loaded."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.engine.stream import Progress, _noop, full_nll, run_stream
from memtx_cli.errors import MemtxError
from memtx_cli.model.loading import LoadedModel


@dataclass
class ScoreResult:
    tokens: int  # tokens read (the first is context only)
    scored: int  # tokens scored: tokens - 1
    nll: float  # mean negative log-likelihood, nats per scored token
    bytes: int  # UTF-8 bytes of the scored text
    seconds: float  # model time (load and tokenization excluded)
    mode: str
    token_nlls: torch.Tensor | None = None
    memory: dict[str, Any] | None = None  # memory settings when memory was on
    memory_entries: int = 0  # (layer, token) entries in memory at the end
    retrieval_seconds: float = 0.0
    bank: dict[str, Any] | None = None  # the bank read (path, entries, documents)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll * self.scored / math.log(2) / max(self.bytes, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "scored_tokens": self.scored,
            "nll": self.nll,
            "ppl": self.ppl,
            "bits_per_byte": self.bits_per_byte,
            "bytes": self.bytes,
            "mode": self.mode,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "memory": self.memory,
            "memory_entries": self.memory_entries,
            "retrieval_seconds": self.retrieval_seconds,
            "bank": self.bank,
        }

    def curve(self, segment: int) -> list[dict[str, Any]]:
        """Mean NLL and perplexity per block of `segment` scored tokens (perplexity vs position)."""
        assert self.token_nlls is not None
        rows = []
        for i, s in enumerate(range(0, self.scored, segment)):
            block = self.token_nlls[s : s + segment]
            nll = float(block.mean())
            rows.append({"segment": i, "start": s + 1, "tokens": block.shape[0], "nll": nll, "ppl": math.exp(nll)})
        return rows


def tokenize_for_scoring(lm: LoadedModel, text: str, max_tokens: int = 0) -> tuple[list[int], int]:
    """Token ids (cut to max_tokens) and the UTF-8 byte count of the text tokens 1.. cover."""
    ids, offsets = lm.tokenizer.encode_with_offsets(text)
    if max_tokens:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    if len(ids) < 2:
        raise MemtxError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    scored_text = text[offsets[0][1] : offsets[-1][1]]
    return ids, len(scored_text.encode("utf-8"))


def score_ids(
    lm: LoadedModel, ids: list[int], n_bytes: int, cfg: Config, progress: Progress = _noop, bank: Any = None
) -> ScoreResult:
    cfg.validate_for(lm.args.context_length)
    x = torch.tensor(ids, dtype=torch.long, device=lm.device)
    t0 = time.perf_counter()
    streamer = None
    if cfg.context == "full":
        nll = full_nll(lm.model, x, lm.args.context_length, progress)
    else:
        nll, streamer = run_stream(lm.model, x, cfg, progress, bank if cfg.memory else None)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nll = nll.double().cpu()
    return ScoreResult(
        tokens=len(ids),
        scored=nll.shape[0],
        nll=float(nll.mean()),
        bytes=n_bytes,
        seconds=seconds,
        mode=cfg.context if cfg.context == "full" or not streamer.layers else "memory",
        token_nlls=nll,
        memory=cfg.memory_settings() if streamer and streamer.layers else None,
        memory_entries=streamer.memory_entries if streamer else 0,
        retrieval_seconds=streamer.retrieval_seconds if streamer else 0.0,
        bank=(
            {"path": str(bank.path), "entries": bank.entries, "documents": len(bank.docs)}
            if bank is not None and streamer and streamer.bank_memories
            else None
        ),
    )


def score_text(lm: LoadedModel, text: str, cfg: Config, progress: Progress = _noop) -> ScoreResult:
    ids, n_bytes = tokenize_for_scoring(lm, text, cfg.max_tokens)
    return score_ids(lm, ids, n_bytes, cfg, progress)


def score_document(
    lm: LoadedModel,
    text: str,
    cfg: Config,
    bank: Any = None,
    compare: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, ScoreResult]:
    """Score `text`: one run ("main"), or with and without memory ("memory", "window") on the
    same ids. progress(run name) -> a context manager yielding a (done, total) callback."""
    import contextlib

    ids, n_bytes = tokenize_for_scoring(lm, text, cfg.max_tokens)
    runs = (
        {"memory": dataclasses.replace(cfg, memory=True), "window": dataclasses.replace(cfg, memory=False)}
        if compare
        else {"main": cfg}
    )
    out = {}
    for name, c in runs.items():
        with progress(name) if progress else contextlib.nullcontext(_noop) as cb:
            out[name] = score_ids(lm, ids, n_bytes, c, cb, bank)
    return out


@dataclass
class ScoredFile:
    """`memtx score` below the CLI: the document's name, the model's description, the settings
    used, the load time and one result per run ("main", or "memory" and "window")."""

    name: str
    model: dict[str, Any]
    cfg: Config
    load_seconds: float
    results: dict[str, ScoreResult]


def score_file(
    path: str,
    flags: dict[str, Any],
    sets: list[str] | None = None,
    config_file: str | None = None,
    bank_path: str | None = None,
    compare: bool = False,
    progress: Callable[[str], Any] | None = None,
    warn: Callable[[str], None] = lambda m: None,
) -> ScoredFile:
    """Read a document (or stdin for "-"), resolve the settings, open and check the bank, load
    the model and score: each step fails before the costlier ones start."""
    from memtx_cli.bank.reader import read_document
    from memtx_cli.engine.session import load_for, open_bank, resolve_settings

    doc = read_document(path)  # bad input fails before the model loads
    for w in doc.warnings:
        warn(w)
    cfg, _ = resolve_settings(flags, sets, config_file)
    bank = open_bank(bank_path) if bank_path else None
    t0 = time.perf_counter()
    lm = load_for(cfg, bank)
    load_s = time.perf_counter() - t0
    results = score_document(lm, doc.text, cfg, bank, compare, progress)
    model = {
        "model": lm.name,
        "dtype": lm.describe()["dtype"],
        "device": str(lm.device),
        "context_length": lm.args.context_length,
    }
    return ScoredFile(doc.name, model, cfg, load_s, results)
