"""Answers quoted from the sources: the lines of the quoted excerpts that a question's tokens
attend to most, in the query heads that find them (the card's `quote-heads`).

A 135M model that reads a quoted excerpt rarely restates the fact it holds, but while reading
the question some of its heads look at the line that holds it (the retrieval heads of Wu et
al. 2024 do the same when copying). The answer is that line and the next ones of its excerpt,
quoted as written: dates, numbers and names are never paraphrased."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from memtx_cli.engine.generate import Generation
from memtx_cli.model.probe import attention_rows, parse_query_heads

# Where with_evidence puts the excerpts and the question (tasks/chat.py).
CONTEXT_HEAD = "Context:\n"
QUESTION_HEAD = "\n\nAnswer this question from the context: "


@dataclass
class Line:
    start: int  # character offsets in the prompt's user content
    end: int
    excerpt: int  # which quoted excerpt the line belongs to


def context_lines(content: str, excerpts: list[str]) -> list[Line]:
    """The non-empty lines of the quoted `excerpts` as they sit in `content` (with_evidence's
    text, which joins them with blank lines); a cut excerpt's closing " ..." is not a line."""
    lines, pos = [], len(CONTEXT_HEAD)
    for n, ex in enumerate(excerpts):
        pos = content.index(ex, pos)
        at = pos
        for text in ex.split("\n"):
            if text.strip() and text.strip() != "...":
                lines.append(Line(at, at + len(text), n))
            at += len(text) + 1
        pos += len(ex)
    return lines


def line_mass(offsets: list[tuple[int, int]], mass: torch.Tensor, lines: list[Line]) -> torch.Tensor:
    """Attention mass per line: the mass of the tokens that overlap it (offsets per token)."""
    out = torch.zeros(len(lines))
    j = 0
    for ti, (a, b) in enumerate(offsets):
        while j < len(lines) and lines[j].end <= a:
            j += 1
        if j < len(lines) and a < lines[j].end and b > lines[j].start:
            out[j] += float(mass[ti])
    return out


def passage(content: str, lines: list[Line], best: int, n: int) -> str:
    """Line `best` and up to n - 1 non-empty lines after it in the same excerpt."""
    take = [ln for ln in lines[best : best + n] if ln.excerpt == lines[best].excerpt]
    return "\n".join(content[ln.start : ln.end].rstrip() for ln in take)


def quote_answer(
    lm: Any, content: str, excerpts: list[str], head_ids: list[int], tail_ids: list[int], heads: str, n_lines: int
) -> Generation:
    """The answer to the question in `content` (with_evidence's text) quoted from `excerpts`
    (the texts it quotes).

    head_ids / tail_ids: the chat template's tokens before and after the content (chat_pieces),
    so the model reads exactly the prompt `ask` would decode from. heads: layer.query_head pairs."""
    t0 = time.perf_counter()
    a = lm.args
    probe = parse_query_heads(heads, a.n_layers, a.n_heads)
    content_ids, offsets = lm.tokenizer.encode_with_offsets(content)
    ids = torch.tensor(head_ids + content_ids + tail_ids, dtype=torch.long, device=lm.device)
    # The question's tokens and the template's after them (the assistant's turn opening) ask.
    q_char = content.rindex(QUESTION_HEAD) + len(QUESTION_HEAD)
    first = len(head_ids) + next((i for i, (s, _) in enumerate(offsets) if s >= q_char), len(content_ids))
    mass = attention_rows(lm.model, ids, probe, min(first, len(ids) - 1)).sum(0)
    mass = mass[len(head_ids) : len(head_ids) + len(content_ids)]
    lines = context_lines(content, excerpts)
    text = ""
    if lines:
        text = passage(content, lines, int(line_mass(offsets, mass.cpu(), lines).argmax()), n_lines)
    seconds = time.perf_counter() - t0
    return Generation(
        text=text,
        tokens=len(lm.tokenizer.encode(text)),
        prompt_tokens=len(ids),
        stop_reason="quote",
        prefill_seconds=seconds,
        decode_seconds=0.0,
        retrieval_seconds=0.0,
    )
