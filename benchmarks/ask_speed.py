"""How long `memtx ask` takes, end to end, on a bank of long licences (about 85K tokens).

    python benchmarks/ask_speed.py [--workdir DIR] [--busy] [--out FILE]

The longest licence texts of the corpus's SPDX collection (one file each, distinct licences,
until about 85K tokens) are ingested with `memtx ingest`; then each question runs as its own
`memtx ask QUESTION --memory BANK --json` process, timed from start to exit (imports, model
load, bank open, recall, answer), with the defaults (answer-mode quote). Two more runs per
question time decoding: `--set answer-mode=free` (decoded from the quoted sources) and
`--evidence 0` (decoded with the bank as memory, every token reading it). `--busy` runs
everything again while another `memtx score` process shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _meta import CORPUS, emit, run_metadata  # noqa: E402

TOKENS = 85_000
CHARS_PER_TOKEN = 4.2  # licence English, this tokenizer (checked by the ingest report)
QUESTIONS = [
    "Under the Apple Public Source License, which law governs the license?",
    "Under the Open Database License, what is a Derivative Database?",
    "Under the Mozilla Public License 1.1, how long does a Contributor have to cure a breach?",
    "Under the RealNetworks Public Source License, what must you do when you deploy covered code?",
    "Under the Common Public Attribution License, what must be displayed to users?",
]


def licences(out: Path) -> list[Path]:
    text = (CORPUS / "legal/spdx_license_list_texts.txt").read_text(encoding="utf-8")
    parts = re.split(r"\n===== (.+?) =====\n", text)
    docs = sorted(((parts[i], parts[i + 1]) for i in range(1, len(parts), 2)), key=lambda kv: -len(kv[1]))
    out.mkdir(parents=True, exist_ok=True)
    paths, families, chars = [], set(), 0
    for name, body in docs:
        family = re.sub(r"[-.]?\d.*$", "", name.removesuffix(".txt"))  # one version per licence
        if family in families:
            continue
        families.add(family)
        p = out / name
        p.write_text(body, encoding="utf-8")
        paths.append(p)
        chars += len(body)
        if chars >= TOKENS * CHARS_PER_TOKEN:
            break
    return paths


def timed(cmd: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(r.stdout)


def ask_runs(bank: Path) -> list[dict]:
    rows = []
    for q in QUESTIONS:
        base = ["memtx", "ask", q, "--memory", str(bank), "--json"]
        sec, got = timed(base)
        free_sec, free = timed([*base, "--set", "answer-mode=free", "--max-tokens", "48"])
        bank_sec, mem = timed([*base, "--evidence", "0", "--max-tokens", "48"])
        rows.append(
            {
                "question": q,
                "seconds": sec,
                "answer": got["answer"],
                "sources": [s["path"].split("/")[-1] + ":" + str(s.get("lines")) for s in got["sources"]],
                "free_seconds": free_sec,
                "free_decode_tokens_per_s": free["decode_tokens_per_s"],
                "bank_decoding_seconds": bank_sec,
                "bank_decode_tokens_per_s": mem["decode_tokens_per_s"],
            }
        )
        print(f"{sec:5.1f} s  {q[:60]!r} -> {got['answer'][:60]!r}", file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> dict:
    def med(k: str) -> float:
        v = sorted(r[k] for r in rows)
        return v[len(v) // 2]

    return {k: med(k) for k in rows[0] if isinstance(rows[0][k], float)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/memtx_ask_speed"))
    ap.add_argument("--busy", action="store_true", help="also run beside another memtx score process")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    docs = licences(a.workdir / "docs")
    bank = a.workdir / "licences.idx"
    ingest = None
    if not bank.exists():
        sec, ingest = timed(["memtx", "ingest", *map(str, docs), "--out", str(bank), "--json"])
        ingest["wall_seconds"] = sec
    res = {
        "meta": run_metadata(),
        "documents": [p.name for p in docs],
        "ingest": ingest,
        "idle": {"rows": ask_runs(bank)},
    }
    res["idle"]["median"] = summary(res["idle"]["rows"])
    if a.busy:
        hog = subprocess.Popen(
            ["memtx", "score", str(CORPUS / "books/austen_persuasion.txt"), "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(5)  # the other job is past its start-up
            res["busy"] = {"rows": ask_runs(bank)}
            res["busy"]["median"] = summary(res["busy"]["rows"])
        finally:
            hog.kill()
    emit(res, a.out)


if __name__ == "__main__":
    main()
