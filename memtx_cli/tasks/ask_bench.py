"""Questions with sources (`memtx bench ask`): a set of questions, each about a fact stated once
in one of several long documents, answered as `memtx ask` answers them, over one bank holding
every document. Three measures per question: the right document is the first source, the gold
lines are among the listed sources, the answer contains the fact.

The set is a YAML file: `documents` (a name, a kind, a corpus file and the line range kept) and
`questions` (the document, the question, gold lines in the corpus file's numbering, accepted
answers, and a split: `tune` questions may choose settings, `held-out` ones report how the
choice transfers)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtx_cli.config import Config
from memtx_cli.engine.generate import Sampling
from memtx_cli.errors import MemtxError, UsageError
from memtx_cli.model.loading import LoadedModel

SPLITS = ("tune", "held-out")


@dataclass(frozen=True)
class Document:
    name: str  # the file name the bank records
    kind: str
    source: str  # relative to the corpus directory
    first: int  # first and last line kept (1-based, inclusive)
    last: int


@dataclass(frozen=True)
class Question:
    doc: str
    question: str
    first: int  # gold lines, in the corpus file's numbering
    last: int
    answers: tuple[str, ...]
    split: str


@dataclass(frozen=True)
class AskSet:
    documents: dict[str, Document]
    questions: list[Question]

    def only(self, split: str) -> AskSet:
        """The questions of one split ("all" keeps every question)."""
        if split not in ("all", *SPLITS):
            raise UsageError(f"--split must be all, {' or '.join(SPLITS)}, got {split!r}")
        return self if split == "all" else AskSet(self.documents, [q for q in self.questions if q.split == split])


def _line_range(v: Any, where: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) and 1 <= v[0] <= v[1]):
        raise MemtxError(f"{where}: lines must be [first, last] with 1 <= first <= last, got {v!r}")
    return v[0], v[1]


def load_set(path: Path) -> AskSet:
    """The question set at `path`, checked: every question names a known document, its gold lines
    lie inside the document's range, it has accepted answers and a known split."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MemtxError(f"cannot read the question set {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise MemtxError(f"the question set {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw.get("documents") or not raw.get("questions"):
        raise MemtxError(f"the question set {path} needs `documents` and `questions` lists")
    docs: dict[str, Document] = {}
    for i, d in enumerate(raw["documents"]):
        where = f"{path}: documents[{i}]"
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("name", "kind", "source")):
            raise MemtxError(f"{where}: needs name, kind and source")
        if d["name"] in docs or "/" in d["name"]:
            raise MemtxError(f"{where}: the name {d['name']!r} is repeated or holds a '/'")
        docs[d["name"]] = Document(d["name"], d["kind"], d["source"], *_line_range(d.get("lines"), where))
    questions = []
    for i, q in enumerate(raw["questions"]):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict) or q.get("doc") not in docs:
            raise MemtxError(f"{where}: `doc` must name one of the documents")
        first, last = _line_range(q.get("lines"), where)
        doc = docs[q["doc"]]
        if not doc.first <= first <= last <= doc.last:
            raise MemtxError(f"{where}: gold lines {first}-{last} are outside {doc.name}'s {doc.first}-{doc.last}")
        answers = q.get("answers")
        if not isinstance(q.get("question"), str) or not answers or not all(isinstance(a, str) for a in answers):
            raise MemtxError(f"{where}: needs a question and a list of accepted answers")
        if q.get("split") not in SPLITS:
            raise MemtxError(f"{where}: split must be one of {', '.join(SPLITS)}")
        questions.append(Question(q["doc"], q["question"], first, last, tuple(answers), q["split"]))
    return AskSet(docs, questions)


def contains_answer(text: str, answers: tuple[str, ...]) -> bool:
    """Whether `text` holds one of `answers` as whole words (case and spacing ignored)."""
    flat = " ".join(text.split())
    for a in answers:
        pat = r"\s+".join(re.escape(w) for w in a.split())
        if re.search(rf"(?<!\w){pat}(?!\w)", flat, flags=re.IGNORECASE):
            return True
    return False


def write_documents(s: AskSet, corpus: Path, out: Path) -> dict[str, Path]:
    """Each document's line range written to `out/<name>`; the gold answers checked against the
    gold lines (a set whose answers are not where it says fails here, before any model runs)."""
    paths = {}
    for doc in s.documents.values():
        src = corpus / doc.source
        try:
            # lines end at "\n" only, as sources count them (str.splitlines also splits at \f, \x1c, ...)
            lines = re.findall(r"[^\n]*\n|[^\n]+$", src.read_text(encoding="utf-8"))
        except OSError as e:
            raise MemtxError(f"cannot read {src} (is --corpus right?): {e.strerror or e}") from None
        if doc.last > len(lines):
            raise MemtxError(f"{src} has {len(lines)} lines; {doc.name} asks for {doc.first}-{doc.last}")
        paths[doc.name] = out / doc.name
        paths[doc.name].write_text("".join(lines[doc.first - 1 : doc.last]), encoding="utf-8")
        for q in s.questions:
            if q.doc == doc.name and not contains_answer("".join(lines[q.first - 1 : q.last]), q.answers):
                raise MemtxError(f"{doc.name}: no accepted answer of {q.question!r} is in lines {q.first}-{q.last}")
    return paths


