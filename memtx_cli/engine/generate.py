"""Text generation with memory: the prompt streams through the engine like any document (its own
memory, plus a bank if given), then tokens are decoded one by one with the segment's K/V as a
cache (`Streamer.feed`), every new token reading the memory as scoring would."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.engine.stream import Streamer
from memtx_cli.errors import MemtxError, UsageError
from memtx_cli.model.loading import LoadedModel


@dataclass
class Sampling:
    max_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_loops: bool = False  # stop once the text repeats itself (see `looping`)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max-tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also false for nan
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise UsageError(f"seed must be between 0 and 2^63 - 1, got {self.seed}")


@dataclass
class Generation:
    text: str
    tokens: int
    prompt_tokens: int
    stop_reason: str  # "length" | "eos" | "stop" | "loop"
    prefill_seconds: float
    decode_seconds: float
    retrieval_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "stop_reason": self.stop_reason,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.tokens_per_s,
            "retrieval_seconds": self.retrieval_seconds,
        }


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """logits (V,) -> token id: greedy at temperature 0, else top-k / top-p (nucleus) sampling."""
    if s.temperature == 0:
        return int(logits.argmax())
    x = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(x, min(s.top_k, x.shape[0])).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if s.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < s.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class CopyFrom:
    """Copy-constrained decoding: each token either continues a span of `source` (token ids)
    that the tokens before it copied, or starts a new span anywhere in it; stop tokens are
    allowed once something was copied. Greedy decoding then picks the model's best copy."""

    def __init__(self, source: list[int], stop_ids: set[int]) -> None:
        if not source:
            raise MemtxError("nothing to copy an answer from")
        self.src = torch.tensor(source, dtype=torch.long)
        self.stops = sorted(stop_ids)
        self.at = torch.arange(len(source))  # positions of the next token a span may take
        self.copied = 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.full_like(logits, float("-inf"))
        allowed[self.src[self.at]] = 0
        if self.copied and self.stops:
            allowed[self.stops] = 0
        return logits + allowed

    def advance(self, tok: int) -> None:
        nxt = self.at[self.src[self.at] == tok] + 1
        nxt = nxt[nxt < len(self.src)]
        self.at = nxt if len(nxt) else torch.arange(len(self.src))  # the span ended: start another
        self.copied += 1


