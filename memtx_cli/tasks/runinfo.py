"""What a benchmark's results carry about the run: command, date, commit, CPU, torch."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]  # the source tree, when memtx runs from one
CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}  # what picks the kernels


def run_info(command: list[str] | None = None) -> dict[str, Any]:
    """The run's metadata; `command` defaults to `memtx` and this process's arguments."""
    return {
        "command": " ".join(command or ["memtx", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        **cpu(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": _version("torch"),
    }


def commit() -> str:
    """The checkout's commit (+dirty when memtx_cli has uncommitted changes), or "unknown"."""
    if not (CHECKOUT / ".git").exists():
        return "unknown"
    try:
        git = ["git", "-C", str(CHECKOUT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "memtx_cli"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty.strip() else "")


def cpu() -> dict[str, Any]:
    """The CPU's model name and the instruction sets that choose memtx's kernels."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": sorted(flags & CPU_FLAGS)}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
