"""Questions and conversations over a bank: the card's chat template, generation with memory,
and the sources of an answer.

Sources are measured, not guessed: while the answer is decoded, every memory layer reports
the attention mass its query heads put on each retrieved bank block (`MemoryRead.trace`). The
mass is summed per block, blocks map to (document, characters) through the bank's provenance,
and characters to line numbers through the document itself (read again, and only trusted when
its sha256 still matches the one recorded at ingest)."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtx_cli.config import Config
from memtx_cli.errors import MemtxError
from memtx_cli.generate import Generation, Sampling, generate, stop_token_ids
from memtx_cli.runtime import LoadedModel


def render_chat(lm: LoadedModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ([{role, content}]) in the model's chat template (card or
    GGUF/HF tokenizer config); a plain "role: content" layout when the model has none."""
    template = lm.chat_template
    if not template:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=lm.tokenizer.decode([lm.tokenizer.bos_id]) if getattr(lm.tokenizer, "bos_id", None) else "",
            eos_token="",
        )
    except jinja2.TemplateError as e:
        raise MemtxError(f"the chat template of {lm.name} does not render: {e}") from None


@dataclass
class BankTrace:
    """Accumulates attention mass per bank block (the callback given to the model)."""

    mass: dict[int, float] = field(default_factory=dict)

    def __call__(self, block_ids: torch.Tensor, mass: torch.Tensor) -> None:
        ids = block_ids.reshape(-1).cpu().numpy()
        m = mass.reshape(-1).double().cpu().numpy()
        keep = ids >= 0
        for b, w in zip(ids[keep].tolist(), m[keep].tolist(), strict=True):
            self.mass[b] = self.mass.get(b, 0.0) + w

    @property
    def total(self) -> float:
        return sum(self.mass.values())


@dataclass
class Source:
    path: str
    doc_id: int
    weight: float  # share of the attention mass the answer put on the bank
    chars: tuple[int, int]  # [start, end) in the document
    lines: tuple[int, int] | None  # first and last line (1-based), None if the text is gone
    text: str | None = None  # the lines themselves (when the document could be read)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "doc_id": self.doc_id,
            "weight": self.weight,
            "chars": list(self.chars),
            "lines": list(self.lines) if self.lines else None,
        }

    def label(self) -> str:
        where = f"lines {self.lines[0]}-{self.lines[1]}" if self.lines else f"chars {self.chars[0]}-{self.chars[1]}"
        return f"{self.path}:{where}"


def _read_if_unchanged(path: str, sha256: str) -> str | None:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data.decode("utf-8", errors="replace")


def sources_from_mass(bank: Any, mass: dict[int, float], n: int) -> list[Source]:
    """The `n` heaviest sources: bank blocks -> (document, token and char span) via provenance;
    blocks that continue each other in a document merge into one source (weights add up)."""
    total = sum(mass.values())
    if total <= 0 or n < 1:
        return []
    bs = bank.geo.block_size
    prov = bank.provenance()
    spans = []  # (doc id, first token, token after the last, char start, char end, weight)
    for b, w in mass.items():
        if b < 0 or b >= len(bank.blocks) or int(bank.blocks[b, 1]) <= 0:
            continue
        rows = np.asarray(prov[b * bs : b * bs + int(bank.blocks[b, 1])])
        doc = int(rows[0, 0])
        if doc in bank.docs:
            # the last token ends where the next starts; +1 char keeps the span non-empty
            spans.append((doc, int(rows[0, 1]), int(rows[-1, 1]) + 1, int(rows[0, 2]), int(rows[-1, 2]) + 1, w))
    spans.sort()
    merged: list[list] = []
    for doc, t0, t1, c0, c1, w in spans:
        last = merged[-1] if merged else None
        if last is not None and last[0] == doc and t0 <= last[2]:
            last[2], last[4], last[5] = max(last[2], t1), max(last[4], c1), last[5] + w
        else:
            merged.append([doc, t0, t1, c0, c1, w])
    merged.sort(key=lambda m: -m[5])
    texts: dict[int, tuple[str, list[int]] | None] = {}
    out: list[Source] = []
    for doc, _, _, c0, c1, w in merged[:n]:
        rec = bank.docs[doc]
        if doc not in texts:
            text = _read_if_unchanged(rec.path, rec.sha256)
            texts[doc] = None if text is None else (text, [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"])
        lines, snippet = None, None
        if texts[doc] is not None:
            text, starts = texts[doc]
            lines = (bisect.bisect_right(starts, c0), bisect.bisect_right(starts, max(c0, c1 - 1)))
            hi = starts[lines[1]] if lines[1] < len(starts) else len(text)
            snippet = text[starts[lines[0] - 1] : hi]
        out.append(Source(rec.path, doc, w / total, (c0, c1), lines, snippet))
    return out


@dataclass
class Answer:
    generation: Generation
    sources: list[Source]
    bank_mass: float  # attention mass on bank memories, summed over layers, heads and tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.generation.text,
            "sources": [s.to_dict() for s in self.sources],
            **{k: v for k, v in self.generation.to_dict().items() if k != "text"},
        }


def answer(
    lm: LoadedModel,
    messages: list[dict[str, str]],
    cfg: Config,
    sampling: Sampling,
    bank: Any,
    n_sources: int = 3,
    on_text: Callable[[str], None] = lambda t: None,
) -> Answer:
    """The assistant's reply to `messages` with memory of the bank, and its sources."""
    prompt = render_chat(lm, messages)
    ids = lm.tokenizer.encode(prompt)
    trace = BankTrace() if bank is not None else None
    gen = generate(lm, ids, cfg, sampling, bank, on_text, stop_token_ids(lm), trace=trace)
    sources = sources_from_mass(bank, trace.mass, n_sources) if trace is not None else []
    return Answer(gen, sources, trace.total if trace is not None else 0.0)


def conversation_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text for the bank (what `chat --remember` stores)."""
    return "".join(f"{m['role']}: {m['content'].strip()}\n" for m in messages if m["role"] != "system")
