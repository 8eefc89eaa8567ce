"""Questions and conversations over a bank: the card's chat template, generation with memory,
and the sources of an answer.

Sources are measured, not guessed: while the answer is decoded, every memory layer reports
the attention mass its query heads put on each retrieved bank block (`MemoryRead.trace`). The
mass is summed per block, blocks map to (document, characters) through the bank's provenance,
and characters to line numbers through the document itself (read again, and only trusted when
its sha256 still matches the one recorded at ingest)."""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.engine.generate import CopyFrom, Generation, Sampling, generate, stop_token_ids
from memtx_cli.errors import MemtxError, UsageError
from memtx_cli.model.loading import LoadedModel


def render_chat(lm: LoadedModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ([{role, content}]) in the model's chat template (card or
    GGUF/HF tokenizer config); a plain "role: content" layout when the model has none.

    A template comes from a model file, so it is untrusted: it renders in jinja2's immutable
    sandbox (as transformers renders the same templates), and one that breaks out of it, or
    fails, is refused with one line."""
    template = lm.chat_template
    if not template:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

    def raise_exception(message: str) -> None:  # what HF templates call to refuse input
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=lm.tokenizer.decode([lm.tokenizer.bos_id]) if getattr(lm.tokenizer, "bos_id", None) else "",
            eos_token="",
        )
    except SecurityError as e:
        raise MemtxError(f"the chat template of {lm.name} is refused: it tries an unsafe operation ({e})") from None
    except (jinja2.TemplateError, TypeError, ValueError, RecursionError) as e:
        raise MemtxError(f"the chat template of {lm.name} does not render: {str(e)[:200]}") from None


def chat_pieces(
    lm: LoadedModel, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[tuple[list[int], int | None]]:
    """`messages` in the chat template as token pieces: (ids, None) for the template's own text,
    its control tokens (`<|im_start|>`, ...) as the single ids the model was trained on, and
    (ids, i) for message i's content as plain text, so a question or a quoted document that
    spells a control token cannot open a turn of its own. (A template that rewrites contents
    beyond recognition is encoded as plain text throughout, as one template piece.)"""
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    stand_ins = [{**m, "content": mk} for m, mk in zip(messages, marks, strict=True)]
    rendered = render_chat(lm, stand_ins, add_generation_prompt)
    pieces: list[tuple[list[int], int | None]] = []
    pos = 0
    for i, (m, mk) in enumerate(zip(messages, marks, strict=True)):
        at = rendered.find(mk, pos)
        if at < 0:
            return [(lm.tokenizer.encode(render_chat(lm, messages, add_generation_prompt)), None)]
        pieces += [(lm.tokenizer.encode(rendered[pos:at], special=True), None), (lm.tokenizer.encode(m["content"]), i)]
        pos = at + len(mk)
    return [*pieces, (lm.tokenizer.encode(rendered[pos:], special=True), None)]


def chat_ids(lm: LoadedModel, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` in the chat template (chat_pieces joined)."""
    return [t for ids, _ in chat_pieces(lm, messages, add_generation_prompt) for t in ids]


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
    weight: float  # share of the recall score (attention mass, or fused ranks when recalled)
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


def sources_from_mass(bank: Any, mass: dict[int, float], n: int) -> list[Source]:
    """The `n` heaviest sources: bank blocks -> (document, token and char span) via provenance;
    blocks that continue each other in a document merge into one source (weights add up)."""
    total = sum(mass.values())
    if total <= 0 or n < 1:
        return []
    spans = []  # (doc id, first token, token after the last, char start, char end, weight)
    for b, w in mass.items():
        if b < 0 or b >= len(bank.blocks) or int(bank.blocks[b, 1]) <= 0:
            continue
        rows = bank.block_provenance(b)
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
            text = bank.document_text(doc)
            texts[doc] = None if text is None else (text, [0] + [m.end() for m in re.finditer("\n", text)])
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
    evidence: list[Source] = field(default_factory=list)  # excerpts placed in the prompt

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.generation.text,
            "sources": [s.to_dict() for s in self.sources],
            "evidence": [s.label() for s in self.evidence],
            **{k: v for k, v in self.generation.to_dict().items() if k != "text"},
        }