class DecodeThreads:
    """Decoding's thread count, chosen by measurement while decoding.

    A decoded token is a row of small matrix-vector products; with every core in use and
    another process on them, each op's threads wait for each other (on 2 cores, 4 tokens/s
    with 2 threads against 13 with 1, docs/decisions.md). So the first tokens are timed with
    each candidate count in turn (`probe` steps each, the first step of a count not counted)
    and decoding goes on with the fastest, measured again every `every` tokens. The thread
    count torch had is restored at the end."""

    def __init__(self, probe: int = 6, every: int = 96) -> None:
        self.start = torch.get_num_threads()
        self.options = [self.start, 1] if self.start > 1 else [self.start]
        self.probe, self.every = probe, every
        self.step = 0
        self.times: dict[int, list[float]] = {}
        self.best = self.start
        self.t0 = 0.0

    def _probing(self) -> bool:
        return len(self.options) > 1 and self.step % self.every < self.probe * len(self.options)

    def begin(self) -> None:
        n = self.options[self.step % self.every // self.probe] if self._probing() else self.best
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.t0 = time.perf_counter()

    def end(self) -> None:
        n, k = torch.get_num_threads(), self.step % self.every
        if self._probing():
            if k % self.probe:  # a count's first step pays for the switch
                self.times.setdefault(n, []).append(time.perf_counter() - self.t0)
            if k == self.probe * len(self.options) - 1:
                med = {c: sorted(v)[len(v) // 2] for c, v in self.times.items() if v}
                self.best = min(med, key=med.get) if med else self.start
                self.times = {}
        self.step += 1

    def close(self) -> None:
        torch.set_num_threads(self.start)


def looping(text: str, ids: list[int], min_span: int = 16) -> bool:
    """Whether a generation has started to loop: its last complete line repeats an earlier
    non-empty line, or its last `min_span` or more tokens are one short pattern (at most 8
    tokens) repeated. Greedy decoding with a small model falls into such loops ("The answer
    is: X\n\nThe answer is: X ..."); nothing new follows them."""
    lines = [ln.strip() for ln in text.split("\n")[:-1]]
    done = [ln for ln in lines if ln]
    if len(done) >= 2 and lines[-1] and lines[-1] in done[:-1]:
        return True
    for p in range(1, 9):
        span = max(min_span, 3 * p)
        if len(ids) >= span and all(ids[-i] == ids[-i - p] for i in range(1, span - p + 1)):
            return True
    return False


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos and the card's `stop_tokens`."""
    ids = {lm.tokenizer.eos_id} if lm.tokenizer.eos_id is not None else set()
    for name in lm.card.data.get("stop_tokens") or []:
        i = lm.tokenizer.tok.token_to_id(name)
        if i is not None:
            ids.add(i)
    return ids


def pin_bank_blocks(st: Streamer, bank: Any, text: str, n: int) -> None:
    """The `n` bank blocks BM25 ranks best for `text`: every chunk of every memory layer of `st`
    reads them from now on (CompositeMemory.pinned)."""
    from memtx_cli.bank.words import bm25_blocks

    blocks = list(bm25_blocks(bank, text, n))
    for mem in st.memories.values():
        if hasattr(mem, "pinned"):
            mem.pinned = torch.tensor(blocks, dtype=torch.long) if blocks else None


def prefill(
    st: Streamer,
    lm: LoadedModel,
    prompt_ids: list[int],
    bank: Any,
    trace: Callable[[torch.Tensor, torch.Tensor], None] | None,
    query: str | None,
) -> torch.Tensor:
    """The prompt streamed (its words pinning bank blocks first); the last token's hidden state."""
    cfg = st.cfg
    if bank is not None and cfg.bank_words:
        pin_bank_blocks(st, bank, query if query is not None else lm.tokenizer.decode(prompt_ids), cfg.bank_words)
    x = torch.tensor(prompt_ids, dtype=torch.long, device=lm.device)
    # A prompt's tokens are never scored, so their own queries may choose what they read:
    # they answer (Config.answer_tokens: the last n, 0 = all); the last one predicts the first.
    n_ask = min(cfg.answer_tokens or len(prompt_ids), len(prompt_ids)) if cfg.answer_top_k else 1
    if len(prompt_ids) > n_ask:
        st.feed(x[:-n_ask])
    st.answering = True
    if n_ask > 1:
        st.feed(x[-n_ask:-1])
    st.trace = trace
    return st.feed(x[-1:])


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    cfg: Config,
    s: Sampling,
    bank: Any = None,
    on_text: Callable[[str], None] = lambda t: None,
    stop_ids: set[int] | None = None,
    trace: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    query: str | None = None,
    copy: CopyFrom | None = None,
) -> Generation:
    """Stream the prompt, then decode; `on_text` receives each new piece of text as soon as it
    is complete UTF-8. `trace` (see MemoryRead.trace) receives the attention mass on bank
    blocks of every token that predicts an answer token: the prompt's last and each new one.

    With a bank, the words of `query` (the user's text; None = the whole prompt) pin the
    `cfg.bank_words` bank blocks that BM25 ranks best: every chunk reads them beside the blocks
    its queries find. Nothing of the prompt is scored, so its words may choose what it reads.
    `copy` constrains every new token to copy from its source (CopyFrom)."""
    if not prompt_ids:
        raise MemtxError("the prompt is empty")
    cfg.validate_for(lm.args.context_length)
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(s.seed)
    # Answering tokens read every memory's raw keys (Config.answer_top_k): keep them all.
    st = Streamer(lm.model, cfg, bank, keep_all=cfg.answer_top_k > 0)
    t0 = time.perf_counter()
    h = prefill(st, lm, prompt_ids, bank, trace, query)
    t1 = time.perf_counter()
    threads = DecodeThreads()
    try:
        out, reason, shown = decode(lm, st, h, s, gen, copy, stop_ids or set(), on_text, threads)
    finally:
        threads.close()
    t2 = time.perf_counter()
    final = lm.tokenizer.decode(out)
    if reason == "stop":
        final = final[: min(final.index(p) for p in s.stop if p and p in final)]
    if len(final) > len(shown) and final.startswith(shown):
        on_text(final[len(shown) :])
    return Generation(
        text=final,
        tokens=len(out),
        prompt_tokens=len(prompt_ids),
        stop_reason=reason,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        retrieval_seconds=st.retrieval_seconds,
    )


def decode(
    lm: LoadedModel,
    st: Streamer,
    h: torch.Tensor,
    s: Sampling,
    gen: torch.Generator | None,
    copy: CopyFrom | None,
    stop_ids: set[int],
    on_text: Callable[[str], None],
    threads: DecodeThreads,
) -> tuple[list[int], str, str]:
    """Tokens after the prompt (whose last hidden state is h) until a stop: the ids, the stop
    reason and the text shown so far through `on_text`."""
    out: list[int] = []
    shown = ""
    reason = "length"
    for _ in range(s.max_tokens):
        threads.begin()
        logits = lm.model.logits(h[None])[0, -1].cpu()
        tok = sample_next(logits if copy is None else copy.mask(logits), s, gen)
        if copy is not None:
            copy.advance(tok)
        if tok in stop_ids:
            reason = "eos"
            break
        out.append(tok)
        text = lm.tokenizer.decode(out)
        hit = next((p for p in s.stop if p and p in text), None)
        if hit is not None:
            text = text[: text.index(hit)]
            reason = "stop"
        elif s.stop_loops and looping(text, out):
            reason = "loop"
        if not text.endswith("\ufffd") and len(text) > len(shown):
            on_text(text[len(shown) :])
            shown = text
        if reason in ("stop", "loop"):
            break
        h = st.feed(torch.tensor([tok], device=lm.device))
        threads.end()
    return out, reason, shown


def generate_from(
    prompt: str,
    flags: dict[str, Any],
    sets: list[str] | None,
    config_file: str | None,
    bank_path: str | None,
    sampling: Sampling,
    emit: Callable[[str], None],
) -> Generation:
    """`memtx generate` below the CLI: settings resolved, bank opened and checked, model loaded,
    the prompt read as a document and continued."""
    from memtx_cli.engine.session import load_for, open_bank, resolve_settings

    if not prompt:
        raise MemtxError("the prompt is empty")
    cfg, _ = resolve_settings(flags, sets, config_file)
    bank = open_bank(bank_path) if bank_path else None
    lm = load_for(cfg, bank)
    return generate(
        lm, lm.tokenizer.encode(prompt), cfg, sampling, bank if cfg.memory else None, emit, stop_token_ids(lm)
    )
