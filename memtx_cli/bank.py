"""Memory banks on disk: attention memories of a corpus, reusable, verifiable, never corrupted.

A bank is a directory (the user names it, e.g. `repo.idx`):

    manifest.yaml            format, model + tokenizer fingerprints, geometry, merged config,
                             counts, and the current state generation with its files' sha256
    state/<gen>/docs.json    document table: path(s), sha256, size, tokens, chars, blocks, time
    state/<gen>/blocks.npy   (capacity, 4) int64 per block: doc id (-1 free), valid entries,
                             insertion sequence, last use (LRU clock)
    state/<gen>/crc.npy      (capacity, files) uint32: crc32 of every block in every data file
    state/<gen>/L<l>_H<h>.faiss  per (memory layer, KV head): IDMap2 inner-product index of the
                             block representatives (mean key), ids = block ids
    L<l>.keys, L<l>.values   (slots, KV, D) raw keys (no RoPE) and values, memory-mapped:
                             float16, or int8 rows with a float16 absmax scale (D + 2 bytes)
    provenance.bin           (slots, 3) int64: document id, token offset, character offset
    lock                     flock'd by the one writer

Entries live in blocks of `block_size` consecutive tokens of one document (the unit of block
retrieval, eviction and provenance); entry id = block id * block_size + offset, and ids never
move, so keys, values and provenance stay aligned through eviction, removal and merges.

Durability: data of new blocks is written only into blocks that are free in the committed
state, fsync'd, then a complete new state directory is written and fsync'd, and the manifest
(which names it) is replaced atomically (`os.replace`). A reader or a crash sees the old state
or the new one, never a mix; uncommitted blocks are garbage nobody references. Ingest commits
after every document, so a killed ingest loses at most the document it was reading.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.errors import MemtxError

FORMAT = "memtx-bank"
VERSION = 1
EVICTION = ("fifo", "lru", "reservoir")
# Block table columns.
B_DOC, B_VALID, B_SEQ, B_USED = range(4)


def _faiss():
    import faiss

    return faiss


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


@dataclass
class Geometry:
    """What a bank's arrays look like; fixed when the bank is created."""

    layers: list[int]
    n_kv: int
    head_dim: int
    block_size: int

    @property
    def row_bytes(self) -> int:  # one entry of one layer's keys (or values) file, float16
        return self.n_kv * self.head_dim * 2


PRECISIONS = ("float16", "int8")


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