# A neutral question: blocks that draw attention whatever is asked (the first lines of files,
# licence headers) draw it here too, and recall ranks blocks by the attention they get beyond it.
NEUTRAL_QUESTION = "What does the text say about it?"
# Fused blocks that make a question's sources: more merge neighbours into long spans that hold
# the gold lines more often but quote less of them (docs/decisions.md).
RECALL_BLOCKS = 8
# The attention lift's weight in the fusion, BM25's being 1: the lift tells the document, the
# words tell the lines (chosen on the questions benchmark's tune split, docs/decisions.md).
LIFT_WEIGHT = 0.25


@torch.inference_mode()
def block_mass(lm: LoadedModel, ids: list[int], cfg: Config, bank: Any) -> dict[int, float]:
    """Attention mass per bank block, per token of `ids` (read with the bank as memory)."""
    from memtx_cli.engine.stream import Streamer

    trace = BankTrace()
    st = Streamer(lm.model, cfg, bank)
    st.trace = trace
    st.feed(torch.tensor(ids, dtype=torch.long, device=lm.device))
    return {b: m / len(ids) for b, m in trace.mass.items()}


def recall(lm: LoadedModel, question: str, cfg: Config, bank: Any, n: int) -> list[Source]:
    """The `n` sources that best answer `question`: two rankings of bank blocks fused by
    reciprocal rank (`fuse_ranks`).

    - Attention lift: the mass the question's tokens put on each block (read with 64 bank
      blocks and no bank prior), beyond what a neutral question gives it. It finds the right
      document more often than the right lines.
    - BM25 over the bank's words (`bm25_blocks`, banks made with words): the blocks that state
      the question's rare words.

    The sources are made of the RECALL_BLOCKS best fused blocks (neighbours merge): on the
    questions benchmark's tune split they held the gold lines for 14 of 18 questions, at 9
    lines a source, against 6 for the lift alone (docs/decisions.md)."""
    from memtx_cli.bank.words import bm25_blocks, fuse_ranks

    cfg = dataclasses.replace(cfg, bank_blocks=max(cfg.bank_blocks, 64), bank_bias=0.0)
    mass = block_mass(lm, lm.tokenizer.encode(question), cfg, bank)
    base = block_mass(lm, lm.tokenizer.encode(NEUTRAL_QUESTION), cfg, bank)
    lift = {b: m - base.get(b, 0.0) for b, m in mass.items() if m > base.get(b, 0.0)} or mass
    lexical = bm25_blocks(bank, question, top=64)
    if not lexical:  # a bank without words, or none of the question's
        return sources_from_mass(bank, lift, n)
    fused = fuse_ranks((lift, LIFT_WEIGHT), (lexical, 1.0))
    return sources_from_mass(bank, dict(sorted(fused.items(), key=lambda kv: -kv[1])[:RECALL_BLOCKS]), n)


def with_evidence(question: str, excerpts: list[Source], max_chars: int) -> str:
    """The question with the recalled excerpts as plain context. (Numbered, titled excerpts made
    the 135M model continue the list instead of answering.)"""
    context = "\n\n".join(quoted(excerpts, max_chars))
    return f"Context:\n{context}\n\nAnswer this question from the context: {question}"


def quoted(excerpts: list[Source], max_chars: int) -> list[str]:
    """The excerpts' texts as the prompt quotes them (each cut at max_chars)."""
    out = []
    for src in excerpts:
        text = (src.text or "").strip()
        out.append(text[:max_chars] + (" ..." if len(text) > max_chars else ""))
    return out


def check_counts(n_sources: int, evidence: int = 0) -> None:
    """Sources to list and to quote: counts, never negative."""
    if n_sources < 0:
        raise UsageError(f"--sources must be >= 0, got {n_sources}")
    if evidence < 0:
        raise UsageError(f"--evidence must be >= 0, got {evidence}")


