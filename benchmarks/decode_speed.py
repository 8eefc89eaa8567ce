"""Decoding speed of `memtx generate`: a short prompt, a long prompt (memory on) and a bank.

    python benchmarks/decode_speed.py [--bank BANK] [--repeats 3] [--package DIR] [--out FILE]

Each run is its own `memtx generate ... --temperature 0 --json` process (greedy, stop tokens
ignored by asking for a length the text does not end before); decode tokens/s is what the
command reports (decoding only: prefill and start-up excluded). Workloads:
- short: a 12-token prompt, no memory;
- document: the first 4,000 characters of *Persuasion* (about 950 tokens: past one segment, so
  the document's own memory is read by every decoded token);
- bank (with --bank): a question-like prompt with BANK as memory (e.g. the licence bank of
  `ask_speed.py`), every decoded token reading it.
--package DIR runs the memtx package found in DIR (another checkout) instead of this one: the
same workloads before and after a change, in one run, alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _meta import CORPUS, REPO, emit, run_metadata  # noqa: E402

SHORT = "The history of the Roman empire begins"
BANK_PROMPT = "Under the Mozilla Public License 1.1, a Contributor"


def workloads(bank: str | None) -> dict[str, tuple[list[str], str | None]]:
    doc = (CORPUS / "books/austen_persuasion.txt").read_text(encoding="utf-8")[:4000]
    out = {
        "short": (["generate", SHORT, "--max-tokens", "96"], None),
        "document": (["generate", "-", "--max-tokens", "96"], doc),
    }
    if bank:
        out["bank"] = (["generate", BANK_PROMPT, "--memory", bank, "--max-tokens", "48"], None)
    return out


def run(package: Path, args: list[str], stdin: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(package))
    cmd = [sys.executable, "-m", "memtx_cli", *args, "--temperature", "0", "--json"]
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True, env=env, cwd=package)
    got = json.loads(r.stdout)
    return {"tokens": got["tokens"], "decode_tokens_per_s": got["decode_tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--package", type=Path, help="another checkout to compare against (its memtx_cli)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    packages = {"this": REPO} | ({"other": a.package.resolve()} if a.package else {})
    res: dict = {"meta": run_metadata(), "packages": {k: str(v) for k, v in packages.items()}, "rows": {}}
    for name, (args, stdin) in workloads(a.bank).items():
        runs: dict[str, list[dict]] = {k: [] for k in packages}
        for _ in range(a.repeats):  # alternating: both see the same machine state
            for k, p in packages.items():
                runs[k].append(run(p, args, stdin))
        res["rows"][name] = {
            k: {"median_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in v), "runs": v}
            for k, v in runs.items()
        }
        print(name, {k: round(v["median_tokens_per_s"], 1) for k, v in res["rows"][name].items()}, file=sys.stderr)
    emit(res, a.out)


if __name__ == "__main__":
    main()
