"""Bank codecs: FAISS scalar quantizers trained on a bank's first rows, their parameters kept
checksummed in the state; bytes, decoding exact against FAISS itself, reads through memory,
merges, and damage."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
from test_bank import make_corpus, runner, tiny_cfg

from memtx_cli.bank.codec import CODECS, TRAIN_ROWS, FaissSQ, code_size
from memtx_cli.bank.ingest import ingest, open_or_create_bank
from memtx_cli.bank.ops import merge_banks, verify_bank
from memtx_cli.bank.store import Bank
from memtx_cli.cli.app import app
from memtx_cli.errors import MemtxError


@pytest.fixture(scope="module")
def banks(tiny_lm, tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    corpus = make_corpus(root / "c", n_docs=2)
    cfg = tiny_cfg(tiny_gguf)
    for name in ("float16", "sq8", "sq4"):
        bank = open_or_create_bank(root / f"{name}.idx", tiny_lm, cfg, 0, "fifo", precision=name)
        ingest(tiny_lm, bank, sorted(corpus.glob("*.txt")), cfg)
        bank.close()
    return root, corpus


def test_code_sizes_follow_faiss():
    for name, qt in (("sq8", "QT_8bit"), ("sq6", "QT_6bit"), ("sq4", "QT_4bit")):
        assert code_size(name, 64) == faiss.ScalarQuantizer(64, getattr(faiss.ScalarQuantizer, qt)).code_size
    assert code_size("float16", 64) == 128 and code_size("int8", 64) == 66
    assert set(CODECS) == {"float16", "int8", "sq8", "sq6", "sq4"}


def test_a_quantized_bank_decodes_as_faiss_does_with_its_stored_parameters(banks):
    root, _ = banks
    with Bank.open(root / "float16.idx") as f16, Bank.open(root / "sq8.idx") as sq8, Bank.open(root / "sq4.idx") as sq4:
        layer = f16.geo.layers[0]
        n = len(f16.live_blocks) * f16.geo.block_size
        assert n < TRAIN_ROWS  # the first document was shorter: trained on all of it
        valid = np.concatenate([np.arange(b * 8, b * 8 + f16.blocks[b, 1]) for b in f16.live_blocks])
        a = np.asarray(f16.keys(layer)[valid], np.float32)
        for bank, bound in ((sq8, 0.01), (sq4, 0.15)):
            assert verify_bank(bank.path) == [] and bank.codec_params is not None
            assert bank.codec_params.shape == (len(bank.geo.layers) * 2 * bank.geo.n_kv, 2 * bank.geo.head_dim)
            b = np.asarray(bank.keys(layer)[valid], np.float32)
            rel = np.linalg.norm(a - b) / np.linalg.norm(a)
            assert rel < bound
            # exact against FAISS: a quantizer rebuilt from the stored row decodes the stored codes
            sq = faiss.ScalarQuantizer(
                bank.geo.head_dim, getattr(faiss.ScalarQuantizer, "QT_8bit" if bank is sq8 else "QT_4bit")
            )
            faiss.copy_array_to_vector(bank.codec_params[0], sq.trained)
            raw = np.asarray(bank._array(f"L{layer}.keys")[:n, 0])
            assert np.array_equal(sq.decode(raw).astype(np.float16), bank.keys(layer)[:n][:, 0])
            # gather (what memory reads use) equals decoding everything
            rows = np.array([[3, 5], [7, 1]])
            got = bank.keys(layer).gather(rows, [1, 0])
            assert np.array_equal(got[0], bank.keys(layer)[rows[0]][:, 1])
            assert np.array_equal(got[1], bank.keys(layer)[rows[1]][:, 0])
        size = {p: (root / f"{p}.idx" / f"L{layer}.keys").stat().st_size for p in ("float16", "sq8", "sq4")}
        assert size["sq8"] * 2 == size["float16"] and size["sq4"] * 4 == size["float16"]
        assert sq8.info()["dtype"] == "sq8"


def test_training_uses_the_first_rows_and_a_second_ingest_keeps_the_codec(tiny_lm, tiny_gguf, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=2)
    cfg = tiny_cfg(tiny_gguf)
    bank = open_or_create_bank(tmp_path / "b.idx", tiny_lm, cfg, 0, "fifo", precision="sq6")
    ingest(tiny_lm, bank, [corpus / "doc0.txt"], cfg)
    params = bank.codec_params.copy()
    bank.close()
    bank = open_or_create_bank(tmp_path / "b.idx", tiny_lm, cfg, 0, "fifo")
    ingest(tiny_lm, bank, [corpus / "doc1.txt"], cfg)
    bank.close()
    with Bank.open(tmp_path / "b.idx") as b:
        assert np.array_equal(b.codec_params, params) and len(b.docs) == 2
    with pytest.raises(MemtxError, match="trained once"):
        w = Bank.open(tmp_path / "b.idx", writer=True)
        try:
            w.train_codec({})
        finally:
            w.close()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    p = FaissSQ.train("sq8", x)
    codec = FaissSQ("sq8", 16, p)
    assert np.abs(codec.decode(codec.encode(x)).astype(np.float32) - x).max() < (x.max() - x.min()) / 255 + 1e-2


def test_quantized_banks_serve_score_and_merge(banks, tiny_gguf, tmp_path):
    root, corpus = banks
    r = runner.invoke(
        app,
        ["score", str(corpus / "doc0.txt"), "--memory", str(root / "sq4.idx"), "--model", str(tiny_gguf),
         "--segment", "64", "--block-size", "8", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    merge_banks([root / "sq8.idx", root / "sq8.idx"], tmp_path / "m.idx")
    with Bank.open(tmp_path / "m.idx") as m, Bank.open(root / "sq8.idx") as a:
        assert m.precision == "sq8" and np.array_equal(m.codec_params, a.codec_params)
        layer = a.geo.layers[0]
        for rec in a.docs.values():
            mine = next(d for d in m.docs.values() if d.sha256 == rec.sha256)
            for x, y in zip(rec.blocks, mine.blocks, strict=True):
                assert np.array_equal(a.keys(layer)[x * 8 : x * 8 + 8], m.keys(layer)[y * 8 : y * 8 + 8])


def test_a_damaged_codec_is_refused(banks, tmp_path):
    root, _ = banks
    copy = tmp_path / "d.idx"
    shutil.copytree(root / "sq8.idx", copy)
    (f,) = copy.glob("state/*/codec.npy")
    raw = bytearray(f.read_bytes())
    raw[-4:] = b"\0\0\0\0"
    f.write_bytes(bytes(raw))
    with pytest.raises(MemtxError, match="codec.npy is damaged"):
        Bank.open(copy)
