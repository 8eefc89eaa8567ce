"""Sweep memory settings on real documents to choose the defaults (quality and cost).

    python benchmarks/sweep_memory.py --tokens 8192 > benchmarks/results/sweep_8k.jsonl

Prints one JSON line per (document, setting): perplexity of tokens 1..N, tokens/s, retrieval s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from memtx_cli.config import Config
from memtx_cli.engine.stream import full_nll, run_stream
from memtx_cli.model.loading import load_model

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared/corpus"
DOCS = {
    "book": "books/austen_persuasion.txt",
    "code": "code/lua54_interpreter_repo.c.txt",
    "legal": "legal/spdx_license_list_texts.txt",
}
SETTINGS = {
    "window": dict(memory=False),
    "window+sinks4": dict(memory=False, sinks=4),
    "all/fixed": dict(memory_layers="all", positions="fixed"),
    "all/fixed+sinks4": dict(memory_layers="all", positions="fixed", sinks=4),
    "all/true+sinks4": dict(memory_layers="all", positions="true", sinks=4),
    "all/clamped+sinks4": dict(memory_layers="all", positions="clamped", sinks=4),
    "every3/clamped+sinks4": dict(memory_layers="2,5,8,11,14,17,20,23,26,29", positions="clamped", sinks=4),
    "8-16-24/clamped+sinks4": dict(memory_layers="8,16,24", positions="clamped", sinks=4),
    "0-14/clamped+sinks4": dict(memory_layers="0-14", positions="clamped", sinks=4),
    "15-29/clamped+sinks4": dict(memory_layers="15-29", positions="clamped", sinks=4),
    "every3/fixed+sinks4": dict(memory_layers="2,5,8,11,14,17,20,23,26,29", positions="fixed", sinks=4),
    "20-29/clamped+sinks4": dict(memory_layers="20-29", positions="clamped", sinks=4),
    "24-29/clamped+sinks4": dict(memory_layers="24-29", positions="clamped", sinks=4),
    "16-19-22-25-28/clamped+sinks4": dict(memory_layers="16,19,22,25,28", positions="clamped", sinks=4),
    "15-29/clamped+sinks4+shared": dict(memory_layers="15-29", positions="clamped", sinks=4, shared_search=True),
    "20-29/clamped+sinks4+shared": dict(memory_layers="20-29", positions="clamped", sinks=4, shared_search=True),
    "20-29/clamped+sinks4+shared+ivf": dict(
        memory_layers="20-29", positions="clamped", sinks=4, shared_search=True, index="ivf"
    ),
    "20-29/fixed+sinks4+shared": dict(memory_layers="20-29", positions="fixed", sinks=4, shared_search=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--docs", default=",".join(DOCS))
    ap.add_argument("--settings", default=";".join(SETTINGS))
    ap.add_argument("--full", action="store_true", help="also full attention (N <= trained context)")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    lm = load_model(None, dtype=a.dtype)
    for genre in a.docs.split(","):
        text = (CORPUS / DOCS[genre]).read_text(encoding="utf-8")
        ids = torch.tensor(lm.tokenizer.encode(text)[: a.tokens])
        if a.full:
            t = time.perf_counter()
            nll = full_nll(lm.model, ids, lm.args.context_length)
            row = {
                "doc": genre,
                "setting": "full",
                "tokens": len(ids),
                "ppl": float(nll.double().mean().exp()),
                "tokens_per_s": len(ids) / (time.perf_counter() - t),
            }
            print(json.dumps(row), flush=True)
        for name in a.settings.split(";"):
            cfg = replace(Config(), **SETTINGS[name])
            t = time.perf_counter()
            nll, st = run_stream(lm.model, ids, cfg)
            sec = time.perf_counter() - t
            row = {
                "doc": genre,
                "setting": name,
                "tokens": len(ids),
                "ppl": float(nll.double().mean().exp()),
                "tokens_per_s": len(ids) / sec,
                "retrieval_s": st.retrieval_seconds,
                "seconds": sec,
            }
            print(json.dumps(row), flush=True)
            print(f"{genre} {name}: ppl {row['ppl']:.3f} ({row['tokens_per_s']:.0f} tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
