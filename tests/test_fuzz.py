"""1,000 mutated banks (bit flips, truncations, crafted headers and sizes re-stamped with valid
checksums, symlinks, FIFOs, directories, deletions) through `bank info`, `bank verify`,
`score --memory` and `bank rm`, in a process with an address-space limit: every case ends in a
clean result or one error line, and nothing outside the bank changes (tests/fuzz_bank.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEMORY_LIMIT = 6 << 30  # address space: torch and FAISS mapped, plus room for one bank


def test_a_thousand_mutated_banks(tiny_gguf, tmp_path):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    r = subprocess.run(
        [sys.executable, str(HERE / "fuzz_bank.py"), str(tiny_gguf), str(tmp_path), "1000", "20261206"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failures"] == [], json.dumps(out["failures"][:5], indent=1)
    assert out["cases"] == 1000 and out["refused"] > 0 and out["ok"] > 0
