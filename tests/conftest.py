"""Shared fixtures: a tiny random-weight model for exactness tests, the real default model for numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memtx_cli.model.llama import ModelArgs
from memtx_cli.model.loading import build_model

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLE = REPO / "sample_docs"


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=256, rope_theta=10000.0
    )
    base.update(kw)
    return ModelArgs(**base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    m = build_model(tiny_args()).eval()
    # Random init from nn.Linear is small; scale up so attention patterns are not uniform.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m


@pytest.fixture(scope="session")
def real_lm():
    """The embedded default model in float32 (make test installs it; its absence is a failure)."""
    from memtx_cli.model.loading import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gpl3_text() -> str:
    p = SHARED / "corpus/legal/GPL-3.txt"
    if not p.is_file():
        p = SAMPLE / "legal/GPL-3.txt"
    return p.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """The tiny random-weight model written as a real GGUF file (with a byte-level tokenizer)."""
    from helpers import make_tiny, write_gguf

    args, state = make_tiny()
    p = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_gguf(p, args, state)
    return p


def _cache_typer_command() -> None:
    """typer rebuilds its click command on every CliRunner.invoke (~0.1 s for this app); the
    command is the same each time, so tests build it once."""
    import functools

    import typer.testing

    typer.testing._get_command = functools.lru_cache(maxsize=4)(typer.testing._get_command)


_cache_typer_command()


@pytest.fixture(scope="module")
def tiny_lm(tiny_gguf):
    """The tiny model loaded in float32 (one per test module, as its GGUF is)."""
    from memtx_cli.model.loading import load_model

    return load_model(str(tiny_gguf), device="cpu", dtype="float32")
