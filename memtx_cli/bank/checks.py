"""A bank's checks and summary: every block's crc32, ids aligned, what it holds and who can read it."""

from __future__ import annotations

import os
import zlib
from typing import Any

import numpy as np

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank.format import (
    B_DOC,
    B_VALID,
    _faiss,
)
from memtx_cli.errors import MemtxError


class BankChecks:
    """Verification and description of a Bank (mixed into Bank)."""

    def provenance(self) -> np.memmap:
        return self._array("provenance.bin")

    def block_provenance(self, b: int) -> np.ndarray:
        """(valid entries, 3) document id, token offset, character offset of block `b`'s
        entries, checked (crc32) before they are read."""
        self.verify_read(np.asarray([b]), ["provenance.bin"])
        bs = self.geo.block_size
        return np.asarray(self.provenance()[b * bs : b * bs + int(self.blocks[b, B_VALID])])

    def search_heads(self, layer: int, heads: list[int], x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block-mean search of layer `layer` for each KV head heads[i] with queries x[i]
        (H, Q, D): scores and block ids (H, Q, k), -1 where there are fewer blocks."""
        got = [
            self.indexes[(layer, h)].search(np.ascontiguousarray(x[i], dtype=np.float32), k)
            for i, h in enumerate(heads)
        ]
        return np.stack([d for d, _ in got]), np.stack([i for _, i in got])

    def document_text(self, doc: int) -> str | None:
        """Document `doc`'s text when the file it was read from is still the one ingested (a
        regular file of the recorded size and sha256); None otherwise, or for a conversation."""
        from memtx_cli.bank.reader import text_if_unchanged

        rec = self.docs[doc]
        return None if rec.path.startswith("chat:") else text_if_unchanged(rec.path, rec.sha256, rec.size)

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

    def verify_read(self, blocks: np.ndarray, names: list[str]) -> None:
        """Verify the crc32 of `blocks` (-1 = none) in the data files `names`, each the first
        time it is read: a reader opened without the full check (`Bank.open(verify=False)`)
        checks what it reads, so opening costs nothing per block and damage is still never
        read. A writer reads nothing through here."""
        if self.writer:
            return
        if self._verified.shape != self.crc.shape:
            self._verified = np.zeros(self.crc.shape, dtype=bool)
        ids = np.unique(np.asarray(blocks).reshape(-1))
        ids = ids[(ids >= 0) & (ids < self.capacity_blocks)]
        for name in names:
            fi = self.data_files.index(name)
            todo = ids[~self._verified[ids, fi]]
            if not len(todo):
                continue
            raw, rb = self._raw(name), self._block_bytes(name)
            for b in todo.tolist():
                if zlib.crc32(raw[b * rb : (b + 1) * rb]) != int(self.crc[b, fi]):
                    raise MemtxError(
                        f"bank {self.path}: {name} is damaged (checksum mismatch in block {b}); "
                        f"run `memtx bank verify {self.path}`"
                    )
            self._verified[todo, fi] = True

    def _raw(self, name: str) -> np.memmap:
        """A data file's bytes, memory-mapped read-only (what `verify_read` checksums)."""
        key = f"{name}:raw"
        n = self.capacity_blocks * self._block_bytes(name)
        mm = self._mm.get(key)
        if mm is None or mm.shape[0] != n:
            mm = np.memmap(self.path / name, dtype=np.uint8, mode="r", shape=(n,))
            self._mm[key] = mm
        return mm

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
            self._verified = np.ones(self.crc.shape, dtype=bool)  # a bank with any problem is refused whole
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
            "stored_heads": len(self.geo.pairs()),
            "head_dim": self.geo.head_dim,
            "dtype": self.precision,
            "words": self.has_words,
            "eviction": self.manifest.get("eviction"),
            "settings": self.manifest["config"],
            "generation": self.generation,
            "updated_at": self.manifest.get("updated_at"),
            **bankfs.readable_by(self.path),
        }
