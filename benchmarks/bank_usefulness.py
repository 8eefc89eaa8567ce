"""Does a bank help? Hold out a document, ingest its siblings, score it with and without --memory.

    python benchmarks/bank_usefulness.py --precision float16,int8 --out benchmarks/results/bank_usefulness.json

code: the Lua 5.4 interpreter (../shared/corpus/code/lua54_interpreter_repo.c.txt) split back
into its files; lstrlib.c is held out, the other files form the bank.
book: Austen's Northanger Abbey forms the bank; the first --book-tokens of Persuasion are scored.
Everything runs through the real CLI (`memtx ingest`, `memtx score --json`) as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import CORPUS, run_metadata  # noqa: E402

MEMTX = [sys.executable, "-m", "memtx_cli"]


def run(args: list[str]) -> dict:
    out = subprocess.run(MEMTX + args + ["--json", "--quiet"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def split_lua(dst: Path) -> list[Path]:
    text = (CORPUS / "code" / "lua54_interpreter_repo.c.txt").read_text(encoding="utf-8")
    parts = re.split(r"^/\* ===== FILE: (.+?) ===== \*/\n", text, flags=re.M)
    files = []
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        p = dst / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body, encoding="utf-8")
        files.append(p)
    return files


BASELINES: dict[tuple[str, int], tuple[dict, dict]] = {}  # (target, tokens) -> own memory, window: codec-free


def case(name: str, bank_inputs: list[str], target: Path, work: Path, max_tokens: int, precision: str) -> dict:
    bank = work / f"{name}-{precision}.idx"
    t = time.perf_counter()
    ing = run(["ingest", *bank_inputs, "--out", str(bank), "--precision", precision])
    ingest_s = time.perf_counter() - t
    info = run(["bank", "info", str(bank)])
    flags = ["--max-tokens", str(max_tokens)] if max_tokens else []
    key = (str(target), max_tokens)
    if key not in BASELINES:
        BASELINES[key] = (run(["score", str(target), *flags]), run(["score", str(target), "--no-memory", *flags]))
    own, window = BASELINES[key]
    with_bank = run(["score", str(target), "--memory", str(bank), *flags])
    row = {
        "case": name,
        "precision": precision,
        "target": target.name,
        "bank_documents": info["documents"],
        "bank_tokens": info["tokens"],
        "bank_bytes_per_token": info["bytes_per_token"],
        "ingest_tokens_per_s": ing["tokens_per_s"],
        "ingest_seconds": ingest_s,
        "tokens": own["tokens"],
        "ppl_window": window["ppl"],
        "ppl_own_memory": own["ppl"],
        "ppl_with_bank": with_bank["ppl"],
        "bank_benefit": own["ppl"] - with_bank["ppl"],
        "score_tokens_per_s_own": own["tokens_per_s"],
        "score_tokens_per_s_bank": with_bank["tokens_per_s"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--book-tokens", type=int, default=16384)
    ap.add_argument("--cases", default="code,book")
    ap.add_argument("--precision", default="float16", help="comma-separated: float16,int8")
    ap.add_argument("--work", default="", help="keep banks here (a rerun reuses them: ingest is idempotent)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "code" in a.cases:
            files = split_lua(work / "lua")
            held = next(f for f in files if f.name == "lstrlib.c")
            others = [str(f) for f in files if f != held]
            for prec in a.precision.split(","):
                rows.append(case("code", others, held, work, 0, prec))
        if "book" in a.cases:
            bank_in = [str(CORPUS / "books" / "austen_northangerabbey.txt")]
            target = CORPUS / "books" / "austen_persuasion.txt"
            for prec in a.precision.split(","):
                rows.append(case("book", bank_in, target, work, a.book_tokens, prec))
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": run_metadata(), "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