def answer(
    lm: LoadedModel,
    messages: list[dict[str, str]],
    cfg: Config,
    sampling: Sampling,
    bank: Any,
    n_sources: int = 3,
    on_text: Callable[[str], None] = lambda t: None,
    evidence: int = 0,
    evidence_chars: int = 1200,
) -> Answer:
    """The assistant's reply to `messages` with memory of the bank, and its sources.

    evidence = 0: the answer is decoded with the bank as memory only; the sources are the bank
    blocks its tokens attended to most. evidence = N > 0 (recall, then read): the question is
    first read with the bank as memory, the N sources it attended to most are quoted into the
    prompt (when their text is still on disk), then the answer is made from them by
    `cfg.answer_mode`: the lines the question attends to, quoted (quote), a decoded copy
    (copy) or free decoding (free). The bank is quoted, not attended again: on the questions
    benchmark's tune split attending to it while decoding answered no better and took twice
    as long (docs/decisions.md); the sources listed are the ones recalled. A 135M model
    rarely reproduces a fact from memory attention alone, but does from a quoted excerpt."""
    check_counts(n_sources, evidence)
    stop = stop_token_ids(lm)
    if bank is None:
        gen = generate(lm, chat_ids(lm, messages), cfg, sampling, None, on_text, stop)
        return Answer(gen, [])
    if evidence > 0:
        question = messages[-1]["content"]
        # the question alone: the template's and system prompt's tokens would steer the recall
        recalled = recall(lm, question, cfg, bank, max(n_sources, evidence))
        excerpts = [s for s in recalled if s.text][:evidence]
        if excerpts:
            messages = [*messages[:-1], {"role": "user", "content": with_evidence(question, excerpts, evidence_chars)}]
        memory = None if excerpts else bank
        mode = cfg.answer_mode if excerpts else "free"
        if mode == "quote" and not str(cfg.quote_heads).strip():
            mode = "copy"  # a model without quote heads (the card's) copies instead
        if mode == "quote":
            gen = quote_from(lm, messages, cfg, quoted(excerpts, evidence_chars))
            on_text(gen.text)
            return Answer(gen, recalled[:n_sources], excerpts)
        copy = None
        if mode == "copy":  # every answer token continues a span of the quoted text
            copy = CopyFrom(lm.tokenizer.encode("\n" + "\n\n".join(quoted(excerpts, evidence_chars))), stop)
        gen = generate(lm, chat_ids(lm, messages), cfg, sampling, memory, on_text, stop, query=question, copy=copy)
        return Answer(gen, recalled[:n_sources], excerpts)
    trace = BankTrace()
    ids = chat_ids(lm, messages)
    gen = generate(lm, ids, cfg, sampling, bank, on_text, stop, trace=trace, query=messages[-1]["content"])
    return Answer(gen, sources_from_mass(bank, trace.mass, n_sources))


