"""Metadata every results file carries: command, date, commit, CPU."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"  # the long documents benchmarks read (beside the checkout)


def run_metadata() -> dict:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "memtx_cli"], capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "unknown", False
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu": cpu,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "torch": _version("torch"),
    }


def emit(res: dict, out: Path | None, accumulate: bool = False) -> None:
    """Print a results object and write it to `out` (if given). accumulate: the runs already
    in `out` are kept, the new one appended (each carries its own metadata)."""
    import json

    if accumulate and out is not None and out.exists():
        old = json.loads(out.read_text())
        res = {"runs": old.get("runs", [old]) + [res]}
    text = json.dumps(res, indent=1)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
