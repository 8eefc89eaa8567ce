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
    L<l>.keys, L<l>.values   (slots, KV, code) raw keys (no RoPE) and values, memory-mapped, in
                             the bank's codec (bank/codec.py): float16, a FAISS scalar
                             quantizer (sq8, sq6, sq4), or legacy absmax int8
    state/<gen>/codec.npy    a trained codec's parameters (layers x 2 x KV, 2 x D) float32
    provenance.bin           (slots, 3) int64: document id, token offset, character offset
    words.bin                (slots,) uint32: hash of the word starting in each token, 0 if none
                             (the lexical index, bank/words.py; banks made before it lack it)
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

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.bank import codec as bankcodec
from memtx_cli.bank import fs as bankfs
from memtx_cli.bank import lock as banklock
from memtx_cli.bank.checks import BankChecks
from memtx_cli.bank.codec import Stored
from memtx_cli.bank.format import (
    B_DOC,
    BlockCounts,
    DocRecord,
    Geometry,
    _faiss,
    _manifest_bytes,
    _parse_manifest,
    parse_docs,
    parse_index,
    parse_npy,
    read_manifest,
    state_file_limit,
    validate_manifest,
)
from memtx_cli.bank.writer import BankWriter
from memtx_cli.errors import MemtxError


class Bank(BankWriter, BankChecks, BlockCounts):
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
        self._verified = np.zeros((0, self.n_files), dtype=bool)  # (block, file) crc checked (verify_read)
        self._state_bytes = 0  # size of the last committed state: what the reserve holds back
        self.codec_params: np.ndarray | None = None  # a trained codec's parameters (codec.npy)
        self._codecs: list[bankcodec.Codec] | None = None
        self.frees_space = False  # set by removals and compaction: see commit()

    # ------------------------------------------------------------------ files and geometry
    @property
    def data_files(self) -> list[str]:
        out = []
        for layer in self.geo.layers:
            out += [f"L{layer}.keys", f"L{layer}.values"]
        return out + ["provenance.bin"] + (["words.bin"] if self.has_words else [])

    @property
    def n_files(self) -> int:
        return 2 * len(self.geo.layers) + 1 + self.has_words

    @property
    def has_words(self) -> bool:
        """Whether the bank keeps its words (a lexical index for recall)."""
        return self.manifest.get("words") is True

    @property
    def precision(self) -> str:
        return self.manifest.get("dtype", "float16")

    def _row_bytes(self, name: str) -> int:
        if name == "provenance.bin":
            return 24
        if name == "words.bin":
            return 4
        return self._slots(name) * bankcodec.code_size(self.precision, self.geo.head_dim)

    def _slots(self, name: str) -> int:
        """KV heads stored in the data file `L{layer}.keys` / `L{layer}.values`."""
        return len(self.geo.stored(int(name[1:].split(".")[0])))

    def _block_bytes(self, name: str) -> int:
        return self._row_bytes(name) * self.geo.block_size

    @property
    def capacity_blocks(self) -> int:  # blocks the data files have room for
        return int(self.blocks.shape[0])

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
        words: bool = True,
    ) -> Bank:
        """A new, empty, committed bank at `path`, open for writing. It is built in a private
        directory beside `path` and renamed into place, so `path` is a whole bank or nothing."""
        from memtx_cli.bank.create import create_bank

        return create_bank(cls, path, model, geo, config, evict, precision, words)

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
        files' sha256 and sizes, and (verify=True) the crc32 of every live block; otherwise a
        reader checks each block's crc32 the first time it reads it (`verify_read`). Any damage is a
        MemtxError naming the file. A writer waits up to `wait` s for another writer."""
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
        names = ["docs.json", "blocks.npy", "crc.npy"] + (["codec.npy"] if self.manifest.get("codec_trained") else [])
        return names + [f"L{layer}_H{h}.faiss" for layer, h in self.geo.pairs()]

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
        limits = {
            "blocks.npy": 4096 + 32 * cap,
            "crc.npy": 4096 + 4 * self.n_files * cap,
            "codec.npy": 4096 + 8 * self.geo.head_dim * self.codec_rows,
        }
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
        if "codec.npy" in data:
            self.codec_params = parse_npy(
                data["codec.npy"], "state/codec.npy", self.path, np.float32, 2 * self.geo.head_dim
            )
            if len(self.codec_params) != self.codec_rows:
                raise MemtxError(f"bank {self.path}: state/codec.npy is damaged (rows)")
        elif bankcodec.trained(self.precision) and (blocks[:, B_DOC] >= 0).any():
            raise MemtxError(f"bank {self.path}: state/codec.npy is missing")
        n_live = int((blocks[:, B_DOC] >= 0).sum()) if len(blocks) else 0
        for layer, h in self.geo.pairs():
            name = f"L{layer}_H{h}.faiss"
            self.indexes[(layer, h)] = parse_index(data[name], f"state/{name}", self.path, self.geo.head_dim, n_live)

    def _init_indexes(self) -> None:
        faiss = _faiss()
        for layer, h in self.geo.pairs():
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
        elif name == "words.bin":
            shape, dt = (slots,), np.uint32
        elif self.precision == "float16":
            shape, dt = (slots, self._slots(name), self.geo.head_dim), np.float16
        else:
            shape, dt = (slots, self._slots(name), bankcodec.code_size(self.precision, self.geo.head_dim)), np.uint8
        mm = np.memmap(self.path / name, dtype=dt, mode="r", shape=shape)
        self._mm[name] = mm
        return mm

    def words_array(self) -> np.memmap | None:
        """(slots,) uint32 word hashes, or None for a bank without words."""
        return self._array("words.bin") if self.has_words else None

    @property
    def codec_rows(self) -> int:  # one codec per (memory layer, keys or values, stored KV head)
        return 2 * len(self.geo.pairs())

    def codecs(self, layer: int, kind: int) -> list[bankcodec.Codec]:
        """The KV heads' codecs of layer `layer`'s keys (kind 0) or values (kind 1)."""
        if self._codecs is None:
            self._codecs = bankcodec.make_codecs(self.precision, self.geo.head_dim, self.codec_params, self.codec_rows)
        before = sum(len(self.geo.stored(ly)) for ly in self.geo.layers[: self.geo.layers.index(layer)])
        n = len(self.geo.stored(layer))
        i = 2 * before + kind * n
        return self._codecs[i : i + n]

    @property
    def needs_training(self) -> bool:
        """A trained codec without parameters yet: the first rows written train it."""
        return bankcodec.trained(self.precision) and self.codec_params is None

    def keys(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.keys"), self.codecs(layer, 0), self.geo.head_dim, self.geo.stored(layer))

    def values(self, layer: int) -> Stored:
        return Stored(self._array(f"L{layer}.values"), self.codecs(layer, 1), self.geo.head_dim, self.geo.stored(layer))

    # ------------------------------------------------------------------ checks
    # ------------------------------------------------------------------ writing
    # ------------------------------------------------------------------ commit
    # ------------------------------------------------------------------ eviction
    # ------------------------------------------------------------------ reading helpers
