"""The streaming engine: documents through the model segment by segment.

`stream_nll` is the memtx way: segments of S tokens, each attending to itself plus the XL cache
(the previous segment's raw K/V). `full_nll` is the reference: plain causal attention over
chunks of the model's trained context (like llama.cpp's perplexity tool). Both score every
token but the first, so their numbers compare directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.errors import MemtxError
from memtx_cli.model import LayerKV, Transformer, token_nll
from memtx_cli.runtime import LoadedModel

# progress(done_tokens, total_tokens): the library reports, the CLI draws.
Progress = Callable[[int, int], None]


def _noop(done: int, total: int) -> None:
    pass


@torch.inference_mode()
def stream_nll(
    model: Transformer,
    ids: torch.Tensor,  # (N,) on the model's device
    segment: int,
    xl_cache: bool = True,
    progress: Progress = _noop,
) -> torch.Tensor:
    """Per-token NLL (N-1,) of ids[1:], streaming segments with an XL cache."""
    n = ids.shape[0]
    cache: list[LayerKV] | None = None
    out = []
    for s in range(0, n, segment):
        seg = ids[s : s + segment]
        res = model.forward_segment(seg[None], cache)
        targets = ids[s + 1 : s + segment + 1]  # the last position predicts the next segment's first
        out.append(token_nll(model, res.hidden[0, : targets.shape[0]], targets))
        cache = res.kv if xl_cache else None
        progress(min(s + segment, n), n)
    return torch.cat(out)


@torch.inference_mode()
def full_nll(model: Transformer, ids: torch.Tensor, chunk: int, progress: Progress = _noop) -> torch.Tensor:
    """Per-token NLL (N-1,) with full causal attention inside chunks of `chunk` tokens."""
    n = ids.shape[0]
    out = []
    for s in range(0, n, chunk):
        res = model.forward_segment(ids[s : s + chunk][None])
        targets = ids[s + 1 : s + chunk + 1]
        out.append(token_nll(model, res.hidden[0, : targets.shape[0]], targets))
        progress(min(s + chunk, n), n)
    return torch.cat(out)


@dataclass
class ScoreResult:
    tokens: int  # tokens read (the first is context only)
    scored: int  # tokens scored: tokens - 1
    nll: float  # mean negative log-likelihood, nats per scored token
    bytes: int  # UTF-8 bytes of the scored text
    seconds: float  # model time (load and tokenization excluded)
    mode: str
    token_nlls: torch.Tensor | None = None

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
        }


def tokenize_for_scoring(lm: LoadedModel, text: str, max_tokens: int = 0) -> tuple[list[int], int]:
    """Token ids (cut to max_tokens) and the UTF-8 byte count of the text tokens 1.. cover."""
    ids, offsets = lm.tokenizer.encode_with_offsets(text)
    if max_tokens:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    if len(ids) < 2:
        raise MemtxError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    scored_text = text[offsets[0][1] : offsets[-1][1]]
    return ids, len(scored_text.encode("utf-8"))


def score_ids(lm: LoadedModel, ids: list[int], n_bytes: int, cfg: Config, progress: Progress = _noop) -> ScoreResult:
    cfg.validate_for(lm.args.context_length)
    x = torch.tensor(ids, dtype=torch.long, device=lm.device)
    t0 = time.perf_counter()
    if cfg.context == "full":
        nll = full_nll(lm.model, x, lm.args.context_length, progress)
    else:
        nll = stream_nll(lm.model, x, cfg.segment, cfg.xl_cache, progress)
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
        mode=cfg.context,
        token_nlls=nll,
    )


def score_text(lm: LoadedModel, text: str, cfg: Config, progress: Progress = _noop) -> ScoreResult:
    ids, n_bytes = tokenize_for_scoring(lm, text, cfg.max_tokens)
    return score_ids(lm, ids, n_bytes, cfg, progress)
