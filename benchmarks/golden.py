"""Golden outputs of the CLI with the default model: a restructuring must leave them unchanged.

    python benchmarks/golden.py record  [--out benchmarks/results/golden_outputs.json]
    python benchmarks/golden.py compare [--golden benchmarks/results/golden_outputs.json]

Recorded: `memtx score --json` (tokens, nll) of every sample document with the defaults,
`--no-memory` and `--context full`; `score --memory` of lstring.c against a bank of the other
sample documents; `bench passkey --lengths 4k` with the passkey config; an `ask` answer with its
sources. compare reruns them and fails when a token count, an answer or a source differs, or an
nll differs by more than 1e-6 relative.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _meta import REPO, run_metadata

MEMTX = [sys.executable, "-m", "memtx_cli"]
PASSKEY = "benchmarks/configs/passkey.yaml"
SAMPLE = REPO / "sample_docs"
DEFAULT = REPO / "benchmarks" / "results" / "golden_outputs.json"
TOLERANCE = 1e-6


def memtx(*args: str) -> dict:
    r = subprocess.run([*MEMTX, *args, "--json", "-q"], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"memtx {' '.join(args)} failed: {r.stderr[-800:]}")
    return json.loads(r.stdout)


def outputs() -> dict:
    docs = sorted(p for p in SAMPLE.rglob("*") if p.suffix in (".txt", ".c") and p.name != "README.md")
    out: dict = {"score": {}}
    for doc in docs:
        rel = doc.relative_to(REPO).as_posix()
        for mode, flags in (("defaults", []), ("no-memory", ["--no-memory"]), ("full", ["--context", "full"])):
            d = memtx("score", rel, *flags)
            out["dtype"] = d["dtype"]  # auto: bfloat16 where the CPU has it, else float32
            out["score"][f"{rel} {mode}"] = {"tokens": d["tokens"], "nll": d["nll"]}
            print(f"{rel} {mode}: {d['tokens']} tokens, nll {d['nll']:.6f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "sample.idx"
        memtx("ingest", "sample_docs", "--exclude", "lstring.c", "--out", str(bank))
        d = memtx("score", "sample_docs/code/lstring.c", "--memory", str(bank))
        out["score"]["sample_docs/code/lstring.c --memory bank"] = {"tokens": d["tokens"], "nll": d["nll"]}
        q = "When was version 1.8 of the Debian constitution ratified?"
        a = memtx("ask", q, "--memory", str(bank), "--max-tokens", "24")
        out["ask"] = {
            "question": q,
            "answer": a["answer"],
            "sources": [(s["path"].rsplit("/", 1)[-1], s["lines"]) for s in a["sources"]],
        }
    p = memtx("bench", "passkey", "--lengths", "4k", "--depths", "3", "--trials", "1", "--config", PASSKEY)
    out["passkey"] = [
        {k: t[k] for k in ("depth", "key", "tokens", "answer_memory", "answer_window")}
        for row in p["rows"]
        for t in row["details"]
    ]
    return out


def compare(golden: dict, now: dict) -> list[str]:
    """Differences; meaningful on the CPU the golden file was recorded on (record it again there,
    at the commit before a change, when the machine differs: BLAS and dtype vary by CPU)."""
    bad = []
    if golden.get("dtype") != now.get("dtype"):
        bad.append(f"dtype {golden.get('dtype')} -> {now.get('dtype')}: record the golden file on this CPU")
    for key, g in golden["score"].items():
        n = now["score"].get(key)
        if n is None or n["tokens"] != g["tokens"] or abs(n["nll"] - g["nll"]) > TOLERANCE * abs(g["nll"]):
            bad.append(f"score {key}: {g} -> {n}")
    for part in ("ask", "passkey"):
        if json.loads(json.dumps(golden[part])) != json.loads(json.dumps(now[part])):
            bad.append(f"{part}: {golden[part]} -> {now[part]}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["record", "compare"])
    ap.add_argument("--out", type=Path, default=DEFAULT)
    ap.add_argument("--golden", type=Path, default=DEFAULT)
    a = ap.parse_args()
    meta = run_metadata()
    now = outputs()
    if a.what == "record":
        a.out.write_text(json.dumps({"meta": meta, **now}, indent=1) + "\n")
        return
    bad = compare(json.loads(a.golden.read_text()), now)
    print("\n".join(bad) if bad else "golden outputs unchanged")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