class Bank:
    """A bank opened for reading (`Bank.open`) or writing (`Bank.open_writer` / `Bank.create`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], writer: bool) -> None:
        self.path = path
        self.manifest = manifest
        self.writer = writer
        g = manifest["geometry"]
        self.geo = Geometry(list(g["layers"]), int(g["n_kv"]), int(g["head_dim"]), int(g["block_size"]))
        self._lock_fd: int | None = None
        self._reader_fd: int | None = None
        self._reuse_ok: bool | None = None  # may freed blocks be overwritten (no older readers)
        self.docs: dict[int, DocRecord] = {}
        self.blocks = np.zeros((0, 4), dtype=np.int64)
        self.crc = np.zeros((0, self.n_files), dtype=np.uint32)
        self.indexes: dict[tuple[int, int], Any] = {}
        self._mm: dict[str, np.memmap] = {}

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

    @property
    def capacity_blocks(self) -> int:  # blocks the data files have room for
        return int(self.blocks.shape[0])

    @property
    def live_blocks(self) -> np.ndarray:
        return np.nonzero(self.blocks[:, B_DOC] >= 0)[0]

    @property
    def entries(self) -> int:
        return int(self.blocks[self.blocks[:, B_DOC] >= 0, B_VALID].sum())

    def state_dir(self, gen: int | None = None) -> Path:
        return self.path / "state" / f"{self.manifest['generation'] if gen is None else gen:06d}"

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
        if precision not in PRECISIONS:
            raise MemtxError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise MemtxError(f"{path} exists and is not a memtx bank; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
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
        bank = cls(path, manifest, writer=True)
        bank._lock()
        for name in bank.data_files:
            (path / name).touch()
        bank._init_indexes()
        bank.commit()
        return bank

    @classmethod
    def is_bank(cls, path: Path) -> bool:
        return (Path(path) / "manifest.yaml").is_file()

    @classmethod
    def open(cls, path: str | Path, writer: bool = False, verify: bool = True) -> Bank:
        """Open a bank; checks the manifest, the state files' sha256, the data files' sizes and
        (verify=True) the crc32 of every live block. Any damage is a MemtxError naming the file."""
        path = Path(path)
        mpath = path / "manifest.yaml"
        if not path.exists():
            raise MemtxError(f"no such bank: {path}")
        if not mpath.is_file():
            raise MemtxError(f"{path} is not a memtx bank (no manifest.yaml)")
        # Readers hold a shared lock for their lifetime, taken before the manifest is read: a
        # writer never reuses freed blocks while a reader that may still see them is open.
        # A writer takes its exclusive lock before reading the manifest too: it must see the
        # state the previous writer committed.
        fd = _writer_lock(path) if writer else _reader_lock(path)
        try:
            bank = cls._open_locked(path, mpath, writer, verify, fd)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return bank

    @classmethod
    def _open_locked(cls, path: Path, mpath: Path, writer: bool, verify: bool, fd: int | None) -> Bank:
        import yaml

        try:
            manifest = yaml.safe_load(mpath.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise MemtxError(f"bank {path}: manifest.yaml is damaged ({str(e).splitlines()[0]})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MemtxError(f"bank {path}: manifest.yaml is damaged or not a memtx bank manifest")
        if manifest.get("checksum") != manifest_checksum(manifest):
            raise MemtxError(f"bank {path}: manifest.yaml is damaged (checksum mismatch)")
        if manifest.get("version") != VERSION:
            raise MemtxError(f"bank {path}: format version {manifest.get('version')} is not supported (want {VERSION})")
        try:
            bank = cls(path, manifest, writer)
        except (KeyError, TypeError, ValueError):
            raise MemtxError(f"bank {path}: manifest.yaml is damaged (geometry)") from None
        if writer:
            bank._lock_fd = fd
        else:
            bank._reader_fd = fd
        try:
            bank._load_state()
            problems = bank.check(full=verify)
        except Exception:
            bank._lock_fd = bank._reader_fd = None  # the caller closes fd
            raise
        if problems:
            bank._lock_fd = bank._reader_fd = None
            raise MemtxError(f"bank {path} is damaged: {problems[0]} (run `memtx bank verify {path}`)")
        return bank

    def _lock(self) -> None:
        self._lock_fd = _writer_lock(self.path)

    def close(self) -> None:
        self._mm.clear()
        if self._reader_fd is not None:
            os.close(self._reader_fd)  # closing the descriptor releases the shared lock
            self._reader_fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _state_files(self) -> list[str]:
        names = ["docs.json", "blocks.npy", "crc.npy"]
        return names + [f"L{layer}_H{h}.faiss" for layer in self.geo.layers for h in range(self.geo.n_kv)]

    def _load_state(self) -> None:
        sd = self.state_dir()
        recorded = self.manifest.get("state_files") or {}
        for name in self._state_files():
            p = sd / name
            if not p.is_file():
                raise MemtxError(f"bank {self.path}: state file {p.relative_to(self.path)} is missing")
            if recorded.get(name) != sha256_file(p):
                raise MemtxError(
                    f"bank {self.path}: {p.relative_to(self.path)} is damaged (checksum mismatch); "
                    f"run `memtx bank verify {self.path}`"
                )
        try:
            docs = json.loads((sd / "docs.json").read_text(encoding="utf-8"))
            self.docs = {int(d["id"]): DocRecord(**d) for d in docs}
            self.blocks = np.load(sd / "blocks.npy", allow_pickle=False)
            self.crc = np.load(sd / "crc.npy", allow_pickle=False)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise MemtxError(f"bank {self.path}: state is damaged ({e})") from None
        faiss = _faiss()
        for layer in self.geo.layers:
            for h in range(self.geo.n_kv):
                p = sd / f"L{layer}_H{h}.faiss"
                try:
                    self.indexes[(layer, h)] = faiss.read_index(str(p))
                except RuntimeError:
                    raise MemtxError(f"bank {self.path}: {p.relative_to(self.path)} is damaged") from None

    def _init_indexes(self) -> None:
        faiss = _faiss()
        for layer in self.geo.layers:
            for h in range(self.geo.n_kv):
                self.indexes[(layer, h)] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.geo.head_dim))

    # ------------------------------------------------------------------ data access
    def _array(self, name: str) -> np.memmap | None:
        """The data file as (slots, KV, D) float16 or (slots, 3) int64, memory-mapped."""
        mm = self._mm.get(name)
        slots = self.capacity_blocks * self.geo.block_size
        if mm is not None and mm.shape[0] == slots:
            return mm
        if slots == 0:
            return None
        p = self.path / name
        if name == "provenance.bin":
            shape, dt = (slots, 3), np.int64
        elif self.precision == "int8":
            shape, dt = (slots, self.geo.n_kv, self.geo.head_dim + 2), np.uint8
        else:
            shape, dt = (slots, self.geo.n_kv, self.geo.head_dim), np.float16
        mm = np.memmap(p, dtype=dt, mode="r+" if self.writer else "r", shape=shape)
        self._mm[name] = mm
        return mm

    def keys(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.keys"), self.precision, self.geo.head_dim)

    def values(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.values"), self.precision, self.geo.head_dim)

    def provenance(self) -> np.memmap:
        return self._array("provenance.bin")

    def block_crc(self, name: str, b: int) -> int:
        rb = self._row_bytes(name) * self.geo.block_size
        with open(self.path / name, "rb") as f:
            f.seek(b * rb)
            return zlib.crc32(f.read(rb))

    def file_crcs(self, name: str, blocks: np.ndarray) -> dict[int, int]:
        """crc32 of the given blocks of one data file, reading it once, in order."""
        rb = self._row_bytes(name) * self.geo.block_size
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
                owned[b] = d.id
        if set(owned) != set(live.tolist()) or any(self.blocks[b, B_DOC] != owned[b] for b in owned):
            problems.append("state/docs.json and state/blocks.npy disagree on which blocks belong to which document")
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

    def allocate(self, n: int, reserved: set[int]) -> list[int]:
        """n blocks free in the committed state (lowest ids first), growing the files if needed."""
        if not self._reuse_ok:  # once no reader is seen after a commit, later readers see these blocks free
            self._reuse_ok = _no_readers(self.path)
        reusable = self.free_blocks() if self._reuse_ok else []
        free = [b for b in reusable if b not in reserved][:n]
        if len(free) < n:
            need = n - len(free)
            old = self.capacity_blocks
            grow = max(need, old // 2, 16)  # geometric growth: amortised O(1) file extension
            self._grow(old + grow)
            free += [b for b in range(old, old + grow) if b not in reserved][:need]
        return free

    def _grow(self, nb: int) -> None:
        old = self.capacity_blocks
        self.blocks = np.concatenate([self.blocks, np.tile(np.array([[-1, 0, -1, -1]], np.int64), (nb - old, 1))])
        self.crc = np.concatenate([self.crc, np.zeros((nb - old, self.n_files), np.uint32)])
        for name in self.data_files:
            with open(self.path / name, "r+b") as f:
                f.truncate(nb * self.geo.block_size * self._row_bytes(name))
        self._mm.clear()

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
        for layer in self.geo.layers:
            k, v = kv[layer]
            for name, arr in ((f"L{layer}.keys", k), (f"L{layer}.values", v)):
                mm = self._array(name)
                mm[b * bs : b * bs + n] = Stored.encode(arr, self.precision)
                mm[b * bs + n : (b + 1) * bs] = 0
        pm = self.provenance()
        pm[b * bs : b * bs + n] = prov
        pm[b * bs + n : (b + 1) * bs] = -1

    def flush(self) -> None:
        for mm in self._mm.values():
            mm.flush()
        for name in self.data_files:
            fd = os.open(self.path / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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
                self.crc[b, fi] = self.block_crc(name, b)
        if not blocks:
            return
        ids = np.asarray(blocks, np.int64)
        for layer in self.geo.layers:
            r = self.reps(layer, blocks)
            for h in range(self.geo.n_kv):
                self.indexes[(layer, h)].add_with_ids(np.ascontiguousarray(r[:, h]), ids)

    def detach_blocks(self, blocks: list[int]) -> None:
        if not blocks:
            return
        ids = np.asarray(sorted(blocks), np.int64)
        for idx in self.indexes.values():
            idx.remove_ids(ids)
        self.blocks[ids] = [-1, 0, -1, -1]
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

    def commit(self) -> None:
        """Write a complete new state generation, then point the manifest at it atomically."""
        assert self.writer
        self._reuse_ok = None
        self.flush()
        gen = int(self.manifest["generation"]) + 1
        sd = self.state_dir(gen)
        if sd.exists():
            shutil.rmtree(sd)  # debris of a crashed commit: never referenced
        sd.mkdir(parents=True)
        docs = [asdict(d) for d in sorted(self.docs.values(), key=lambda d: d.id)]
        (sd / "docs.json").write_text(json.dumps(docs, indent=0), encoding="utf-8")
        np.save(sd / "blocks.npy", self.blocks, allow_pickle=False)
        np.save(sd / "crc.npy", self.crc, allow_pickle=False)
        faiss = _faiss()
        for (layer, h), idx in self.indexes.items():
            faiss.write_index(idx, str(sd / f"L{layer}_H{h}.faiss"))
        files = {}
        for name in self._state_files():
            with open(sd / name, "rb") as f:
                os.fsync(f.fileno())
            files[name] = sha256_file(sd / name)
        _fsync_dir(sd)
        _fsync_dir(sd.parent)
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
        import yaml

        _write_atomic(self.path / "manifest.yaml", yaml.safe_dump(m, sort_keys=False).encode("utf-8"))
        _fsync_dir(self.path)
        old = self.manifest["generation"]
        self.manifest = m
        for p in (self.path / "state").iterdir():  # older generations are no longer referenced
            if p.name != f"{gen:06d}" and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        del old

    def trim(self) -> None:
        """Give back the free blocks at the end of the data files (growth is geometric, so up
        to a third of the files can be slack after an ingest). Commits, then truncates: a crash
        in between only leaves the files longer than needed."""
        live = self.live_blocks
        keep = int(live.max()) + 1 if len(live) else 0
        if keep >= self.capacity_blocks or not _no_readers(self.path):
            return
        self.blocks, self.crc = self.blocks[:keep], self.crc[:keep]
        self._mm.clear()
        self.commit()
        for name in self.data_files:
            with open(self.path / name, "r+b") as f:
                f.truncate(keep * self.geo.block_size * self._row_bytes(name))

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
        disk = 0
        for p in self.path.rglob("*"):
            if p.is_file():
                disk += p.stat().st_size
        toks = sum(d.tokens for d in self.docs.values())
        return {
            "bank": str(self.path),
            "documents": len(self.docs),
            "entries": self.entries,
            "blocks": int(len(self.live_blocks)),
            "block_size": self.geo.block_size,
            "bytes_on_disk": disk,
            "bytes_per_token": disk / toks if toks else None,
            "tokens": toks,
            "model": self.manifest["model"],
            "layers": self.geo.layers,
            "kv_heads": self.geo.n_kv,
            "head_dim": self.geo.head_dim,
            "dtype": self.manifest["dtype"],
            "eviction": self.manifest.get("eviction"),
            "settings": self.manifest["config"],
            "generation": self.manifest["generation"],
            "updated_at": self.manifest.get("updated_at"),
        }


def manifest_checksum(m: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own checksum (canonical JSON)."""
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


