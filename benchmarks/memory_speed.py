"""Speed with memory on (the defaults) against the window alone, in one process and one run:
`score` with memory, `ingest` into a new bank, and `score --no-memory` (the window), each on
the same first N tokens of each document.

    python benchmarks/memory_speed.py --tokens 65536 --out benchmarks/results/memory_speed.json

Documents: the corpus's long texts that no memory setting was chosen on (the head budgets and
rankings came from *Northanger Abbey*, `_pydecimal.py` and the GPL-3: docs/benchmarks.md).
Window and memory scoring run interleaved segment by segment (`run_streams`: the machine's
drift hits both alike); the ingest of the same tokens runs right after. Reported: tokens/s of
each, and memory and ingest as fractions of the window's speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import CORPUS, emit, run_metadata  # noqa: E402

DOCS = {
    "code": "code/lua54_interpreter_repo.c.txt",
    "book": "books/austen_persuasion.txt",
    "legal": "legal/spdx_license_list_texts.txt",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--docs", default="code,book", help=f"comma-separated, of {','.join(DOCS)}")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch

    from memtx_cli.bank.ingest import ingest, open_or_create_bank
    from memtx_cli.engine.session import load_for, resolve_settings
    from memtx_cli.engine.stream import run_streams

    cfg, _ = resolve_settings({}, None, None)
    lm = load_for(cfg)
    window = dataclasses.replace(cfg, memory=False)
    rows = []
    for name in a.docs.split(","):
        path = a.corpus / DOCS[name]
        ids = lm.tokenizer.encode(path.read_text(encoding="utf-8"))[: a.tokens]
        x = torch.tensor(ids)
        (nll_w, _, s_w), (nll_m, st, s_m) = run_streams(lm.model, x, [window, cfg])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()  # what `memtx ingest` does once the model is loaded
            bank = open_or_create_bank(Path(tmp) / "bank", lm, cfg, 0, "fifo")
            rep = ingest(lm, bank, [path], cfg, max_tokens=a.tokens)
            bank.close()
            s_i = time.perf_counter() - t0
        n = len(ids)
        row = {
            "doc": path.name,
            "tokens": n,
            "window_tokens_per_s": n / s_w,
            "memory_tokens_per_s": n / s_m,
            "ingest_tokens_per_s": n / s_i,
            "memory_fraction_of_window": s_w / s_m,
            "ingest_fraction_of_window": s_w / s_i,
            "ingest_seconds_in_report": rep.seconds,  # without creating and closing the bank
            "ppl_window": float(nll_w.float().mean().exp()),
            "ppl_memory": float(nll_m.float().mean().exp()),
            "retrieval_seconds": st.retrieval_seconds,
        }
        rows.append(row)
        print(row, file=sys.stderr)
    emit({"meta": run_metadata(), "dtype": str(lm.dtype).removeprefix("torch."), "rows": rows}, a.out)


if __name__ == "__main__":
    main()
