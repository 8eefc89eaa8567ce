"""Memory banks on disk: attention memories of a corpus, reusable, verifiable, never corrupted.

A bank is a directory (the user names it, e.g. `repo.idx`), private to its owner (0700/0600):

    manifest.yaml            format, model + tokenizer fingerprints, geometry, merged config,
                             counts, and the current state generation with its files' sha256
    state/<gen>/docs.json    document table: path(s), sha256, size, tokens, chars, blocks, time
    state/<gen>/blocks.npy   (capacity, 4) int64 per block: doc id (-1 free), valid entries,
                             insertion sequence (a free block: the generation that freed it),
                             last use (LRU clock)
    state/<gen>/crc.npy      (capacity, files) uint32: crc32 of every block in every data file
    state/<gen>/L<l>_H<h>.faiss  per (memory layer, KV head): IDMap2 inner-product index of the
                             block representatives (mean key), ids = block ids
    state/<gen>/readers      flock'd (shared) by every reader of that generation
    L<l>.keys, L<l>.values   (slots, KV, D) raw keys (no RoPE) and values, memory-mapped:
                             float16, or int8 rows with a float16 absmax scale (D + 2 bytes)
    provenance.bin           (slots, 3) int64: document id, token offset, character offset
    lock                     flock'd by the one writer
    reserve                  space held back so that a commit (e.g. `bank rm`) can still be
                             written on a full disk

Entries live in blocks of `block_size` consecutive tokens of one document (the unit of block
retrieval, eviction and provenance); entry id = block id * block_size + offset, and ids never
move, so keys, values and provenance stay aligned through eviction, removal and merges.

Durability: data of new blocks is written only into blocks no committed state a reader may hold
uses (banklock.py), with its disk space reserved first, and fsync'd; then a complete new state
directory is written and fsync'd, and the manifest (which names it) is replaced atomically. A
reader or a crash sees the old state or the new one, never a mix; uncommitted blocks are
garbage nobody references. Ingest commits after every document, so a killed ingest loses at
most the document it was reading. Files are handled as untrusted (bankfs.py, bankstate.py).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank import lock as banklock
from memtx_cli.bank.format import (
    FORMAT,
    MANIFEST_LIMIT,
    PRECISIONS,
    VERSION,
    DocRecord,
    Geometry,
    docs_bytes,
    index_bytes,
    npy_bytes,
    parse_docs,
    parse_index,
    parse_npy,
    validate_manifest,
)
from memtx_cli.errors import MemtxError

__all__ = ["Bank", "DocRecord", "Geometry", "PRECISIONS", "Stored", "check_model", "now", "sha256_file"]

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


class Stored:
    """A keys/values file seen as (slots, KV, D) float16 whatever its precision: indexing
    decodes (int8 rows carry their float16 absmax scale in their last two bytes)."""

    def __init__(self, mm: np.memmap, precision: str, d: int) -> None:
        self.mm, self.precision, self.d = mm, precision, d

    def __getitem__(self, idx: Any) -> np.ndarray:
        raw = self.mm[idx]
        if self.precision == "float16":
            return raw
        q = raw[..., : self.d].view(np.int8).astype(np.float32)
        scale = np.ascontiguousarray(raw[..., self.d :]).view(np.float16).astype(np.float32)
        return (q * scale).astype(np.float16)

    @staticmethod
    def encode(x: np.ndarray, precision: str) -> np.ndarray:
        if precision == "float16":
            return x.astype(np.float16)
        xf = x.astype(np.float32)
        scale = (np.abs(xf).max(-1, keepdims=True) / 127.0).astype(np.float16)  # (..., 1)
        safe = np.where(scale == 0, 1, scale.astype(np.float32))
        q = np.clip(np.rint(xf / safe), -127, 127).astype(np.int8)
        return np.concatenate([q.view(np.uint8), scale.view(np.uint8)], -1)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked: format, checksum, version, every field's type and range."""
    return _parse_manifest(path, _manifest_bytes(path))


def _manifest_bytes(path: Path) -> bytes:
    mpath = path / "manifest.yaml"
    try:
        raw = bankfs.read_file(mpath, MANIFEST_LIMIT)
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