def template_around(lm: LoadedModel, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The chat template's token ids before and after the last message's content ([] and []
    when the template does not keep the content recognisable: it is then read alone)."""
    pieces = chat_pieces(lm, messages)
    at = next((k for k, (_, i) in enumerate(pieces) if i == len(messages) - 1), None)
    if at is None:
        return [], []
    return [t for ids, _ in pieces[:at] for t in ids], [t for ids, _ in pieces[at + 1 :] for t in ids]


def quote_from(lm: LoadedModel, messages: list[dict[str, str]], cfg: Config, excerpts: list[str]) -> Generation:
    """answer-mode quote: the last message (with_evidence's text) answered by the lines of the
    `excerpts` it quotes that the question attends to (tasks/quote.py), read in the chat prompt."""
    from memtx_cli.tasks.quote import quote_answer

    around = template_around(lm, messages)
    return quote_answer(lm, messages[-1]["content"], excerpts, around, cfg.quote_heads, cfg.quote_lines)


def conversation_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text for the bank (what `chat --remember` stores)."""
    return "".join(f"{m['role']}: {m['content'].strip()}\n" for m in messages if m["role"] != "system")


@dataclass
class Remembered:
    """Exchanges of a conversation waiting to be appended to a bank (`chat --remember`). While
    another process writes the bank they are kept, and committed when its lock frees: a busy
    bank delays a memory, it never loses one."""

    bank: Path
    lm: LoadedModel
    cfg: Config
    pending: list[tuple[str, str]] = field(default_factory=list)  # (document key, text)

    def add(self, key: str, text: str) -> None:
        self.pending.append((key, text))

    def commit(self, wait: float, on_wait: Callable[[str], None] | None = None) -> int:
        """Append every pending exchange (waiting up to `wait` s for the lock); returns the
        tokens remembered, 0 with the exchanges still pending if the bank stayed busy."""
        from memtx_cli.bank.ingest import remember_text
        from memtx_cli.bank.lock import BankBusy
        from memtx_cli.bank.store import Bank

        if not self.pending:
            return 0
        try:
            w = Bank.open(self.bank, writer=True, verify=False, wait=wait, on_wait=on_wait)
        except BankBusy:
            return 0
        tokens = 0
        with w:
            while self.pending:
                key, text = self.pending[0]
                tokens += remember_text(self.lm, w, key, text, self.cfg)
                self.pending.pop(0)
        return tokens


class Conversation:
    """A chat: the history, one `turn` per user message (each reads the bank as committed then,
    with the exchanges remembered so far), and what `--remember` keeps."""

    def __init__(
        self,
        lm: LoadedModel,
        cfg: Config,
        sampling: Any,
        bank: str | None,
        sources: int,
        system: str | None = None,
        memory: Remembered | None = None,
    ) -> None:
        import datetime

        self.lm, self.cfg, self.sampling, self.bank, self.sources, self.memory = (
            lm,
            cfg,
            sampling,
            bank,
            sources,
            memory,
        )
        self.history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.session = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.turns = 0

    def turn(
        self, message: str, emit: Callable[[str], None], wait: float, on_wait: Callable[[str], None]
    ) -> tuple[Answer, int]:
        """Answer one message; returns the answer and the tokens remembered (0 without --remember)."""
        from memtx_cli.engine.session import check_bank_model, open_bank

        self.history.append({"role": "user", "content": message})
        the_bank = open_bank(self.bank) if self.bank else None
        try:
            if the_bank is not None:
                check_bank_model(the_bank, self.lm)
            res = answer(self.lm, self.history, self.cfg, self.sampling, the_bank, self.sources, emit)
        finally:
            if the_bank is not None:
                the_bank.close()
        self.history.append({"role": "assistant", "content": res.generation.text.strip()})
        remembered = 0
        if self.memory is not None:
            self.memory.add(f"chat:{self.session}#{self.turns}", conversation_text(self.history[-2:]))
            remembered = self.memory.commit(wait, on_wait=on_wait)
        self.turns += 1
        return res, remembered

    def finish(self, wait: float, on_wait: Callable[[str], None]) -> None:
        """Commit what is still pending, waiting up to `wait` s for another writer."""
        if self.memory is None or not self.memory.pending:
            return
        self.memory.commit(wait, on_wait=on_wait)
        if self.memory.pending:
            raise MemtxError(
                f"{len(self.memory.pending)} exchange(s) were not remembered: bank {self.bank} stayed busy "
                f"for {wait:.0f} s (another process is writing it)"
            )


def ask_bank(
    question: str,
    flags: dict[str, Any],
    sets: list[str] | None,
    config_file: str | None,
    bank_path: str | None,
    sampling: Sampling,
    sources: int,
    evidence: int,
    system: str | None,
    emit: Callable[[str], None],
) -> Answer:
    """`memtx ask` below the CLI: counts checked, settings resolved, bank opened and checked,
    model loaded, the question answered with its sources."""
    from memtx_cli.engine.session import load_for, open_bank, resolve_settings

    check_counts(sources, evidence)
    if not question:
        raise MemtxError("the question is empty")
    cfg, _ = resolve_settings(flags, sets, config_file)
    bank = open_bank(bank_path) if bank_path else None
    lm = load_for(cfg, bank)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return answer(lm, messages, cfg, sampling, bank, sources, emit, evidence=evidence)
