"""Bank fuzzing: mutated copies of a real (tiny-model) bank through `bank info`, `bank verify`,
`score --memory` and `bank rm`. Run by test_fuzz.py in a process with a memory limit.

    python tests/fuzz_bank.py MODEL.gguf WORKDIR CASES SEED  ->  one JSON line on stdout

Every case must end in a clean result: exit 0, or exit 1 with one `memtx: error:` line (verify:
its problems on stdout); never a traceback. Nothing outside the bank may change: a sentinel
directory beside it (the target of planted links) is hashed after every case.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import typer.testing as typer_testing  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import memtx_cli.model.loading as runtime  # noqa: E402
from memtx_cli.bank.format import manifest_checksum  # noqa: E402
from memtx_cli.cli.app import app  # noqa: E402

CFG = ["--segment", "64", "--dtype", "float32", "--block-size", "8", "--blocks", "4", "--set", "block-chunk=16"]


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        h.update(f"{p.relative_to(d)}:{st.st_mode}:{st.st_size}".encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def restamp(bank: Path, name: str | None) -> None:
    """Record a state file's new sha256 (if any) and re-checksum the manifest: a crafted bank."""
    m = yaml.safe_load((bank / "manifest.yaml").read_text())
    if not isinstance(m, dict):
        return
    try:
        if name is not None:
            gen = m["generation"]
            data = (bank / "state" / f"{gen:06d}" / name).read_bytes()
            m["state_files"][name] = hashlib.sha256(data).hexdigest()
        m.pop("checksum", None)
        m["checksum"] = manifest_checksum(m)
    except (KeyError, TypeError, ValueError, OSError):
        return
    (bank / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))


WEIRD = [None, -1, 0, 1, 2**31, 2**63, 2**70, 1.5, float("inf"), "1", "", [], {}, True, [1] * 5, {"a": 1}]


def mutate(bank: Path, rng: random.Random, sentinel: Path) -> str:
    files = sorted(p for p in bank.rglob("*") if p.is_file() and p.name not in ("lock", "readers", "reserve"))
    target = rng.choice(files)
    rel = target.relative_to(bank).as_posix()
    state_name = target.name if target.parent.parent.name == "state" else None
    op = rng.choice(["flip", "flip", "truncate", "extend", "craft", "craft", "link", "special", "delete", "zero"])
    data = bytearray(target.read_bytes())
    if op == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif op == "truncate":
        target.write_bytes(bytes(data[: rng.randrange(len(data) + 1)]))
    elif op == "extend":
        target.write_bytes(bytes(data) + rng.randbytes(rng.choice([1, 7, 4096, 100_000])))
    elif op == "zero" and data:
        a = rng.randrange(len(data))
        data[a : a + rng.randint(1, 4096)] = b"\0" * len(data[a : a + rng.randint(1, 4096)])
        target.write_bytes(bytes(data))
    elif op == "craft":
        if target.name == "manifest.yaml":
            m = yaml.safe_load(target.read_text())
            keys = ["generation", "entries", "documents", "next_doc_id", "next_seq", "clock", "dtype", "version"]
            geo = ["layers", "n_kv", "head_dim", "block_size"]
            if rng.random() < 0.5:
                m[rng.choice(keys)] = rng.choice(WEIRD)
            else:
                m["geometry"][rng.choice(geo)] = rng.choice(WEIRD + [10_000_000, [0] * 2000])
            target.write_text(yaml.safe_dump(m, sort_keys=False))
            restamp(bank, None)
            return f"craft-manifest {rel}"
        if data:  # a state or data file, changed and re-stamped as an attacker would
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if target.suffix == ".npy" and rng.random() < 0.5:
                data = bytearray(b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little"))
                shape = rng.choice(["(10000000000, 4)", "(-1, 4)", "(3,)", "(2, 4)", "()", "(1, 1, 1)"])
                descr = rng.choice(["<i8", "<u4", "|O", "<f8"])
                header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
                data += header.encode().ljust(118)
                data += rng.randbytes(rng.choice([0, 64, 256]))
            if target.name == "docs.json" and rng.random() < 0.5:
                data = bytearray(rng.choice([b"[" * 50_000, b'[{"id": 0, "path": 1, "blocks": [99999999]}]', b"{}"]))
            target.write_bytes(bytes(data))
        restamp(bank, state_name)
    elif op == "link":
        target.unlink()
        os.symlink(rng.choice([sentinel / "victim.txt", sentinel, Path("..")]), target)
    elif op == "special":
        target.unlink()
        if rng.random() < 0.5:
            os.mkfifo(target)
        else:
            target.mkdir()
    elif op == "delete":
        target.unlink()
    return f"{op} {rel}"


def main() -> None:
    model, work, cases, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    runtime.load_model = functools.lru_cache(maxsize=2)(runtime.load_model)  # load once per process
    # typer builds its click command on every CliRunner.invoke (~0.1 s here): build it once
    typer_testing._get_command = functools.lru_cache(maxsize=2)(typer_testing._get_command)
    runner = CliRunner()
    doc = work / "doc.txt"
    words = "the of and to in memory bank token layer key value block index query".split()
    rng = random.Random(seed)
    doc.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(20)) + "\n")
    short = work / "short.txt"  # what score reads with the bank as memory: a few dozen tokens
    short.write_text("the memory bank token layer key value block\n")
    base = work / "base.idx"
    r = runner.invoke(app, ["ingest", str(doc), "--out", str(base), "--model", str(model), *CFG, "-q"])
    assert r.exit_code == 0, r.output
    sentinel = work / "sentinel"
    sentinel.mkdir()
    (sentinel / "victim.txt").write_text("user data that must never change\n" * 50)
    (sentinel / "folder").mkdir()
    before = tree_hash(sentinel)
    commands = [
        ["bank", "info", "{b}"],
        ["bank", "verify", "{b}"],
        ["score", str(short), "--memory", "{b}", "--model", str(model), *CFG, "--json"],
        ["bank", "rm", "{b}", str(doc.resolve())],
    ]
    failures, outcomes, t0 = [], {"ok": 0, "refused": 0}, time.time()
    for i in range(cases):
        bank = work / f"case{i % 4}.idx"
        if bank.exists() or bank.is_symlink():
            shutil.rmtree(bank)
        shutil.copytree(base, bank, symlinks=True)
        what = mutate(bank, rng, sentinel)
        for cmd in commands:
            res = runner.invoke(app, [c.format(b=bank) for c in cmd])
            text = res.output
            lines = res.stderr.strip().splitlines()
            clean = res.exit_code == 0 or (
                res.exit_code == 1
                and (cmd[1] == "verify" or (len(lines) == 1 and lines[0].startswith("memtx: error:")))
            )
            if not clean or "Traceback" in text or (res.exception and not isinstance(res.exception, SystemExit)):
                failures.append(
                    {"case": i, "mutation": what, "cmd": cmd[:2], "exit": res.exit_code, "out": text[-600:]}
                )
            outcomes["ok" if res.exit_code == 0 else "refused"] += 1
        if tree_hash(sentinel) != before:
            failures.append({"case": i, "mutation": what, "cmd": "outside the bank", "exit": None, "out": "changed"})
            break
    print(json.dumps({"cases": cases, "seconds": time.time() - t0, "failures": failures[:20], **outcomes}))


if __name__ == "__main__":
    main()
