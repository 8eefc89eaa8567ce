"""A bank's manifest and state files, parsed as untrusted input.

Everything is validated before anything is allocated from it: the manifest's types and ranges,
each .npy header against its file's size, docs.json's records against the block table, a FAISS
index's size against the number of blocks it must hold. A crafted or damaged bank fails with
one MemtxError line, in bounded time and memory.
"""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.bank.fs import read_file
from memtx_cli.errors import MemtxError

FORMAT = "memtx-bank"
VERSION = 1
MANIFEST_LIMIT = 4 << 20
DOCS_LIMIT = 1 << 30
MAX_COUNT = 1 << 52  # counters (generation, entries, sequence numbers) stay exact in JSON and int64
NPY_HEADER_LIMIT = 4096
INDEX_OVERHEAD = 90  # bytes of an empty IndexIDMap2(IndexFlatIP) as FAISS serialises it


@dataclass
class DocRecord:
    id: int
    path: str
    sha256: str
    size: int
    tokens: int
    chars: int
    entries: int
    blocks: list[int]
    ingested_at: str
    aliases: list[str] = field(default_factory=list)  # identical documents at other paths


class BlockCounts:
    """What a block table (`self.blocks`: owner, fill, ... per block) says."""

    blocks: np.ndarray

    @property
    def live_blocks(self) -> np.ndarray:
        return np.nonzero(self.blocks[:, B_DOC] >= 0)[0]

    @property
    def entries(self) -> int:
        return int(self.blocks[self.blocks[:, B_DOC] >= 0, B_VALID].sum())


@dataclass
class Geometry:
    """What a bank's arrays look like; fixed when the bank is created."""

    layers: list[int]
    n_kv: int  # the model's KV heads per layer
    head_dim: int
    block_size: int
    # The KV heads stored, per layer of `layers` (ascending); None: every KV head of them.
    heads: list[list[int]] | None = None

    def stored(self, layer: int) -> list[int]:
        """The KV heads layer `layer` stores, in the order of its arrays' rows."""
        return list(range(self.n_kv)) if self.heads is None else self.heads[self.layers.index(layer)]

    def pairs(self) -> list[tuple[int, int]]:
        """Every stored (layer, KV head)."""
        return [(ly, h) for ly in self.layers for h in self.stored(ly)]


