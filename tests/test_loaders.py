"""Loaders: a Hugging Face directory and a GGUF written here must give the same model."""

import pytest
import torch
from helpers import logits_of, make_tiny, write_gguf

from memtx_cli.errors import MemtxError
from memtx_cli.model.loading import load_model
from memtx_cli.model.weights import load_gguf, load_hf_dir, save_hf_dir


def test_gguf_round_trip_undoes_permutation(tmp_path):
    args, state = make_tiny()
    write_gguf(tmp_path / "tiny.gguf", args, state)
    raw = load_gguf(tmp_path / "tiny.gguf")
    assert raw.args.n_kv_heads == 2 and raw.args.tie_embeddings
    ids = raw.tokenizer.encode("the 42 tests")
    assert raw.tokenizer.decode(ids) == "the 42 tests"
    torch.testing.assert_close(logits_of(raw.args, raw.state, ids), logits_of(args, state, ids))


def test_hf_dir_round_trip(tmp_path):
    args, state = make_tiny()
    write_gguf(tmp_path / "tiny.gguf", args, state)
    raw = load_gguf(tmp_path / "tiny.gguf")
    save_hf_dir(tmp_path / "hf", raw.args, raw.state, raw.tokenizer)
    hf = load_hf_dir(tmp_path / "hf")
    assert hf.tokenizer.encode("the 42 tests") == raw.tokenizer.encode("the 42 tests")
    ids = raw.tokenizer.encode("hello there")
    torch.testing.assert_close(logits_of(hf.args, hf.state, ids), logits_of(args, state, ids))


def test_real_model_as_hf_dir(tmp_path, real_lm, gpl3_text):
    """The default model exported to a HF directory and loaded back through --model PATH."""
    state = {k: v for k, v in real_lm.model.state_dict().items() if k != "inv_freq"}
    save_hf_dir(tmp_path / "smol", real_lm.args, state, real_lm.tokenizer)
    lm2 = load_model(str(tmp_path / "smol"), device="cpu", dtype="float32")
    ids = torch.tensor(real_lm.tokenizer.encode(gpl3_text)[:64])[None]
    assert lm2.tokenizer.encode(gpl3_text[:2000]) == real_lm.tokenizer.encode(gpl3_text[:2000])
    with torch.no_grad():
        torch.testing.assert_close(lm2.model(ids), real_lm.model(ids))


def test_unsupported_gguf_arch(tmp_path):
    args, state = make_tiny()
    write_gguf(tmp_path / "x.gguf", args, state, arch="gpt2")
    with pytest.raises(MemtxError, match="architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "x.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(MemtxError, match="not a readable GGUF"):
        load_gguf(p)


def test_weights_cache_keeps_few_live_entries(tmp_path, monkeypatch):
    """Each cache entry is a whole float32 model: entries whose source is gone are removed, and
    only the most recently used CACHE_ENTRIES stay (a new install must not add 0.5 GB forever)."""
    import json
    import os

    from memtx_cli.model import loading

    root = tmp_path / "cache"
    (root / "kernels").mkdir(parents=True)  # not a weights entry: left alone
    monkeypatch.setattr(loading, "CACHE_ENTRIES", 3)

    def entry(i: int, source_exists: bool = True) -> str:
        src = tmp_path / f"model{i}.gguf"
        src.write_bytes(b"x" * (i + 1))
        key = loading._cache_key(src)
        (root / key).mkdir()
        (root / key / "meta.json").write_text(json.dumps({"from": str(src)}))
        os.utime(root / key / "meta.json", (1000 + i, 1000 + i))  # entry i used at time 1000 + i
        if not source_exists:
            src.unlink()
        return key

    gone = entry(0, source_exists=False)
    keys = [entry(i) for i in range(1, 6)]
    victim = tmp_path / "outside"
    victim.mkdir()
    (root / ("f" * 24)).symlink_to(victim)  # a planted link named like a key: never followed
    loading._prune_cache(root, keep="new")
    left = {p.name for p in root.iterdir()}
    assert gone not in left
    assert left == {"kernels", "f" * 24, keys[4], keys[3]}  # `keep` counts as one of the 3
    assert victim.is_dir()
