"""A bank's budget and prior (bank-blocks, bank-bias) on held-out files of the bank's codebase.

    python benchmarks/bank_settings.py --out benchmarks/results/bank_settings.json [--bank B]

The Lua 5.4 interpreter split into its files; lstrlib.c, ltablib.c and lbaselib.c held out, the
other 57 ingested into one bank (`memtx ingest`; --bank reuses a bank built so). Settings are
swept on lstrlib.c (tune) and reported, with the defaults, on ltablib.c and lbaselib.c, which
they never saw. Everything runs through the CLI (`memtx score --json`) as subprocesses.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import emit, run_metadata  # noqa: E402
from benchmarks.bank_oracle import lua_files  # noqa: E402
from benchmarks.bank_usefulness import run  # noqa: E402

TUNE = "lstrlib.c"
HELD_OUT = ["ltablib.c", "lbaselib.c"]
SWEEP = [(bias, blocks) for bias in (0, 1, 2, 3, 4, 5) for blocks in (4, 16, 64)]


def ppl(path: Path, *flags: str) -> float:
    return run(["score", str(path), *flags])["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=Path, help="a bank of the 57 other files, built by this script before")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, body in lua_files().items():
            p = Path(tmp) / "lua" / Path(name).name
            p.parent.mkdir(exist_ok=True)
            p.write_text(body, encoding="utf-8")
            files[p.name] = p
        bank = a.bank
        if bank is None:
            bank = Path(tmp) / "siblings.idx"
            others = [str(p) for n, p in files.items() if n not in (TUNE, *HELD_OUT)]
            subprocess.run(
                [sys.executable, "-m", "memtx_cli", "ingest", *others, "--out", str(bank), "--quiet"], check=True
            )
        rows = []
        for name, split in [(TUNE, "tune"), *((h, "held-out") for h in HELD_OUT)]:
            own = ppl(files[name])
            grid = SWEEP if split == "tune" else [(2, 16), (4, 16), (5, 16)]  # defaults, and tune's best
            for bias, blocks in grid:
                got = ppl(
                    files[name], "--memory", str(bank), "--set", f"bank-bias={bias}", "--set", f"bank-blocks={blocks}"
                )
                row = {"file": name, "split": split, "bank_bias": bias, "bank_blocks": blocks}
                row |= {"ppl_own_memory": own, "ppl_with_bank": got, "gain": 1 - got / own}
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
    emit({"meta": run_metadata(), "rows": rows}, a.out)


if __name__ == "__main__":
    main()