def _writer_lock(path: Path) -> int:
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MemtxError(f"bank {path} is being written by another memtx process; try again later") from None
    return fd


def _reader_lock(path: Path) -> int | None:
    try:
        fd = os.open(path / "readers", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path / "readers", os.O_RDONLY)
        except OSError:
            return None  # a read-only bank without the file: nobody can write it anyway
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _no_readers(path: Path) -> bool:
    """True when no reader holds the bank open (then freed blocks may be overwritten)."""
    fd = os.open(path / "readers", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def verify_bank(path: str | Path) -> list[str]:
    """Every problem found in a bank (empty = healthy); never raises for damage."""
    try:
        bank = Bank.open(path, writer=False, verify=False)
    except MemtxError as e:
        return [str(e)]
    try:
        return bank.check(full=True)
    finally:
        bank.close()


def merge_banks(sources: list[Path], out: Path) -> dict[str, Any]:
    """A new bank holding the documents of all `sources` (identical content kept once)."""
    if not sources:
        raise MemtxError("bank merge needs at least one bank")
    if Bank.is_bank(out) or (out.exists() and any(out.iterdir())):
        raise MemtxError(f"{out} already exists; bank merge writes a new bank")
    opened = [Bank.open(p, verify=True) for p in sources]
    try:
        first = opened[0]
        for b in opened[1:]:
            check_model(first, b.manifest["model"])
            if asdict(b.geo) != asdict(first.geo):
                raise MemtxError(f"bank {b.path} has different memory layers or block size than {first.path}")
        for b in opened[1:]:
            if b.precision != first.precision:
                raise MemtxError(f"bank {b.path} stores {b.precision}, {first.path} {first.precision}: cannot merge")
        dst = Bank.create(
            out, first.manifest["model"], first.geo, first.manifest["config"], {"capacity": 0}, first.precision
        )
        try:
            for src in opened:
                for rec in sorted(src.docs.values(), key=lambda d: d.id):
                    _copy_document(src, rec, dst)
            return {"documents": len(dst.docs), "entries": dst.entries}
        finally:
            dst.close()
    finally:
        for b in opened:
            b.close()


def _copy_document(src: Bank, rec: DocRecord, dst: Bank) -> None:
    same = next((d for d in dst.docs.values() if d.sha256 == rec.sha256), None)
    if same is not None:
        for p in [rec.path, *rec.aliases]:
            if p != same.path and p not in same.aliases:
                same.aliases.append(p)
        dst.commit()
        return
    doc_id = int(dst.manifest["next_doc_id"])
    bs = src.geo.block_size
    new_blocks, valid = [], []
    for b in rec.blocks:
        n = int(src.blocks[b, B_VALID])
        rows = slice(b * bs, b * bs + n)
        kv = {ly: (np.asarray(src.keys(ly)[rows]), np.asarray(src.values(ly)[rows])) for ly in src.geo.layers}
        prov = np.array(src.provenance()[b * bs : b * bs + n])
        prov[:, 0] = doc_id
        (nb,) = dst.allocate(1, set(new_blocks))
        dst.write_block(nb, doc_id, kv, prov)
        new_blocks.append(nb)
        valid.append(n)
    dst.attach_blocks(doc_id, new_blocks, valid)
    d = DocRecord(**{**asdict(rec), "id": doc_id, "blocks": new_blocks})
    dst.add_document(d)
    dst.commit()
