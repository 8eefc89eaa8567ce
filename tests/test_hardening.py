"""Defects an adversarial pass found, one test each: a bank never balloons, never writes outside
itself, keeps private text private, survives readers during commits and a full disk; untrusted
templates and kernels never run; bad input gets one line (exit 2 for bad values)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from test_bank import build, make_corpus, synthetic_bank
from typer.testing import CliRunner

from memtx_cli.bank.format import DocRecord, manifest_checksum
from memtx_cli.bank.ops import verify_bank
from memtx_cli.bank.store import Bank
from memtx_cli.cli.app import app
from memtx_cli.errors import MemtxError
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.kernels import build as kernel_build

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def small_bank(tiny_lm, tiny_gguf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    corpus = make_corpus(root / "c", n_docs=2, words=200)
    build(tiny_lm, tiny_gguf, corpus, root / "b.idx")
    return root / "b.idx"


def copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line(r, code: int, needle: str = "") -> None:
    err = r.stderr.strip().splitlines()
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(err) == 1 and err[0].startswith("memtx: error: ") and needle in err[0], r.stderr
    assert "Traceback" not in r.output


def small_writes(bank: Bank, n_docs: int, first: int = 100, rows: int = 4) -> None:
    """n documents of one block each, committed one by one (a synthetic bank: layer 0, 1 KV head)."""
    for d in range(first, first + n_docs):
        k = np.full((rows, 1, 4), d % 7, np.float16)
        (b,) = bank.allocate(1, set())
        prov = np.stack([np.full(rows, d), np.arange(rows), np.arange(rows)], 1).astype(np.int64)
        bank.write_blocks([b], {0: (k, k)}, prov)
        bank.attach_blocks(d, [b], [rows])
        bank.add_document(DocRecord(d, f"doc{d}", f"sha{d}", rows, rows, rows, rows, [b], "now"))
        bank.commit()


# ---------------------------------------------------------------------------------------------
# 1. A writer with readers present reuses what no reader can see and grows geometrically


def test_ingest_with_a_reader_present_does_not_inflate_the_bank(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=3, words=600)
    out = tmp_path / "b.idx"
    build(tiny_lm, tiny_gguf, make_corpus(tmp_path / "first", n_docs=1, words=300), out)
    reader = Bank.open(out)  # held for the whole ingest, as `score --memory` in a loop would
    try:
        rep, _ = build(tiny_lm, tiny_gguf, corpus, out)
        with Bank.open(out) as b:
            live, cap = len(b.live_blocks), b.capacity_blocks
        assert rep.tokens > 0 and cap <= 1.5 * live + 16, (live, cap)
    finally:
        reader.close()


def test_space_freed_under_a_reader_is_reused_once_it_closes(tmp_path):
    bank = synthetic_bank(tmp_path / "b.idx", capacity=0, policy="fifo")
    small_writes(bank, 8)
    reader = Bank.open(tmp_path / "b.idx")
    for d in list(bank.docs):
        bank.remove_document(d)
    bank.commit()
    small_writes(bank, 8, first=200)  # the reader may still read the first 8: new blocks
    assert bank.capacity_blocks >= 16
    reader.close()
    for d in list(bank.docs):
        bank.remove_document(d)
    bank.commit()
    cap = bank.capacity_blocks
    for i in range(5):  # now nothing holds the old blocks: every later write reuses them
        small_writes(bank, 8, first=300 + 10 * i)
        for d in list(bank.docs):
            bank.remove_document(d)
        bank.commit()
    assert bank.capacity_blocks == cap
    bank.close()


# ---------------------------------------------------------------------------------------------
# 2. Untrusted chat templates render in jinja's sandbox


def test_a_template_cannot_run_code(tmp_path):
    from memtx_cli.tasks.chat import render_chat

    marker = tmp_path / "pwned"
    evil = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    lm = SimpleNamespace(chat_template=evil, name="evil", tokenizer=SimpleNamespace(bos_id=None))
    with pytest.raises(MemtxError, match="refused"):
        render_chat(lm, [{"role": "user", "content": "hi"}])
    assert not marker.exists()
    ok = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    lm.chat_template = ok
    assert render_chat(lm, [{"role": "user", "content": "hi"}]) == "<user>hi"


# ---------------------------------------------------------------------------------------------
# 3. A bank a stranger made: links and planted files are refused, nothing outside is touched


@pytest.mark.parametrize("plant", ["state", "manifest.yaml.tmp", "L0.keys", "hardlink"])
def test_links_in_a_bank_are_refused_and_nothing_outside_is_touched(tmp_path, plant):
    path = tmp_path / "evil.idx"
    bank = synthetic_bank(path, capacity=0, policy="fifo")
    small_writes(bank, 2)
    bank.close()
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("user data\n" * 100)
    if plant == "state":
        shutil.rmtree(path / "state")
        os.symlink("..", path / "state")
    elif plant == "manifest.yaml.tmp":
        os.symlink(victim, path / "manifest.yaml.tmp")
    elif plant == "L0.keys":
        shutil.copy(path / "L0.keys", victim)
        os.unlink(path / "L0.keys")
        os.symlink(victim, path / "L0.keys")
    else:
        shutil.copy(path / "L0.keys", victim)
        os.unlink(path / "L0.keys")
        os.link(victim, path / "L0.keys")
    before = victim.read_bytes()
    r = runner.invoke(app, ["bank", "rm", str(path), "doc100"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "symlink" in r.stderr or "hard link" in r.stderr, r.stderr
    assert sibling.is_dir() and victim.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 4. Private text stays private


def test_new_banks_are_private_and_info_says_who_can_read(small_bank, tmp_path):
    assert stat.S_IMODE(os.stat(small_bank).st_mode) == 0o700
    for p in small_bank.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, (p, oct(os.lstat(p).st_mode))
        assert stat.S_IMODE(os.lstat(p).st_mode) & want == stat.S_IMODE(os.lstat(p).st_mode)
    r = runner.invoke(app, ["bank", "info", str(small_bank), "--json"])
    assert r.exit_code == 0
    import json

    info = json.loads(r.stdout)
    assert info["readable_by"].endswith("only") and info["mode"] == "0700"
    if os.geteuid() == 0 and shutil.which("setpriv"):  # another user cannot read the keys
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(small_bank / "L1.keys")]
        assert subprocess.run(cmd, capture_output=True).returncode != 0


# ---------------------------------------------------------------------------------------------
# 5. The compiled-kernel cache is code: only this user's private files are loaded


def _planted_library(path: Path, marker: Path, with_symbols: bool) -> None:
    fns = "".join(f"int {n}(void) {{ return 0; }}\n" for n in kernel_build.SIGNATURES) if with_symbols else ""
    src = path.with_suffix(".c")
    src.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
        "if (f) fclose(f); }\n" + fns
    )
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)


@pytest.fixture
def kernel_state(monkeypatch):
    monkeypatch.setattr(kernel_build, "_lib", None)
    monkeypatch.setattr(kernel_build, "_tried", False)
    monkeypatch.setattr(kernel_build, "_cpu_ok", lambda *flags: True)
    monkeypatch.delenv("MEMTX_NO_CACHE", raising=False)
    yield
    kernel_build._lib, kernel_build._tried = None, False


def _kernel_name() -> str:
    return kernel_build.library_name()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_planted_kernel_in_a_shared_cache_never_runs(tmp_path, monkeypatch, kernel_state):
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)  # a shared, world-writable cache
    marker = tmp_path / "ran"
    _planted_library(cache / "kernels" / _kernel_name(), marker, with_symbols=True)
    monkeypatch.setenv("MEMTX_CACHE_DIR", str(cache))
    attn_kernel.load()
    assert not marker.exists()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_cached_kernel_without_its_functions_falls_back_with_a_warning(tmp_path, monkeypatch, caplog, kernel_state):
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True, mode=0o700)
    os.chmod(cache / "kernels", 0o700)
    _planted_library(cache / "kernels" / _kernel_name(), tmp_path / "ran", with_symbols=False)
    os.chmod(cache / "kernels" / _kernel_name(), 0o700)
    monkeypatch.setenv("MEMTX_CACHE_DIR", str(cache))
    with caplog.at_level("WARNING"):
        assert attn_kernel.load() is None
    assert any("unusable" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# 6. Readers never see a healthy bank as damaged while a writer commits


def test_readers_during_commits_never_see_damage(tmp_path):
    path = tmp_path / "b.idx"
    bank = synthetic_bank(path, capacity=0, policy="fifo")
    small_writes(bank, 2)
    held = Bank.open(path)  # opened before the commits below: its generation must stay
    problems: list[str] = []
    stop = threading.Event()

    def verify_loop() -> None:
        while not stop.is_set():
            problems.extend(verify_bank(path))

    t = threading.Thread(target=verify_loop)
    t.start()
    try:
        small_writes(bank, 40, first=300)
    finally:
        stop.set()
        t.join()
    assert problems == []
    assert held.check(full=True) == [] and held.state_dir().is_dir()
    old = held.state_dir()
    held.close()
    small_writes(bank, 1, first=900)
    assert not old.exists()  # the last reader gone: its generation is deleted at the next commit
    bank.close()


# ---------------------------------------------------------------------------------------------
# 7. A full disk: one line, the previous state kept, and `bank rm` gives space back


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs (root only: mount)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def ingest_cmd(gguf: Path, corpus: Path, out: Path) -> list[str]:
    cfg = ["--segment", "64", "--dtype", "float32", "--block-size", "8", "--blocks", "4", "--set", "block-chunk=16"]
    return [sys.executable, "-m", "memtx_cli", "ingest", str(corpus), "--out", str(out), "--model", str(gguf), *cfg]


def test_a_full_disk_is_one_line_and_bank_rm_frees_space(tiny_gguf, tmp_path, small_fs):
    corpus = make_corpus(tmp_path / "c", n_docs=30, words=1200)
    out = small_fs / "b.idx"
    r = subprocess.run(ingest_cmd(tiny_gguf, corpus, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not 135 (SIGBUS)
    assert r.stderr.strip().splitlines()[-1].startswith("memtx: error: no space left"), r.stderr[-500:]
    assert "Traceback" not in r.stderr
    assert verify_bank(out) == []
    with Bank.open(out) as b:
        n_docs, first = len(b.docs), min(b.docs.values(), key=lambda d: d.id).path
    assert n_docs >= 1
    ballast = small_fs / "ballast"  # fill what is left, reserve included, to the last byte
    subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=64k"], capture_output=True)
    free_before = shutil.disk_usage(small_fs).free
    r = subprocess.run(
        [sys.executable, "-m", "memtx_cli", "bank", "rm", str(out), first], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert shutil.disk_usage(small_fs).free > free_before
    assert verify_bank(out) == []
    os.unlink(ballast)


# ---------------------------------------------------------------------------------------------
# 8. A walk does not follow links out of its tree


def test_ingest_skips_links_out_of_the_tree(tiny_lm, tiny_gguf, tmp_path):
    from memtx_cli.bank.corpus import select_files

    secret = tmp_path / "secret.txt"
    secret.write_text("-----BEGIN PRIVATE KEY-----\n")
    repo = make_corpus(tmp_path / "repo", n_docs=1)
    os.symlink(secret, repo / "notes.md")
    (repo / "sub").mkdir()
    os.symlink(repo / "doc0.txt", repo / "sub" / "inside.txt")  # inside the tree: fine
    sel = select_files([str(repo)])
    assert secret.resolve() not in sel.files
    assert ("notes.md", "symlink out of the tree (--follow-symlinks to ingest it)") in sel.skipped
    assert secret.resolve() in select_files([str(repo)], follow_symlinks=True).files


# ---------------------------------------------------------------------------------------------
# 9. train --out X never deletes the user's X.tmp/ or X.old/


def test_checkpoint_save_leaves_the_users_directories_alone(tmp_path):
    import torch

    from memtx_cli.tasks.checkpoint import save_checkpoint

    class Fake:
        args = None

        def state_dict(self):
            return {"w": torch.zeros(2)}

    import memtx_cli.model.weights as weights

    orig = weights.save_hf_dir
    weights.save_hf_dir = lambda path, args, w, tok: Path(path).mkdir(exist_ok=True)
    try:
        out = tmp_path / "X"
        for name in ("X.tmp", "X.old"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "mine.txt").write_text("keep me")
        for _ in range(2):  # a first save, then one that replaces it
            save_checkpoint(out, Fake(), None, {"name": "x"}, {"t": torch.zeros(1)}, {"step": 1})
    finally:
        weights.save_hf_dir = orig
    for name in ("X.tmp", "X.old"):
        assert (tmp_path / name / "mine.txt").read_text() == "keep me"
    assert (out / "train_state.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X.old", "X.tmp"]


# ---------------------------------------------------------------------------------------------
# 10. bank rm of an alias removes the alias


def test_removing_an_alias_keeps_the_document(tiny_lm, tiny_gguf, tmp_path):
    corpus = tmp_path / "c"
    make_corpus(corpus, n_docs=1)
    shutil.copy(corpus / "doc0.txt", corpus / "twin.txt")
    out = tmp_path / "b.idx"
    build(tiny_lm, tiny_gguf, corpus, out)
    with Bank.open(out) as b:
        (rec,) = b.docs.values()
        entries = b.entries
    assert rec.aliases == [str((corpus / "twin.txt").resolve())]
    r = runner.invoke(app, ["bank", "rm", str(out), str(corpus / "twin.txt")])
    assert r.exit_code == 0, r.output
    with Bank.open(out) as b:
        assert len(b.docs) == 1 and b.entries == entries and next(iter(b.docs.values())).aliases == []
    shutil.copy(corpus / "doc0.txt", corpus / "twin.txt")
    build(tiny_lm, tiny_gguf, corpus, out)  # the twin comes back as an alias
    r = runner.invoke(app, ["bank", "rm", str(out), str(corpus / "doc0.txt")])
    assert r.exit_code == 0, r.output
    with Bank.open(out) as b:  # the memories stay under the other name
        (rec,) = b.docs.values()
        assert rec.path == str((corpus / "twin.txt").resolve()) and b.entries == entries


# ---------------------------------------------------------------------------------------------
# 11. Regular files only, with a bound


def test_devices_and_fifos_are_refused_without_hanging(tmp_path):
    r = runner.invoke(app, ["score", "/dev/zero"])
    one_line(r, 1, "not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.time()
    r = runner.invoke(app, ["score", str(fifo)])
    one_line(r, 1, "not a regular file")
    from memtx_cli.bank.reader import text_if_unchanged

    assert text_if_unchanged(str(fifo), "0" * 64, 10) is None
    assert text_if_unchanged("/dev/zero", "0" * 64, 10) is None
    assert time.time() - t0 < 10


def test_documents_over_the_bound_are_refused(tmp_path, monkeypatch):
    from memtx_cli.bank import reader

    p = tmp_path / "big.txt"
    p.write_text("x" * 2000)
    with pytest.raises(MemtxError, match="up to 1,000 bytes"):
        reader.read_bytes(p, limit=1000)


# ---------------------------------------------------------------------------------------------
# 12. A kill during creation leaves nothing the rerun refuses


def test_a_kill_during_bank_creation_does_not_block_the_rerun(tmp_path):
    out = tmp_path / "b.idx"
    code = (
        "import os, signal, sys\n"
        "from memtx_cli.bank.store import Bank\nfrom memtx_cli.bank.format import Geometry\n"
        "Bank.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"Bank.create({str(out)!r}, {{'name': 's'}}, Geometry([0], 1, 4, 4), {{}}, {{'capacity': 0}})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=ENV)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(list(tmp_path.glob(".b.idx.*.memtx-new"))) == 1  # what the killed creation left
    synthetic_bank(out, capacity=0, policy="fifo").close()
    assert verify_bank(out) == []
    assert list(tmp_path.glob(".b.idx.*.memtx-new")) == []  # removed by the rerun


# ---------------------------------------------------------------------------------------------
# 13. Crafted banks: bounded time and memory, one line


def _craft(path: Path, edit) -> None:
    m = yaml.safe_load((path / "manifest.yaml").read_text())
    edit(m)
    m.pop("checksum", None)
    m["checksum"] = manifest_checksum(m)
    (path / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))


def _restamp(path: Path, name: str, data: bytes) -> None:
    """Replace a state file and record its sha256, as an attacker would."""
    import hashlib

    gen = yaml.safe_load((path / "manifest.yaml").read_text())["generation"]
    (path / "state" / f"{gen:06d}" / name).write_bytes(data)
    _craft(path, lambda m: m["state_files"].__setitem__(name, hashlib.sha256(data).hexdigest()))


CRAFTED = {
    "n_kv": lambda p: _craft(p, lambda m: m["geometry"].__setitem__("n_kv", 10_000_000)),
    "string generation": lambda p: _craft(p, lambda m: m.__setitem__("generation", "1")),
    "float generation": lambda p: _craft(p, lambda m: m.__setitem__("generation", 1.5)),
    "next_seq": lambda p: _craft(p, lambda m: m.__setitem__("next_seq", 2**63)),
    "deep docs.json": lambda p: _restamp(p, "docs.json", b"[" * 100_000 + b"]" * 100_000),
    "npy header": lambda p: _restamp(
        p, "blocks.npy", b"\x93NUMPY\x01\x00" + (60000).to_bytes(2, "little") + b"{" * 60000
    ),
    "npy shape": lambda p: _restamp(
        p,
        "blocks.npy",
        b"\x93NUMPY\x01\x00\x46\x00{'descr': '<i8', 'fortran_order': False, 'shape': (10000000000, 4), }   \n",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_banks_fail_fast_with_one_line(small_bank, tmp_path, case):
    path = copy_bank(small_bank, tmp_path / "b.idx")
    CRAFTED[case](path)
    t0 = time.time()
    for cmd in (["bank", "info", str(path)], ["bank", "rm", str(path), "0"]):
        r = runner.invoke(app, cmd)
        one_line(r, 1, "damaged")
    r = runner.invoke(app, ["bank", "verify", str(path)])
    assert r.exit_code == 1 and "damaged" in r.stdout and "Traceback" not in r.output
    assert time.time() - t0 < 10


# ---------------------------------------------------------------------------------------------
# 14. chat --remember waits for another writer, and loses nothing


def test_chat_remember_keeps_exchanges_while_another_writer_holds_the_bank(
    small_bank, tiny_gguf, tmp_path, monkeypatch
):
    import memtx_cli.cli.generate as cli

    path = copy_bank(small_bank, tmp_path / "b.idx")
    with Bank.open(path) as b:
        before = len(b.docs)
    monkeypatch.setattr(cli, "REMEMBER_WAIT", 0.2)
    monkeypatch.setattr(cli, "REMEMBER_FINAL_WAIT", 20.0)
    other = Bank.open(path, writer=True, verify=False)
    threading.Timer(3.0, other.close).start()  # the other writer finishes during the conversation
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("segment: 64\ndtype: float32\nblock-size: 8\nblocks: 4\nblock-chunk: 16\n")
    args = ["chat", "--memory", str(path), "--remember", "--model", str(tiny_gguf), "--max-tokens", "4"]
    args += ["--config", str(cfg)]
    r = runner.invoke(app, args, input="first question\nsecond question\nthird question\n")
    assert r.exit_code == 0, r.output
    with Bank.open(path) as b:
        keys = sorted(d.path for d in b.docs.values() if d.path.startswith("chat:"))
        assert len(b.docs) == before + 3 and len(keys) == 3


# ---------------------------------------------------------------------------------------------
# 15. Bad values: one line, exit 2


BAD_VALUES = [
    (["score", "sample_docs/code/lstring.c", "--segment", "1"], "attention sinks"),
    (["generate", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "hi", "--seed", "100000000000000000000"], "seed"),
    (["ingest", "sample_docs/code", "--out", "{tmp}/x.idx", "--max-tokens", "-1"], "max-tokens"),
    (["ask", "hi", "--sources", "-1"], "--sources"),
    (["ask", "hi", "--evidence", "-5"], "--evidence"),
    (["score", "sample_docs/code/lstring.c", "--config", "{tmp}/inf.yaml"], "'segment'"),
    (["score", "sample_docs/code/lstring.c", "--config", "{tmp}/model.yaml"], "unknown model '12'"),
    (["score", "sample_docs/code/lstring.c", "--config", "{tmp}/threads.yaml"], "'threads'"),
    (["bank", "merge", "{bank}", "--out", "{tmp}/file"], "already exists"),
    (["bank", "rm", "{bank}", "0", "0"], "given twice"),
]


@pytest.mark.parametrize("args,needle", BAD_VALUES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in BAD_VALUES])
def test_bad_values_are_usage_errors(small_bank, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(REPO)
    (tmp_path / "inf.yaml").write_text("segment: .inf\n")
    (tmp_path / "model.yaml").write_text("model: 12\n")
    (tmp_path / "threads.yaml").write_text("threads: 1.7\n")
    (tmp_path / "file").write_text("mine")
    bank = copy_bank(small_bank, tmp_path / "b.idx")
    r = runner.invoke(app, [a.format(tmp=tmp_path, bank=bank) for a in args])
    one_line(r, 2, needle)
    assert (tmp_path / "file").read_text() == "mine"


def test_usage_error_exit_code_is_two_in_a_real_process():
    r = subprocess.run(
        [sys.executable, "-m", "memtx_cli", "generate", "hi", "--temperature", "nan"],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_compact_moves_blocks_down_and_gives_space_back(tmp_path):
    path = tmp_path / "b.idx"
    bank = synthetic_bank(path, capacity=0, policy="fifo")
    small_writes(bank, 40)
    keep = {d: bank.keys(0)[bank.docs[d].blocks[0] * 4 : bank.docs[d].blocks[0] * 4 + 4].copy() for d in (137, 139)}
    for d in [d for d in bank.docs if d not in keep]:
        bank.remove_document(d)
    bank.commit()
    bank.close()
    with Bank.open(path) as b:
        before = b.info()["apparent_bytes"]
    r = runner.invoke(app, ["bank", "compact", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert verify_bank(path) == []
    with Bank.open(path) as b:
        assert b.capacity_blocks == 2 and b.info()["apparent_bytes"] < before
        for d, k in keep.items():
            (blk,) = b.docs[d].blocks
            np.testing.assert_array_equal(b.keys(0)[blk * 4 : blk * 4 + 4], k)
