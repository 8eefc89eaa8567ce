"""How a bank stores keys and values: float16, the legacy absmax int8, or a FAISS scalar
quantizer trained on the bank's first document.

FAISS's `ScalarQuantizer` (8, 6 or 4 bits per dimension, non-uniform: each dimension's own
range) is trained once per (memory layer, keys or values, KV head) on the first
TRAIN_ROWS tokens a bank receives. Its parameters (each dimension's minimum and range, 2 x D
float32) are kept in `codec.npy`, whose sha256 the manifest records; a reader rebuilds the
quantizers from those numbers and never deserialises FAISS objects from disk."""

from __future__ import annotations

from typing import Any

import numpy as np

from memtx_cli.errors import MemtxError

TRAIN_ROWS = 4096  # tokens a scalar quantizer is trained on (per layer, keys or values, KV head)
SQ_TYPES = {"sq8": "QT_8bit", "sq6": "QT_6bit", "sq4": "QT_4bit"}
CODECS = ("float16", "int8", *SQ_TYPES)


class Codec:
    """One head's encoder and decoder: (n, D) float arrays <-> (n, code_size) stored rows."""

    dtype: Any = np.uint8

    def code_size(self, d: int) -> int:
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Float16(Codec):
    dtype = np.float16

    def code_size(self, d: int) -> int:
        return d

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes


class AbsmaxInt8(Codec):
    """int8 rows with their float16 absmax scale in the last two bytes (banks made with
    `--precision int8` before the FAISS quantizers)."""

    def code_size(self, d: int) -> int:
        return d + 2

    def encode(self, x: np.ndarray) -> np.ndarray:
        xf = x.astype(np.float32)
        scale = (np.abs(xf).max(-1, keepdims=True) / 127.0).astype(np.float16)  # (..., 1)
        safe = np.where(scale == 0, 1, scale.astype(np.float32))
        q = np.clip(np.rint(xf / safe), -127, 127).astype(np.int8)
        return np.concatenate([q.view(np.uint8), scale.view(np.uint8)], -1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        d = codes.shape[-1] - 2
        q = codes[..., :d].view(np.int8).astype(np.float32)
        scale = np.ascontiguousarray(codes[..., d:]).view(np.float16).astype(np.float32)
        return (q * scale).astype(np.float16)


class FaissSQ(Codec):
    """A trained `faiss.ScalarQuantizer`, rebuilt from its parameters (2 x D float32)."""

    def __init__(self, name: str, d: int, params: np.ndarray) -> None:
        import faiss

        self.sq = faiss.ScalarQuantizer(d, getattr(faiss.ScalarQuantizer, SQ_TYPES[name]))
        faiss.copy_array_to_vector(np.ascontiguousarray(params, dtype=np.float32), self.sq.trained)

    def code_size(self, d: int) -> int:
        return int(self.sq.code_size)

    def encode(self, x: np.ndarray) -> np.ndarray:
        shape = x.shape
        flat = np.ascontiguousarray(x.reshape(-1, shape[-1]), dtype=np.float32)
        return self.sq.compute_codes(flat).reshape(*shape[:-1], -1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        shape = codes.shape
        flat = np.ascontiguousarray(codes.reshape(-1, shape[-1]))
        return self.sq.decode(flat).reshape(*shape[:-1], -1).astype(np.float16)

    @staticmethod
    def train(name: str, x: np.ndarray) -> np.ndarray:
        """The parameters (2 x D float32: per-dimension minimum, then range) for rows `x`."""
        import faiss

        sq = faiss.ScalarQuantizer(x.shape[-1], getattr(faiss.ScalarQuantizer, SQ_TYPES[name]))
        sq.train(np.ascontiguousarray(x, dtype=np.float32))
        return faiss.vector_to_array(sq.trained).astype(np.float32)


def code_size(name: str, d: int) -> int:
    """Bytes one head's key (or value) takes in codec `name`."""
    if name not in CODECS:
        raise MemtxError(f"unknown codec {name!r} (one of {', '.join(CODECS)})")
    if name == "float16":
        return 2 * d
    if name == "int8":
        return d + 2
    return {"sq8": d, "sq6": (6 * d + 7) // 8, "sq4": (d + 1) // 2}[name]


def make_codecs(name: str, d: int, params: np.ndarray | None, rows: int) -> list[Codec]:
    """`rows` codecs (one per layer x keys/values x KV head, in that order) for codec `name`;
    trained codecs take their row of `params`."""
    if name == "float16":
        return [Float16()] * rows
    if name == "int8":
        return [AbsmaxInt8()] * rows
    if params is None:
        raise MemtxError(f"codec {name} has no trained parameters")
    return [FaissSQ(name, d, params[i]) for i in range(rows)]


def trained(name: str) -> bool:
    return name in SQ_TYPES


class Stored:
    """A keys/values file seen as (slots, KV, D) float16 whatever its codec: indexing by rows
    decodes every head, `gather` decodes the rows each head reads."""

    def __init__(self, mm: np.ndarray, codecs: list[Codec], d: int, heads: list[int] | None = None) -> None:
        self.mm, self.codecs, self.d = mm, codecs, d
        self.plain = all(isinstance(c, Float16) for c in codecs)
        # the model's KV head each row slot holds (a bank may store some of a layer's heads)
        self.slot = {h: i for i, h in enumerate(range(len(codecs)) if heads is None else heads)}

    def __getitem__(self, idx: Any) -> np.ndarray:
        raw = self.mm[idx]
        if self.plain:
            return raw
        return np.stack([c.decode(raw[..., h, :]) for h, c in enumerate(self.codecs)], -2)

    def gather(self, rows: np.ndarray, heads: np.ndarray) -> np.ndarray:
        """(H, ...) entries: rows[i] of (stored) KV head heads[i], decoded -> (H, ..., D) float16."""
        slots = [self.slot[int(h)] for h in heads]
        shape = (len(slots),) + (1,) * (rows.ndim - 1)
        if self.plain:
            return self.mm[rows, np.asarray(slots).reshape(shape)]
        return np.stack([self.codecs[s].decode(self.mm[rows[i], s]) for i, s in enumerate(slots)])

    @staticmethod
    def encode(x: np.ndarray, codecs: list[Codec]) -> np.ndarray:
        """(n, KV, D) float -> (n, KV, code_size) stored rows, each head with its codec."""
        return np.stack([c.encode(x[:, h]) for h, c in enumerate(codecs)], 1)
