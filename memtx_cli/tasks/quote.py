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


def token_lines(offsets: list[tuple[int, int]], lines: list[Line]) -> torch.Tensor:
    """(T,) the line each token (character offsets) overlaps first, -1 for tokens outside them."""
    out = torch.full((len(offsets),), -1, dtype=torch.long)
    j = 0
    for ti, (a, b) in enumerate(offsets):
        while j < len(lines) and lines[j].end <= a:
            j += 1
        if j < len(lines) and a < lines[j].end and b > lines[j].start:
            out[ti] = j
    return out


def line_mass(offsets: list[tuple[int, int]], mass: torch.Tensor, lines: list[Line]) -> torch.Tensor:
    """Attention mass per line: the mass of the tokens that overlap it. mass (..., T) -> (..., lines)."""
    at = token_lines(offsets, lines)
    inside = at >= 0
    out = torch.zeros(*mass.shape[:-1], len(lines), dtype=torch.float32)
    return out.index_add_(-1, at[inside], mass[..., inside].float().cpu())


def passage(content: str, lines: list[Line], best: int, n: int) -> str:
    """Line `best` and up to n - 1 non-empty lines after it in the same excerpt."""
    take = [ln for ln in lines[best : best + n] if ln.excerpt == lines[best].excerpt]
    return "\n".join(content[ln.start : ln.end].rstrip() for ln in take)


def read_lines(
    lm: Any, content: str, excerpts: list[str], around: tuple[list[int], list[int]], heads: list[tuple[int, int]]
) -> tuple[torch.Tensor, list[Line], int]:
    """Per query head, the attention mass the question's tokens (and the template's after them,
    the assistant's turn opening) put on each line of the quoted `excerpts`, (len(heads), lines),
    read in the prompt `ask` decodes from: `around` is the chat template's ids before and after
    `content` (with_evidence's text; chat.template_around). Also the prompt's length in tokens."""
    before, after = around
    content_ids, offsets = lm.tokenizer.encode_with_offsets(content)
    ids = torch.tensor(before + content_ids + after, dtype=torch.long, device=lm.device)
    q_char = content.rindex(QUESTION_HEAD) + len(QUESTION_HEAD)
    first = len(before) + next((i for i, (s, _) in enumerate(offsets) if s >= q_char), len(content_ids))
    rows = attention_rows(lm.model, ids, heads, min(first, len(ids) - 1))
    lines = context_lines(content, excerpts)
    return line_mass(offsets, rows[:, len(before) : len(before) + len(content_ids)], lines), lines, len(ids)


def quote_answer(
    lm: Any, content: str, excerpts: list[str], around: tuple[list[int], list[int]], heads: str, n_lines: int
) -> Generation:
    """The answer to the question in `content` (with_evidence's text) quoted from `excerpts`
    (the texts it quotes): the line the `heads` (layer.query_head pairs) attend to most
    together, and the next ones (read_lines)."""
    t0 = time.perf_counter()
    probe = parse_query_heads(heads, lm.args.n_layers, lm.args.n_heads)
    masses, lines, n_prompt = read_lines(lm, content, excerpts, around, probe)
    text = passage(content, lines, int(masses.sum(0).argmax()), n_lines) if lines else ""
    return Generation(
        text=text,
        tokens=len(lm.tokenizer.encode(text)),
        prompt_tokens=n_prompt,
        stop_reason="quote",
        prefill_seconds=time.perf_counter() - t0,
        decode_seconds=0.0,
        retrieval_seconds=0.0,
    )