def grade(q: Question, doc: Document, answer_text: str, sources: list[Any]) -> dict[str, Any]:
    """The three measures for one answer. Sources carry lines of the written document; the gold
    lines are shifted into that numbering. Gold lines count as found when a listed source of
    the right document overlaps them."""
    first, last = q.first - doc.first + 1, q.last - doc.first + 1

    def right_doc(src: Any) -> bool:
        return Path(src.path).name == doc.name

    def overlaps(src: Any) -> bool:
        return right_doc(src) and src.lines is not None and src.lines[0] <= last and first <= src.lines[1]

    return {
        "doc_first": bool(sources) and right_doc(sources[0]),
        "gold_lines": any(overlaps(s) for s in sources),
        "answer_right": contains_answer(answer_text, q.answers),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {"questions": n}
    for k in ("doc_first", "gold_lines", "answer_right"):
        out[k] = sum(r[k] for r in rows) / n if n else 0.0
    out["seconds_per_question"] = sum(r["seconds"] for r in rows) / n if n else 0.0
    spans = [x for r in rows for x in r.get("source_lines", []) if x]
    # long sources hold gold lines more easily: their length is part of the result
    out["lines_per_source"] = sum(spans) / len(spans) if spans else 0.0
    return out


def run_ask_bench(
    lm: LoadedModel,
    cfg: Config,
    s: AskSet,
    bank: Any,
    sampling: Sampling,
    sources: int,
    evidence: int,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Every question of `s` asked of `bank` as `memtx ask` asks it (chat template, the
    question alone, `evidence` recalled excerpts quoted), graded; totals per split."""
    from memtx_cli.tasks.chat import answer

    rows = []
    for i, q in enumerate(s.questions):
        t0 = time.perf_counter()
        res = answer(lm, [{"role": "user", "content": q.question}], cfg, sampling, bank, sources, evidence=evidence)
        row = {
            "doc": q.doc,
            "split": q.split,
            "question": q.question,
            "answer": res.generation.text.strip(),
            "sources": [src.label() for src in res.sources],
            "source_lines": [src.lines[1] - src.lines[0] + 1 if src.lines else None for src in res.sources],
            **grade(q, s.documents[q.doc], res.generation.text, res.sources),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        marks = " ".join(f"{k}={'Y' if row[k] else 'n'}" for k in ("doc_first", "gold_lines", "answer_right"))
        log(f"ask {i + 1}/{len(s.questions)} [{q.split}] {marks} {q.question[:48]!r} -> {row['answer'][:40]!r}")
    summary = {"all": summarize(rows)} | {sp: summarize([r for r in rows if r["split"] == sp]) for sp in SPLITS}
    kinds = sorted({d.kind for d in s.documents.values()})
    return {
        "documents": [{"name": d.name, "kind": d.kind, "lines": d.last - d.first + 1} for d in s.documents.values()],
        "kinds": kinds,
        "sources": sources,
        "evidence": evidence,
        "max_tokens": sampling.max_tokens,
        "precision": bank.precision,
        "summary": summary,
        "rows": rows,
    }


def prepare_bank(
    lm: LoadedModel,
    cfg: Config,
    s: AskSet,
    corpus: Path,
    workdir: Path,
    log: Callable[[str], None] = lambda m: None,
    precision: str | None = None,
) -> Any:
    """The set's documents written to `workdir/docs` and ingested (as `memtx ingest` does) into
    the bank `workdir/bank`, which is opened for reading. Documents already in the bank and
    unchanged are not ingested again, so a kept workdir is reused."""
    from memtx_cli.bank.ingest import ingest, open_or_create_bank
    from memtx_cli.bank.store import Bank

    docs_dir = workdir / "docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    paths = write_documents(s, corpus, docs_dir)
    w = open_or_create_bank(workdir / "bank", lm, cfg, 0, "fifo", precision=precision)
    try:
        rep = ingest(lm, w, list(paths.values()), cfg)
    finally:
        w.close()
    if rep.added:
        log(f"ingested {len(rep.added)} documents, {rep.tokens:,} tokens in {rep.seconds:.0f} s")
    return Bank.open(workdir / "bank", writer=False, verify=False)