def _int(v: Any, lo: int = 0, hi: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def validate_manifest(m: Any, where: Path) -> Geometry:
    """The manifest's geometry, after checking every field a bank reads (types and ranges)."""

    def bad(what: str) -> MemtxError:
        return MemtxError(f"bank {where}: manifest.yaml is damaged ({what})")

    g = m.get("geometry")
    if not isinstance(g, dict):
        raise bad("geometry")
    layers, n_kv, hd, bs = g.get("layers"), g.get("n_kv"), g.get("head_dim"), g.get("block_size")
    if not isinstance(layers, list) or not 1 <= len(layers) <= 1024 or not all(_int(x, 0, 4095) for x in layers):
        raise bad("geometry: layers")
    if len(set(layers)) != len(layers):
        raise bad("geometry: repeated layers")
    if not _int(n_kv, 1, 1024) or not _int(hd, 1, 4096) or not _int(bs, 1, 1 << 16):
        raise bad("geometry: heads, head size or block size out of range")
    if len(layers) * n_kv > 1 << 16:
        raise bad("geometry: too many memory heads")
    heads = g.get("heads")
    if heads is not None and (
        not isinstance(heads, list)
        or len(heads) != len(layers)
        or not all(isinstance(h, list) and h and all(_int(x, 0, n_kv - 1) for x in h) for h in heads)
        or any(h != sorted(set(h)) for h in heads)
    ):
        raise bad("geometry: heads")
    for key in ("generation", "entries", "documents", "next_doc_id", "next_seq", "clock"):
        if not _int(m.get(key)):
            raise bad(f"{key} is not a count")
    from memtx_cli.bank.codec import CODECS

    if m.get("dtype", "float16") not in CODECS:
        raise bad(f"dtype {m.get('dtype')!r}")
    if m.get("words", False) not in (True, False):
        raise bad("words")
    sf = m.get("state_files")
    if not isinstance(sf, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sf.items()):
        raise bad("state_files")
    if not isinstance(m.get("model"), dict) or not isinstance(m.get("config"), dict):
        raise bad("model or config")
    ev = m.get("eviction") or {}
    if not isinstance(ev, dict) or not _int(ev.get("capacity") or 0) or not _int(ev.get("seed") or 0, 0, 1 << 63):
        raise bad("eviction")
    return Geometry(list(layers), n_kv, hd, bs, None if heads is None else [list(h) for h in heads])


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def parse_npy(data: bytes, name: str, where: Path, dtype: Any, cols: int) -> np.ndarray:
    """A 2-D array (rows, cols) of `dtype` from .npy bytes, its header checked against the size."""

    def bad(what: str) -> MemtxError:
        return MemtxError(f"bank {where}: {name} is damaged ({what})")

    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise bad("not a .npy file")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise bad("unknown .npy version")
    if hlen > NPY_HEADER_LIMIT or start + hlen > len(data):
        raise bad("header")
    try:
        header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise bad("header") from None
    if not isinstance(header, dict) or header.get("fortran_order") is not False:
        raise bad("header")
    shape = header.get("shape")
    try:
        dt = np.dtype(header.get("descr"))
    except (TypeError, ValueError):
        raise bad("dtype") from None
    if dt != np.dtype(dtype) or not isinstance(shape, tuple) or len(shape) != 2 or shape[1] != cols:
        raise bad(f"shape {shape} or dtype {dt}")
    if not _int(shape[0], 0, MAX_COUNT) or start + hlen + shape[0] * cols * dt.itemsize != len(data):
        raise bad("size does not match its header")
    return np.frombuffer(data, dtype=dt, count=shape[0] * cols, offset=start + hlen).reshape(shape).copy()


def docs_bytes(docs: list[DocRecord]) -> bytes:

    return json.dumps([asdict(d) for d in docs], indent=0).encode("utf-8")


_DOC_TYPES = {f.name: f.type for f in fields(DocRecord)}


def parse_docs(data: bytes, where: Path, capacity: int) -> dict[int, DocRecord]:
    def bad(what: str) -> MemtxError:
        return MemtxError(f"bank {where}: state docs.json is damaged ({what})")

    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(raw, list):
        raise bad("not a list of documents")
    out: dict[int, DocRecord] = {}
    for d in raw:
        if not isinstance(d, dict) or set(d) - set(_DOC_TYPES) or not {"id", "path", "blocks"} <= set(d):
            raise bad("a record has unknown or missing fields")
        for k in ("id", "size", "tokens", "chars", "entries"):
            if not _int(d.get(k, 0)):
                raise bad(f"{k} is not a count")
        for k in ("path", "sha256", "ingested_at"):
            if not isinstance(d.get(k, ""), str):
                raise bad(f"{k} is not text")
        blocks, aliases = d.get("blocks"), d.get("aliases", [])
        if not isinstance(blocks, list) or not all(_int(b, 0, capacity - 1) for b in blocks):
            raise bad("block ids out of range")
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise bad("aliases")
        if d["id"] in out:
            raise bad(f"document id {d['id']} twice")
        rec = DocRecord(**{"sha256": "", "size": 0, "tokens": 0, "chars": 0, "entries": 0, "ingested_at": "", **d})
        out[rec.id] = rec
    return out


def parse_index(data: bytes, name: str, where: Path, d: int, n: int) -> Any:
    """An IndexIDMap2(IndexFlatIP(d)) holding n vectors, from bytes whose size is checked first."""
    import faiss

    if len(data) != INDEX_OVERHEAD + n * (4 * d + 8) or not data.startswith(b"IxM2"):
        raise MemtxError(f"bank {where}: {name} is damaged (size or type)")
    try:
        idx = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except (RuntimeError, MemoryError):
        raise MemtxError(f"bank {where}: {name} is damaged") from None
    if not isinstance(idx, faiss.IndexIDMap2) or idx.d != d or idx.ntotal != n:
        raise MemtxError(f"bank {where}: {name} is damaged (geometry)")
    if not isinstance(faiss.downcast_index(idx.index), faiss.IndexFlatIP):
        raise MemtxError(f"bank {where}: {name} is damaged (index type)")
    return idx


def index_bytes(idx: Any) -> bytes:
    import faiss

    return faiss.serialize_index(idx).tobytes()


EVICTION = ("fifo", "lru", "reservoir")
# Block table columns.
B_DOC, B_VALID, B_SEQ, B_USED = range(4)
FREE_ROW = (-1, 0, 0, -1)  # a block never used: freed "at generation 0", safe for everyone
RESERVE_SLACK = 1 << 20


def _faiss():
    import faiss

    return faiss


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked: format, checksum, version, every field's type and range."""
    return _parse_manifest(path, _manifest_bytes(path))


def _manifest_bytes(path: Path) -> bytes:
    mpath = path / "manifest.yaml"
    try:
        raw = read_file(mpath, MANIFEST_LIMIT)
    except FileNotFoundError:
        raise MemtxError(f"{path} is not a memtx bank (no manifest.yaml)") from None
    except OSError as e:
        raise MemtxError(f"bank {path}: cannot read manifest.yaml ({e.strerror})") from None
    except MemtxError as e:
        raise MemtxError(f"bank {path}: manifest.yaml is damaged ({e})") from None
    return raw


def _parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    import yaml

    try:  # libyaml's parser when present: 20x faster than the pure-Python one, same safe subset
        manifest = yaml.load(raw.decode("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise MemtxError(f"bank {path}: manifest.yaml is damaged ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemtxError(f"bank {path}: manifest.yaml is damaged or not a memtx bank manifest")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise MemtxError(f"bank {path}: manifest.yaml is damaged (checksum mismatch)")
    if manifest.get("version") != VERSION:
        raise MemtxError(f"bank {path}: format version {manifest.get('version')} is not supported (want {VERSION})")
    validate_manifest(manifest, path)
    return manifest


def state_file_limit(name: str, d: int, n_live: int) -> int:
    """The largest a state file may be for a bank with room for `n_live` blocks."""
    if name.endswith(".faiss"):
        return 90 + n_live * (4 * d + 8)
    return 1 << 30  # docs.json: paths of every document


def manifest_checksum(m: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own checksum (canonical JSON)."""
    import json

    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def check_model(bank: Any, model: dict[str, Any]) -> None:
    """Refuse a bank built by another model (weights or tokenizer)."""
    mine = bank.manifest["model"]
    for key, what in (("weights_fingerprint", "weights"), ("tokenizer_fingerprint", "tokenizer")):
        if mine.get(key) != model.get(key):
            raise MemtxError(
                f"bank {bank.path} was built with model {mine.get('name')!r} ({what} fingerprint "
                f"{str(mine.get(key))[:12]}), not {model.get('name')!r} ({str(model.get(key))[:12]}); "
                f"use --model {mine.get('name')} or rebuild the bank"
            )
