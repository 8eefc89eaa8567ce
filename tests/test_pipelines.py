"""Every command as a real subprocess in a shell pipeline: stdin, --json / JSON lines parsed, a
closed pipe, missing or mismatched banks, Ctrl-C, and the documented exit codes (0 ok, 1 user
error, 2 usage, 130 interrupted). The tiny random-weight GGUF keeps it fast."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from helpers import ENV, MEMTX, make_tiny, memtx, signal_after_documents, write_gguf
from test_bank import build, make_corpus

from memtx_cli.bank.ops import verify_bank
from memtx_cli.bank.store import Bank
from memtx_cli.model.loading import load_model


@pytest.fixture(scope="module")
def world(tiny_gguf, tmp_path_factory):
    """A tiny model, a config for it, a bank built with it, a document, and another model."""
    root = tmp_path_factory.mktemp("pipes")
    lm = load_model(str(tiny_gguf), device="cpu", dtype="float32")
    corpus = make_corpus(root / "corpus", n_docs=2, words=300)
    bank = root / "bank.idx"
    build(lm, tiny_gguf, corpus, bank)
    cfg = root / "cfg.yaml"
    cfg.write_text(f"model: {tiny_gguf}\nsegment: 64\nblock-size: 8\nblocks: 4\nblock-chunk: 16\n")
    args, state = make_tiny()
    other = root / "other.gguf"
    write_gguf(other, args, {k: v * 1.01 for k, v in state.items()})
    doc = (corpus / "doc1.txt").read_text()
    return {"cfg": str(cfg), "bank": str(bank), "other": str(other), "doc": doc, "root": root, "corpus": corpus}


def one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.startswith("memtx: error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


READERS = [
    ("score", ["score", "-"]),
    ("generate", ["generate", "-", "--max-tokens", "4"]),
    ("ask", ["ask", "-", "--max-tokens", "4"]),
]


@pytest.mark.parametrize("name,argv", READERS, ids=[r[0] for r in READERS])
def test_stdin_json_and_bank_errors(world, name, argv):
    r = memtx(*argv, "--config", world["cfg"], "--memory", world["bank"], "--json", stdin=world["doc"][:400])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert r.stderr == ""  # not a terminal: no progress, no log lines
    if name == "score":
        assert out["tokens"] > 1 and out["bank"]["documents"] == 2
    else:
        assert out["tokens"] >= 1
    # a missing bank; a bank of another model: one line, exit 1, before or after the model loads
    r = memtx(*argv, "--config", world["cfg"], "--memory", str(world["root"] / "nope.idx"), stdin="x y z")
    one_line_error(r)
    assert "no such bank" in r.stderr
    r = memtx(*argv, "--config", world["cfg"], "--model", world["other"], "--memory", world["bank"], stdin="x y z")
    one_line_error(r)
    assert "model" in r.stderr


def test_closed_pipes_end_quietly(world):
    for argv in (
        ["score", "-", "--curve", "--json", "--segment", "8"],
        ["generate", "-", "--max-tokens", "200", "--temperature", "0"],
        ["ask", "-", "--memory", world["bank"], "--max-tokens", "200", "--temperature", "0"],
    ):
        p = subprocess.Popen(
            [*MEMTX, *argv, "--config", world["cfg"]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        p.stdin.write(world["doc"][:600].encode())
        p.stdin.close()
        p.stdout.read(3)  # like `| head -c 3`
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait() == 0, (argv, err)
        assert "Traceback" not in err and "BrokenPipe" not in err


def test_json_of_management_commands(world, tmp_path):
    r = memtx("bank", "info", world["bank"], "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["documents"] == 2 and info["entries"] > 0
    r = memtx("bank", "verify", world["bank"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = memtx("models", "--json")
    assert r.returncode == 0 and any(m["name"] == "smollm2-135m" for m in json.loads(r.stdout))
    # ingest: paths from stdin, JSON report
    listing = str(world["corpus"] / "doc0.txt") + "\n"
    out = tmp_path / "b.idx"
    r = memtx("ingest", "-", "--out", str(out), "--config", world["cfg"], "--json", stdin=listing)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] == 1


def test_usage_errors_exit_2_and_user_errors_exit_1(world):
    assert memtx("score").returncode == 2  # missing argument
    assert memtx("generate", "hi", "--max-tokens", "many").returncode == 2  # not an int
    assert memtx("no-such-command").returncode == 2
    one_line_error(memtx("score", "/no/such/file"))
    one_line_error(memtx("bench", "passkey", "--lengths", "4q", "--config", world["cfg"]))
    one_line_error(memtx("ask", "   ", "--config", world["cfg"]))


def test_ctrl_c_during_ingest_exits_130_and_leaves_the_bank_intact(world, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=8, words=2400)
    out = tmp_path / "int.idx"
    cmd = [*MEMTX, "ingest", str(corpus), "--out", str(out), "--config", world["cfg"]]
    # A job started in the background of a non-interactive shell inherits SIGINT ignored (and
    # Python then installs no KeyboardInterrupt handler): give the child the default back.
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )
    sent = signal_after_documents(p, out, 1, signal.SIGINT)
    _, err = p.communicate()
    assert sent, "ingest finished before Ctrl-C"
    assert p.returncode == 130 and "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert verify_bank(out) == []
    r = subprocess.run(cmd, capture_output=True, env=ENV)  # and it resumes
    assert r.returncode == 0
    with Bank.open(out) as b:
        assert len(b.docs) == 8