class Bank:
    """A bank opened for reading (`Bank.open`) or writing (`Bank.open(writer=True)` / `Bank.create`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], writer: bool) -> None:
        self.path = path
        self.manifest = manifest
        self.writer = writer
        self.geo = validate_manifest(manifest, path)
        self._lock_fd: int | None = None
        self._reader_fd: int | None = None
        self._fds: dict[str, int] = {}  # writer: data files, checked and opened once
        self._crc_new: dict[tuple[int, int], int] = {}  # (block, file) -> crc of what was written
        self.docs: dict[int, DocRecord] = {}
        self.blocks = np.zeros((0, 4), dtype=np.int64)
        self.crc = np.zeros((0, self.n_files), dtype=np.uint32)
        self.indexes: dict[tuple[int, int], Any] = {}
        self._mm: dict[str, np.memmap] = {}
        self._state_bytes = 0  # size of the last committed state: what the reserve holds back
        self.frees_space = False  # set by removals and compaction: see commit()

    # ------------------------------------------------------------------ files and geometry
    @property
    def data_files(self) -> list[str]:
        out = []
        for layer in self.geo.layers:
            out += [f"L{layer}.keys", f"L{layer}.values"]
        return out + ["provenance.bin"]

    @property
    def n_files(self) -> int:
        return 2 * len(self.geo.layers) + 1

    @property
    def precision(self) -> str:
        return self.manifest.get("dtype", "float16")

    def _row_bytes(self, name: str) -> int:
        if name == "provenance.bin":
            return 24
        if self.precision == "int8":
            return self.geo.n_kv * (self.geo.head_dim + 2)
        return self.geo.row_bytes

    def _block_bytes(self, name: str) -> int:
        return self._row_bytes(name) * self.geo.block_size

    @property
    def capacity_blocks(self) -> int:  # blocks the data files have room for
        return int(self.blocks.shape[0])

    @property
    def live_blocks(self) -> np.ndarray:
        return np.nonzero(self.blocks[:, B_DOC] >= 0)[0]

    @property
    def entries(self) -> int:
        return int(self.blocks[self.blocks[:, B_DOC] >= 0, B_VALID].sum())

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def state_dir(self, gen: int | None = None) -> Path:
        return self.path / "state" / f"{self.generation if gen is None else gen:06d}"

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: Path,
        model: dict[str, Any],
        geo: Geometry,
        config: dict[str, Any],
        evict: dict,
        precision: str = "float16",
    ) -> Bank:
        """A new, empty, committed bank at `path`, open for writing. It is built in a private
        directory beside `path` and renamed into place, so `path` is a whole bank or nothing."""
        if precision not in PRECISIONS:
            raise MemtxError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = Path(path)
        _check_target(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_unfinished(path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".memtx-new", dir=path.parent))
        except OSError as e:
            if bankfs.is_no_space(e):
                raise bankfs.no_space(path.parent) from None
            raise MemtxError(f"cannot create bank {path}: {e.strerror}") from None
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "geometry": asdict(geo),
            "dtype": precision,
            "position_scheme": config.get("positions", "fixed"),
            "segment": config.get("segment"),
            "faiss_factory": "IDMap2,Flat",
            "eviction": evict,
            "config": config,
            "generation": 0,
            "entries": 0,
            "documents": 0,
            "next_doc_id": 0,
            "next_seq": 0,
            "clock": 0,
            "state_files": {},
        }
        bank = cls(tmp, manifest, writer=True)
        try:
            bank._lock_fd = banklock.writer_lock(tmp)
            bankfs.make_dir(tmp / "state")
            for name in bank.data_files:
                bankfs.create_file(tmp / name)
            bank._open_data_files()
            bank._init_indexes()
            bank.commit()
            bankfs.fsync_dir(tmp)
            os.rename(tmp, path)  # atomic; refused if something was put at `path` meanwhile
        except BaseException as e:
            bank.close()
            bankfs.remove_dir(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise MemtxError(f"{path} appeared while the bank was being created; run again") from None
            if bankfs.is_no_space(e):
                raise bankfs.no_space(path.parent) from None
            raise
        bank.path = path
        bank._mm.clear()
        bankfs.fsync_dir(path.parent)
        return bank

    @classmethod
    def is_bank(cls, path: Path) -> bool:
        return (Path(path) / "manifest.yaml").is_file()

    @classmethod
    def open(
        cls,
        path: str | Path,
        writer: bool = False,
        verify: bool = True,
        wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> Bank:
        """Open a bank: checks the tree (no links, no special files), the manifest, the state
        files' sha256 and sizes, and (verify=True) the crc32 of every live block. Any damage is
        a MemtxError naming the file. A writer waits up to `wait` s for another writer."""
        path = Path(path)
        if not path.exists():
            raise MemtxError(f"no such bank: {path}")
        path = path.resolve()
        if not (path / "manifest.yaml").exists() and not (path / "manifest.yaml").is_symlink():
            raise MemtxError(f"{path} is not a memtx bank (no manifest.yaml)")
        bankfs.check_tree(path)
        if writer:
            bankfs.check_dir_for_writing(path)
            fd = banklock.writer_lock(path, wait, on_wait)
            try:
                bank = cls(path, read_manifest(path), writer=True)
                bank._lock_fd = fd
            except BaseException:
                os.close(fd)
                raise
        else:
            bank = cls._open_reader(path)
        try:
            if writer:
                bank._open_data_files()
            bank._load_state()
            problems = bank.check(full=verify)
            if problems:
                raise MemtxError(f"bank {path} is damaged: {problems[0]} (run `memtx bank verify {path}`)")
            if writer:
                banklock.drop_unread(path, bank.generation)  # debris of crashes, unread states
        except BaseException:
            bank.close()
            raise
        return bank

    @classmethod
    def _open_reader(cls, path: Path) -> Bank:
        """Register as a reader of the current generation (see banklock.py), then open it."""
        for _ in range(200):
            raw = _manifest_bytes(path)
            manifest = _parse_manifest(path, raw)
            gen = manifest["generation"]
            fd, retry = banklock.reader_lock(path, gen)
            if retry:
                time.sleep(0.01)
                continue
            again = _manifest_bytes(path)
            if again != raw:
                manifest = _parse_manifest(path, again)
            if manifest["generation"] == gen:
                bank = cls(path, manifest, writer=False)
                bank._reader_fd = fd
                return bank
            if fd is not None:
                os.close(fd)
        raise MemtxError(f"bank {path} changes too fast to be opened; try again")

    def _open_data_files(self) -> None:
        """A writer's data files: checked (regular, one link, this user's) and opened once."""
        for name in self.data_files:
            p = self.path / name
            bankfs.check_writable(p)
            self._fds[name] = bankfs.open_file(p, os.O_RDWR)

    def close(self) -> None:
        self._mm.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in (self._reader_fd, self._lock_fd):  # closing the descriptor releases its lock
            if fd is not None:
                os.close(fd)
        self._reader_fd = self._lock_fd = None

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _state_files(self) -> list[str]:
        names = ["docs.json", "blocks.npy", "crc.npy"]
        return names + [f"L{layer}_H{h}.faiss" for layer in self.geo.layers for h in range(self.geo.n_kv)]

    def _max_capacity(self) -> int:
        """Blocks the largest data file can hold: a bound for the state arrays (check() names a
        file shorter than the state needs)."""
        cap = None
        for name in self.data_files:
            try:
                size = os.lstat(self.path / name).st_size
            except FileNotFoundError:
                raise MemtxError(f"bank {self.path}: {name} is missing") from None
            n = size // self._block_bytes(name)
            cap = n if cap is None else max(cap, n)
        return int(cap or 0)

    def _load_state(self) -> None:
        sd = self.state_dir()
        recorded = self.manifest.get("state_files") or {}
        cap = self._max_capacity()
        limits = {"blocks.npy": 4096 + 32 * cap, "crc.npy": 4096 + 4 * self.n_files * cap}
        data: dict[str, bytes] = {}
        for name in self._state_files():
            p = sd / name
            rel = p.relative_to(self.path)
            limit = limits.get(name, state_file_limit(name, self.geo.head_dim, cap))
            try:
                raw = bankfs.read_file(p, limit)
            except FileNotFoundError:
                raise MemtxError(f"bank {self.path}: state file {rel} is missing") from None
            except MemtxError:
                raise MemtxError(f"bank {self.path}: {rel} is damaged (too large)") from None
            if recorded.get(name) != hashlib.sha256(raw).hexdigest():
                raise MemtxError(
                    f"bank {self.path}: {rel} is damaged (checksum mismatch); run `memtx bank verify {self.path}`"
                )
            data[name] = raw
        blocks = parse_npy(data["blocks.npy"], "state/blocks.npy", self.path, np.int64, 4)
        crc = parse_npy(data["crc.npy"], "state/crc.npy", self.path, np.uint32, self.n_files)
        self.blocks, self.crc = blocks, crc
        self.docs = parse_docs(data["docs.json"], self.path, max(1, len(blocks)))
        n_live = int((blocks[:, B_DOC] >= 0).sum()) if len(blocks) else 0
        for layer in self.geo.layers:
            for h in range(self.geo.n_kv):
                name = f"L{layer}_H{h}.faiss"
                self.indexes[(layer, h)] = parse_index(
                    data[name], f"state/{name}", self.path, self.geo.head_dim, n_live
                )

    def _init_indexes(self) -> None:
        faiss = _faiss()
        for layer in self.geo.layers:
            for h in range(self.geo.n_kv):
                self.indexes[(layer, h)] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.geo.head_dim))

    # ------------------------------------------------------------------ data access
    def _array(self, name: str) -> np.memmap | None:
        """The data file as (slots, KV, D) float16 or (slots, 3) int64, memory-mapped read-only
        (writers write with pwrite into reserved space: no SIGBUS on a full disk)."""
        mm = self._mm.get(name)
        slots = self.capacity_blocks * self.geo.block_size
        if mm is not None and mm.shape[0] == slots:
            return mm
        if slots == 0:
            return None
        if name == "provenance.bin":
            shape, dt = (slots, 3), np.int64
        elif self.precision == "int8":
            shape, dt = (slots, self.geo.n_kv, self.geo.head_dim + 2), np.uint8
        else:
            shape, dt = (slots, self.geo.n_kv, self.geo.head_dim), np.float16
        mm = np.memmap(self.path / name, dtype=dt, mode="r", shape=shape)
        self._mm[name] = mm
        return mm

    def keys(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.keys"), self.precision, self.geo.head_dim)

    def values(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.values"), self.precision, self.geo.head_dim)

    def provenance(self) -> np.memmap:
        return self._array("provenance.bin")

    def block_crc(self, name: str, b: int) -> int:
        rb = self._block_bytes(name)
        with open(self.path / name, "rb") as f:
            f.seek(b * rb)
            return zlib.crc32(f.read(rb))

    def file_crcs(self, name: str, blocks: np.ndarray) -> dict[int, int]:
        """crc32 of the given blocks of one data file, reading it once, in order."""
        rb = self._block_bytes(name)
        out = {}
        with open(self.path / name, "rb") as f:
            for b in sorted(int(x) for x in blocks):
                f.seek(b * rb)
                out[b] = zlib.crc32(f.read(rb))
        return out

    # ------------------------------------------------------------------ checks
    def check(self, full: bool = True) -> list[str]:
        """Problems found (empty = healthy): file sizes, id alignment, docs vs blocks, indexes
        vs blocks, and (full) the crc32 of every live block of every data file."""
        problems = []
        nb, bs = self.capacity_blocks, self.geo.block_size
        if self.crc.shape != (nb, self.n_files):
            problems.append(f"state/crc.npy has shape {self.crc.shape}, expected {(nb, self.n_files)}")
            return problems
        for name in self.data_files:
            p = self.path / name
            want = nb * bs * self._row_bytes(name)
            if not p.is_file():
                problems.append(f"{name} is missing")
            elif p.stat().st_size < want:
                problems.append(f"{name} is truncated ({p.stat().st_size} bytes, expected {want})")
        if problems:
            return problems
        live = self.live_blocks
        owned: dict[int, int] = {}
        for d in self.docs.values():
            for b in d.blocks:
                if b in owned:
                    problems.append(f"state/docs.json: block {b} belongs to two documents")
                    return problems
                owned[b] = d.id
        if set(owned) != set(live.tolist()) or any(self.blocks[b, B_DOC] != owned[b] for b in owned):
            problems.append("state/docs.json and state/blocks.npy disagree on which blocks belong to which document")
        if len(live) and (self.blocks[live, B_VALID] < 1).any() | (self.blocks[live, B_VALID] > bs).any():
            problems.append("state/blocks.npy: a block's entry count is out of range")
            return problems
        for (layer, h), idx in self.indexes.items():
            ids = np.sort(_faiss().vector_to_array(idx.id_map)) if idx.ntotal else np.zeros(0, np.int64)
            if not np.array_equal(ids, np.sort(live)):
                problems.append(f"state/L{layer}_H{h}.faiss holds {idx.ntotal} blocks, the bank has {len(live)}")
        if full:
            for fi, name in enumerate(self.data_files):
                got = self.file_crcs(name, live)
                bad = [int(b) for b in live if got[int(b)] != self.crc[b, fi]]
                if bad:
                    problems.append(
                        f"{name} is damaged: checksum mismatch in {len(bad)} block(s), first block {bad[0]}"
                    )
            prov = self.provenance()
            if prov is not None and not problems:
                for b in live:
                    rows = prov[b * bs : b * bs + int(self.blocks[b, B_VALID])]
                    if len(rows) and (rows[:, 0] != self.blocks[b, B_DOC]).any():
                        problems.append(f"provenance.bin: block {int(b)} rows do not belong to its document")
                        break
        return problems

    # ------------------------------------------------------------------ writing
    def free_blocks(self) -> list[int]:
        return np.nonzero(self.blocks[:, B_DOC] < 0)[0].tolist()

    def reusable_blocks(self) -> np.ndarray:
        """Blocks free in the committed state that no open reader can see as live: freed at a
        generation f <= the oldest generation a reader holds (legacy rows without f count as
        freed at the current generation)."""
        gen = self.generation
        free = self.blocks[:, B_DOC] < 0
        freed = np.where(self.blocks[:, B_SEQ] < 0, gen, self.blocks[:, B_SEQ])
        ok = free & (freed <= gen)  # blocks freed by this uncommitted change wait for its commit
        if (ok & (freed > 0)).any():
            held = banklock.held_generations(self.path)
            if held:
                ok &= freed <= min(held)
        return np.nonzero(ok)[0]

    def allocate(self, n: int, reserved: set[int]) -> list[int]:
        """n blocks no reader can see (lowest ids first), their disk space reserved (a full disk
        fails here, before anything is written). The files' length grows geometrically, as
        sparse space, only when no block is free."""
        free = [int(b) for b in self.reusable_blocks() if int(b) not in reserved][:n]
        if len(free) < n:
            need = n - len(free)
            old = self.capacity_blocks
            grow = max(need, old // 4, 16)  # geometric growth: amortised O(1) file extension
            self._grow(old + grow)
            free += [b for b in range(old, old + grow) if b not in reserved][:need]
        for b in free:
            for name in self.data_files:
                rb = self._block_bytes(name)
                bankfs.reserve(self._fds[name], b * rb, rb, self.path)
        return free

    def _grow(self, nb: int) -> None:
        for name, fd in self._fds.items():
            want = nb * self._block_bytes(name)
            if os.fstat(fd).st_size < want:
                os.ftruncate(fd, want)  # sparse: blocks take disk space when allocated
        old = self.capacity_blocks
        self.blocks = np.concatenate([self.blocks, np.tile(np.array([FREE_ROW], np.int64), (nb - old, 1))])
        self.crc = np.concatenate([self.crc, np.zeros((nb - old, self.n_files), np.uint32)])
        self._mm.clear()

    def _put(self, fi: int, name: str, b: int, block: np.ndarray) -> None:
        data = block.tobytes()
        try:
            bankfs.pwrite_all(self._fds[name], data, b * len(data))
        except OSError as e:
            if bankfs.is_no_space(e):
                raise bankfs.no_space(self.path) from None
            raise
        self._crc_new[(b, fi)] = zlib.crc32(data)

    def write_block(
        self,
        b: int,
        doc_id: int,
        kv: dict[int, tuple[np.ndarray, np.ndarray]],  # layer -> keys, values (n, KV, D) float16
        prov: np.ndarray,  # (n, 3) int64
    ) -> None:
        """Write one block's data into free block b (not yet committed)."""
        bs = self.geo.block_size
        n = prov.shape[0]
        fi = 0
        for layer in self.geo.layers:
            for arr in kv[layer]:
                enc = Stored.encode(arr, self.precision)
                full = np.zeros((bs, *enc.shape[1:]), enc.dtype)
                full[:n] = enc
                self._put(fi, self.data_files[fi], b, full)
                fi += 1
        full = np.full((bs, 3), -1, np.int64)
        full[:n] = prov
        self._put(fi, "provenance.bin", b, full)

    def flush(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def reps(self, layer: int, blocks: list[int]) -> np.ndarray:
        """(len(blocks), KV, D) float32 mean keys of the given blocks (valid entries only)."""
        bs = self.geo.block_size
        keys = self.keys(layer)
        out = np.zeros((len(blocks), self.geo.n_kv, self.geo.head_dim), np.float32)
        for i, b in enumerate(blocks):
            n = int(self.blocks[b, B_VALID])
            out[i] = keys[b * bs : b * bs + n].astype(np.float32).mean(0)
        return out

    def attach_blocks(self, doc_id: int, blocks: list[int], valid: list[int]) -> None:
        """Make written blocks part of the (next committed) state: table, crc, indexes."""
        for b, n in zip(blocks, valid, strict=True):
            self.blocks[b] = [doc_id, n, self.manifest["next_seq"], self.manifest["clock"]]
            self.manifest["next_seq"] += 1
            for fi, name in enumerate(self.data_files):
                c = self._crc_new.pop((b, fi), None)
                self.crc[b, fi] = self.block_crc(name, b) if c is None else c
        if not blocks:
            return
        ids = np.asarray(blocks, np.int64)
        for layer in self.geo.layers:
            r = self.reps(layer, blocks)
            for h in range(self.geo.n_kv):
                self.indexes[(layer, h)].add_with_ids(np.ascontiguousarray(r[:, h]), ids)

    def detach_blocks(self, blocks: list[int]) -> None:
        """Free blocks in the next committed state (generation + 1 is when they become free)."""
        if not blocks:
            return
        ids = np.asarray(sorted(blocks), np.int64)
        for idx in self.indexes.values():
            idx.remove_ids(ids)
        self.blocks[ids] = [-1, 0, self.generation + 1, -1]
        self.crc[ids] = 0

    def add_document(self, rec: DocRecord) -> None:
        self.docs[rec.id] = rec
        self.manifest["next_doc_id"] = max(self.manifest["next_doc_id"], rec.id + 1)

    def remove_document(self, doc_id: int) -> DocRecord:
        rec = self.docs.pop(doc_id)
        self.detach_blocks(rec.blocks)
        return rec

    def find_doc(self, key: str) -> DocRecord | None:
        """A document by id, path (as stored) or alias."""
        for d in self.docs.values():
            if key == str(d.id) or key == d.path or key in d.aliases:
                return d
        return None

    # ------------------------------------------------------------------ commit
    def commit(self) -> None:
        """Write a complete new state generation, then point the manifest at it atomically. On
        a full disk, a commit that frees space (`frees_space`: removal, compaction) may use the
        space held in `reserve`; one that adds memories may not (it fails, and the reserve
        stays for the `bank rm` that will make room)."""
        assert self.writer
        try:
            self._commit()
        except OSError as e:
            if not bankfs.is_no_space(e):
                raise
            if not self.frees_space or not bankfs.release_reserve(self.path / "reserve"):
                raise bankfs.no_space(self.path) from None
            try:
                self._commit()
            except OSError as e2:
                if bankfs.is_no_space(e2):
                    raise bankfs.no_space(self.path) from None
                raise
        bankfs.refresh_reserve(self.path / "reserve", self._state_bytes + RESERVE_SLACK)

    def _commit(self) -> None:
        import yaml

        self.flush()
        gen = self.generation + 1
        sd = self.state_dir(gen)
        if os.path.lexists(sd):
            bankfs.remove_dir(sd)  # debris of a crashed commit: never referenced
        payload = {
            "docs.json": docs_bytes(sorted(self.docs.values(), key=lambda d: d.id)),
            "blocks.npy": npy_bytes(self.blocks),
            "crc.npy": npy_bytes(self.crc),
        }
        for (layer, h), idx in self.indexes.items():
            payload[f"L{layer}_H{h}.faiss"] = index_bytes(idx)
        try:
            bankfs.make_dir(sd)
            files = {}
            for name, data in payload.items():
                bankfs.create_file(sd / name, data)
                files[name] = hashlib.sha256(data).hexdigest()
            bankfs.create_file(sd / banklock.READERS)
            bankfs.fsync_dir(sd)
            bankfs.fsync_dir(sd.parent)
            m = dict(self.manifest)
            m.update(
                generation=gen,
                state_files=files,
                entries=self.entries,
                documents=len(self.docs),
                updated_at=now(),
            )
            m.pop("checksum", None)
            m["checksum"] = manifest_checksum(m)
            bankfs.write_atomic(self.path / "manifest.yaml", yaml.safe_dump(m, sort_keys=False).encode("utf-8"))
        except BaseException:
            if os.path.isdir(sd) and not os.path.islink(sd):
                bankfs.remove_dir(sd)
            raise
        bankfs.fsync_dir(self.path)
        self.manifest = m
        self._state_bytes = sum(len(d) for d in payload.values())
        banklock.drop_unread(self.path, gen)

    def trim(self) -> None:
        """Give back the free blocks at the end of the data files (growth is geometric). Only
        when no reader holds the bank: a reader maps the files at its state's length. Commits,
        then truncates: a crash in between only leaves the files longer than needed."""
        live = self.live_blocks
        keep = int(live.max()) + 1 if len(live) else 0
        if keep >= self.capacity_blocks or banklock.held_generations(self.path):
            return
        self.blocks, self.crc = self.blocks[:keep], self.crc[:keep]
        self._mm.clear()
        self.commit()
        if [g for g in banklock.held_generations(self.path) if g != self.generation]:
            return
        for name, fd in self._fds.items():
            os.ftruncate(fd, keep * self._block_bytes(name))

    def give_back(self) -> int:
        """Return the disk space of free blocks no reader can see to the file system (their
        ranges read as zeros until reused). Returns the number of blocks released."""
        blocks = self.reusable_blocks()
        n = 0
        for b in blocks.tolist():
            for name, fd in self._fds.items():
                rb = self._block_bytes(name)
                if not bankfs.punch_hole(fd, b * rb, rb):
                    return n
            n += 1
        return n

    # ------------------------------------------------------------------ eviction
    def evict_to_capacity(self, protect: set[int]) -> list[int]:
        """Free blocks until live entries fit the capacity, by the bank's policy. Blocks in
        `protect` (the document being added) are evicted last. Returns the freed blocks."""
        ev = self.manifest.get("eviction") or {}
        cap = int(ev.get("capacity") or 0)
        if cap <= 0:
            return []
        cap_blocks = max(1, cap // self.geo.block_size)
        live = self.live_blocks
        excess = len(live) - cap_blocks
        if excess <= 0:
            return []
        policy = ev.get("policy", "fifo")
        if policy == "fifo":
            order = sorted(live.tolist(), key=lambda b: (b in protect, self.blocks[b, B_SEQ]))
        elif policy == "lru":
            order = sorted(live.tolist(), key=lambda b: (b in protect, self.blocks[b, B_USED], self.blocks[b, B_SEQ]))
        else:  # reservoir: every block ever added has the same chance to be kept
            rng = np.random.default_rng([int(ev.get("seed", 0)), int(self.manifest["next_seq"])])
            order = live.tolist()
            rng.shuffle(order)
        victims = order[:excess]
        gone = set(victims)
        touched = {int(self.blocks[b, B_DOC]) for b in victims}
        self.detach_blocks(victims)
        for d in touched:
            rec = self.docs[d]
            rec.blocks = [b for b in rec.blocks if b not in gone]
            rec.entries = int(sum(self.blocks[b, B_VALID] for b in rec.blocks))
            if not rec.blocks:
                del self.docs[d]
        return victims

    def touch(self, blocks: list[int]) -> None:
        """LRU: mark blocks as used now (writers only; readers never modify a bank)."""
        self.manifest["clock"] += 1
        self.blocks[np.asarray(blocks, np.int64), B_USED] = self.manifest["clock"]

    # ------------------------------------------------------------------ reading helpers
    def info(self) -> dict[str, Any]:
        disk = apparent = 0
        for dirpath, _, files in os.walk(self.path, followlinks=False):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                disk += st.st_blocks * 512
                apparent += st.st_size
        toks = sum(d.tokens for d in self.docs.values())
        return {
            "bank": str(self.path),
            "documents": len(self.docs),
            "entries": self.entries,
            "blocks": int(len(self.live_blocks)),
            "capacity_blocks": self.capacity_blocks,
            "block_size": self.geo.block_size,
            "bytes_on_disk": disk,
            "apparent_bytes": apparent,
            "bytes_per_token": disk / toks if toks else None,
            "tokens": toks,
            "model": self.manifest["model"],
            "layers": self.geo.layers,
            "kv_heads": self.geo.n_kv,
            "head_dim": self.geo.head_dim,
            "dtype": self.precision,
            "eviction": self.manifest.get("eviction"),
            "settings": self.manifest["config"],
            "generation": self.generation,
            "updated_at": self.manifest.get("updated_at"),
            **bankfs.readable_by(self.path),
        }


def state_file_limit(name: str, d: int, n_live: int) -> int:
    """The largest a state file may be for a bank with room for `n_live` blocks."""
    if name.endswith(".faiss"):
        return 90 + n_live * (4 * d + 8)
    return 1 << 30  # docs.json: paths of every document


def _remove_unfinished(path: Path) -> None:
    """Remove what killed creations of `path` left beside it: directories named as only
    Bank.create names them (`.NAME.<random>.memtx-new`), this user's, holding only bank files,
    whose creator is gone (their lock is free)."""
    import fcntl
    import re
    import stat

    bank_names = re.compile(r"^(manifest\.yaml|lock|reserve|state|provenance\.bin|L\d+\.(keys|values)|\..*\.tmp)$")
    for d in path.parent.glob(f".{path.name}.*.memtx-new"):
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            if not all(bank_names.match(n) for n in os.listdir(d)):
                continue
            fd = bankfs.open_file(d / "lock", os.O_RDWR | os.O_CREAT)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            bankfs.remove_dir(d)
        except OSError:
            pass
        finally:
            os.close(fd)


def _check_target(path: Path) -> None:
    """Where a new bank goes: nothing there, or an empty directory."""
    if path.is_symlink():
        raise MemtxError(f"{path} is a symlink; give the bank's real path")
    if path.exists():
        if not path.is_dir():
            raise MemtxError(f"{path} exists and is a file; --out names a bank directory")
        if any(path.iterdir()):
            raise MemtxError(f"{path} exists and is not a memtx bank; choose another --out")


def manifest_checksum(m: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own checksum (canonical JSON)."""
    import json

    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def check_model(bank: Bank, model: dict[str, Any]) -> None:
    """Refuse a bank built by another model (weights or tokenizer)."""
    mine = bank.manifest["model"]
    for key, what in (("weights_fingerprint", "weights"), ("tokenizer_fingerprint", "tokenizer")):
        if mine.get(key) != model.get(key):
            raise MemtxError(
                f"bank {bank.path} was built with model {mine.get('name')!r} ({what} fingerprint "
                f"{str(mine.get(key))[:12]}), not {model.get('name')!r} ({str(model.get(key))[:12]}); "
                f"use --model {mine.get('name')} or rebuild the bank"
            )
