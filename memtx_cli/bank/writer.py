"""A bank's writer: blocks allocated where no reader looks, written, committed; space given back."""

from __future__ import annotations

import hashlib
import os
import zlib

import numpy as np

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank import lock as banklock
from memtx_cli.bank.codec import FaissSQ, Stored
from memtx_cli.bank.format import (
    B_DOC,
    B_SEQ,
    B_USED,
    B_VALID,
    FREE_ROW,
    RESERVE_SLACK,
    DocRecord,
    docs_bytes,
    index_bytes,
    manifest_checksum,
    now,
    npy_bytes,
)
from memtx_cli.errors import MemtxError


class BankWriter:
    """Writes of a Bank opened as its writer (mixed into Bank)."""

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
        for lo, hi in _runs(free):
            for name in self.data_files:
                rb = self._block_bytes(name)
                bankfs.reserve(self._fds[name], lo * rb, (hi - lo) * rb, self.path)
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

    def write_blocks(
        self,
        blocks: list[int],
        kv: dict[int, tuple[np.ndarray, np.ndarray]],  # layer -> keys, values (n, stored KV, D) float16
        prov: np.ndarray,  # (n, 3) int64
        words: np.ndarray | None = None,  # (n,) uint32 word hashes; None = none known
    ) -> None:
        """Write n consecutive rows into free blocks (block_size rows each, the last one padded;
        not yet committed): one write per file for each run of consecutive block ids, a crc per
        block."""
        bs = self.geo.block_size
        n = prov.shape[0]
        if len(blocks) != -(-n // bs):
            raise ValueError(f"{n} rows need {-(-n // bs)} blocks, got {len(blocks)}")
        rows = len(blocks) * bs
        arrays = []
        for layer in self.geo.layers:
            for kind, arr in enumerate(kv[layer]):
                arrays.append(_padded(Stored.encode(arr, self.codecs(layer, kind)), rows, 0))
        arrays.append(_padded(np.asarray(prov, np.int64), rows, -1))
        if self.has_words:
            arrays.append(_padded(np.zeros(n, np.uint32) if words is None else np.asarray(words, np.uint32), rows, 0))
        for fi, (name, arr) in enumerate(zip(self.data_files, arrays, strict=True)):
            self._put_runs(fi, name, blocks, arr)

    def _put_runs(self, fi: int, name: str, blocks: list[int], rows: np.ndarray) -> None:
        """rows (len(blocks) * block_size, ...), contiguous, into `blocks`, each run of consecutive
        ids at once (written and checksummed from the array itself, no copy)."""
        data = memoryview(rows).cast("B")
        rb = len(data) // len(blocks)
        i = 0
        for lo, hi in _runs(blocks):
            m = hi - lo
            try:
                bankfs.pwrite_all(self._fds[name], data[i * rb : (i + m) * rb], lo * rb)
            except OSError as e:
                if bankfs.is_no_space(e):
                    raise bankfs.no_space(self.path) from None
                raise
            for k in range(m):
                self._crc_new[(lo + k, fi)] = zlib.crc32(data[(i + k) * rb : (i + k + 1) * rb])
            i += m

    def train_codec(self, kv: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Train the bank's codec on its first rows (layer -> keys, values (n, stored KV, D)): one
        FAISS scalar quantizer per layer, keys or values, and stored KV head. Its parameters are committed
        with the state; only a bank that holds nothing yet is trained."""
        if len(self.live_blocks):
            raise MemtxError(f"bank {self.path}: its codec is trained once, before it holds anything")
        rows = []
        for layer in self.geo.layers:
            for arr in kv[layer]:
                rows += [FaissSQ.train(self.precision, arr[:, s].astype(np.float32)) for s in range(arr.shape[1])]
        self.codec_params = np.stack(rows).astype(np.float32)
        self._codecs = None
        self.manifest["codec_trained"] = True

    def flush(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def reps(self, layer: int, blocks: list[int]) -> np.ndarray:
        """(len(blocks), stored KV, D) float32 mean keys of the given blocks (valid entries only)."""
        bs = self.geo.block_size
        keys = self.keys(layer)
        out = np.zeros((len(blocks), len(self.geo.stored(layer)), self.geo.head_dim), np.float32)
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
            for s, h in enumerate(self.geo.stored(layer)):
                self.indexes[(layer, h)].add_with_ids(np.ascontiguousarray(r[:, s]), ids)

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
        if self.codec_params is not None:
            payload["codec.npy"] = npy_bytes(self.codec_params)
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


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Runs [lo, hi) of consecutive ids, in the order given."""
    out: list[tuple[int, int]] = []
    for b in ids:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def _padded(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """a (n, ...) padded with `fill` to `rows` rows."""
    if a.shape[0] == rows:
        return np.ascontiguousarray(a)
    out = np.full((rows, *a.shape[1:]), fill, a.dtype)
    out[: a.shape[0]] = a
    return out
