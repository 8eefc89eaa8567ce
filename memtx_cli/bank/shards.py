"""Sharded banks: several banks read together as one (`memtx bank shards`, then `--memory SET`).

A shard set is a directory holding `shards.yaml`:

    shards:
      - path: /data/banks/contracts-0      # opened here
      - path: /srv/banks/contracts-1       # opened by a Ray actor on the node 10.0.0.7,
        node: 10.0.0.7                     #   which holds that directory
    ray: auto                              # the cluster remote shards run on (optional)

Every shard is a whole bank, built by the same model with the same geometry. Readers see one
bank: block ids and document ids of shard i are offset by the blocks and documents of the
shards before it, so a block search over the set returns what the same search over one bank
holding every shard's documents returns (the same blocks, other ids), and a score or an answer
read through the set equals the one bank's. Block-mean searches of local shards run in one
`faiss.IndexShards` per (layer, KV head); remote shards answer through their actor
(bank/ray_shards.py) and the results are merged with `faiss.merge_knn_results`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank.format import B_DOC, BlockCounts, DocRecord, _faiss
from memtx_cli.errors import MemtxError

SHARDS_FILE = "shards.yaml"
MAX_SHARDS = 4096
MODEL_KEYS = ("weights_fingerprint", "tokenizer_fingerprint")


@dataclasses.dataclass
class ShardSpec:
    path: str  # the shard bank's directory (on `node` when given)
    node: str | None = None  # a Ray node's address: the shard is served by an actor there


def is_shard_set(path: str | Path) -> bool:
    return (Path(path) / SHARDS_FILE).is_file()


def read_shard_set(path: Path) -> tuple[list[ShardSpec], str | None]:
    """The shards and Ray address a set names (the file is untrusted: plain YAML, checked)."""
    import yaml

    raw = bankfs.read_file(path / SHARDS_FILE, 1 << 20)
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise MemtxError(f"{path / SHARDS_FILE} is not valid YAML") from None
    entries = doc.get("shards") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries or len(entries) > MAX_SHARDS:
        raise MemtxError(f"{path / SHARDS_FILE} must list 1 to {MAX_SHARDS} shards under `shards:`")
    specs = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or set(e) - {"path", "node"}:
            raise MemtxError(f"{path / SHARDS_FILE}: each shard is `path:` (and optionally `node:`)")
        node = e.get("node")
        if node is not None and not isinstance(node, str):
            raise MemtxError(f"{path / SHARDS_FILE}: a shard's node is an address string")
        p = e["path"] if node or os.path.isabs(e["path"]) else str(path / e["path"])
        specs.append(ShardSpec(p, node))
    ray = doc.get("ray")
    if ray is not None and not isinstance(ray, str):
        raise MemtxError(f"{path / SHARDS_FILE}: `ray:` is an address, `auto` or `local`")
    return specs, ray


def write_shard_set(path: Path, specs: list[ShardSpec], ray: str | None = None) -> None:
    """A new shard set at `path` (refuses to replace anything), private to its owner."""
    import yaml

    if os.path.lexists(path):
        raise MemtxError(f"{path} exists; choose a new name for the shard set")
    bankfs.make_dir(path)
    doc: dict[str, Any] = {"shards": [{"path": s.path} | ({"node": s.node} if s.node else {}) for s in specs]}
    if ray:
        doc["ray"] = ray
    bankfs.create_file(path / SHARDS_FILE, yaml.safe_dump(doc, sort_keys=False).encode())


class LocalShard(BlockCounts):
    """A shard opened here: the bank itself."""

    remote = False

    def __init__(self, path: str) -> None:
        from memtx_cli.bank.store import Bank

        self.bank = Bank.open(path, writer=False, verify=False)
        b = self.bank
        self.path, self.manifest, self.geo, self.blocks, self.docs = str(b.path), b.manifest, b.geo, b.blocks, b.docs
        self.has_words = b.has_words

    def gather_many(self, layer: int, kind: int, parts: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """For each (KV head, entry rows), the rows decoded: (n, D) float16."""
        st = self.bank.keys(layer) if kind == 0 else self.bank.values(layer)
        return [st.gather(rows[None], [h])[0] for h, rows in parts]

    def verify_read(self, blocks: np.ndarray, names: list[str]) -> None:
        self.bank.verify_read(blocks, names)

    def block_provenance(self, b: int) -> np.ndarray:
        return self.bank.block_provenance(b)

    def words(self) -> np.ndarray | None:
        return self.bank.words_array()

    def document_text(self, doc: int) -> str | None:
        return self.bank.document_text(doc)

    def close(self) -> None:
        self.bank.close()


def offset_local_indexes(owner: ShardedBank, layer: int, head: int) -> Any:
    """One `faiss.IndexShards` over the local shards' block-mean indexes of (layer, KV head),
    their IDMap2 ids offset in place to global block ids (the shards are private to `owner`)."""
    faiss = _faiss()
    joined = faiss.IndexShards(owner.geo.head_dim, False, False)
    for s, shard in enumerate(owner.shards):
        if not shard.remote:
            index = shard.bank.indexes[(layer, head)]
            ids = faiss.vector_to_array(index.id_map) + owner.base[s]
            faiss.copy_array_to_vector(ids.astype(np.int64), index.id_map)
            index.construct_rev_map()
            joined.add_shard(index)  # the shard's Bank keeps the index alive
    return joined


class ShardedStored:
    """Keys (kind 0) or values (kind 1) of one layer over every shard, gathered by global rows."""

    def __init__(self, owner: ShardedBank, layer: int, kind: int) -> None:
        self.owner, self.layer, self.kind = owner, layer, kind

    def gather(self, rows: np.ndarray, heads: list[int]) -> np.ndarray:
        """(H, ...) global entry rows, rows[i] of KV head heads[i] -> (H, ..., D) float16."""
        rows = np.asarray(rows)
        bs, d = self.owner.geo.block_size, self.owner.geo.head_dim
        out = np.zeros(rows.shape + (d,), dtype=np.float16)
        shard = self.owner.shard_of(rows // bs)
        for s in np.unique(shard).tolist():
            parts, where = [], []
            for i, h in enumerate(heads):
                m = shard[i] == s
                if m.any():
                    parts.append((h, rows[i][m] - self.owner.base[s] * bs))
                    where.append((i, m))
            for (i, m), got in zip(where, self.owner.shards[s].gather_many(self.layer, self.kind, parts), strict=True):
                out[i][m] = got
        return out


class ShardedBank(BlockCounts):
    """Shards read as one bank (the interface memory/bank.py and tasks/chat.py read)."""

    writer = False

    def __init__(self, path: Path, shards: list[Any]) -> None:
        self.path, self.shards = path, shards
        first = shards[0]
        self.manifest, self.geo = first.manifest, first.geo
        for sh in shards[1:]:
            if dataclasses.astuple(sh.geo) != dataclasses.astuple(self.geo):
                raise MemtxError(f"shard {sh.path} has another geometry than {first.path}; shards must match")
            if any(sh.manifest["model"].get(k) != self.manifest["model"].get(k) for k in MODEL_KEYS):
                raise MemtxError(f"shard {sh.path} was built by another model than {first.path}")
        sizes = [len(sh.blocks) for sh in shards]
        self.base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # first global block id
        doc_sizes = [max(sh.docs, default=-1) + 1 for sh in shards]
        self.doc_base = np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64)
        blocks = []
        self.docs: dict[int, DocRecord] = {}
        for s, sh in enumerate(shards):
            b = sh.blocks.copy()
            b[b[:, B_DOC] >= 0, B_DOC] += self.doc_base[s]
            blocks.append(b)
            for i, rec in sh.docs.items():
                g = int(self.doc_base[s] + i)
                self.docs[g] = dataclasses.replace(rec, id=g, blocks=[int(x + self.base[s]) for x in rec.blocks])
        self.blocks = np.concatenate(blocks) if blocks else np.zeros((0, 4), np.int64)
        self.has_words = all(sh.has_words for sh in shards)
        self.local = (  # None without local shards
            {(ly, h): offset_local_indexes(self, ly, h) for ly, h in self.geo.pairs()}
            if any(not sh.remote for sh in shards)
            else None
        )
        self._words: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> ShardedBank:
        from memtx_cli.bank.store import Bank

        path = Path(path)
        specs, ray = read_shard_set(path)
        shards: list[Any] = []
        try:
            for spec in specs:
                if spec.node:
                    from memtx_cli.bank.ray_shards import RemoteShard

                    shards.append(RemoteShard(spec, ray))
                elif Bank.is_bank(Path(spec.path)):
                    shards.append(LocalShard(spec.path))
                else:
                    raise MemtxError(f"shard {spec.path} of {path} is not a memtx bank")
            return cls(path, shards)
        except BaseException:
            for sh in shards:
                sh.close()
            raise

    # the read interface of Bank
    @property
    def capacity_blocks(self) -> int:
        return int(self.base[-1])

    @property
    def precision(self) -> str:
        kinds = {sh.manifest.get("dtype", "float16") for sh in self.shards}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def shard_of(self, blocks: np.ndarray) -> np.ndarray:
        """The shard index of global block ids (any shape)."""
        return np.searchsorted(self.base, np.asarray(blocks), side="right") - 1

    def keys(self, layer: int) -> ShardedStored:
        return ShardedStored(self, layer, 0)

    def values(self, layer: int) -> ShardedStored:
        return ShardedStored(self, layer, 1)

    def search_heads(self, layer: int, heads: list[int], x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Bank.search_heads over every shard: remote shards asked once for all heads, in
        parallel with the local shards' `IndexShards`; the best k of each head kept."""
        faiss = _faiss()
        x = np.ascontiguousarray(x, dtype=np.float32)
        pending = [(s, sh.search_heads_async(layer, heads, x, k)) for s, sh in enumerate(self.shards) if sh.remote]
        parts = []
        if self.local is not None:
            local = [self.local[(layer, h)].search(x[i], k) for i, h in enumerate(heads)]
            parts.append((np.stack([d for d, _ in local]), np.stack([i for _, i in local])))
        for s, ref in pending:
            d, i = self.shards[s].wait(ref)
            parts.append((d, np.where(i >= 0, i + self.base[s], -1)))
        if len(parts) == 1:
            return parts[0]
        h, q = x.shape[:2]
        d = np.stack([p[0].reshape(h * q, k) for p in parts])
        i = np.stack([p[1].reshape(h * q, k) for p in parts])
        d, i = faiss.merge_knn_results(d, i, keep_max=True)
        return d.reshape(h, q, k), i.reshape(h, q, k)

    def verify_read(self, blocks: np.ndarray, names: list[str]) -> None:
        ids = np.unique(np.asarray(blocks).reshape(-1))
        ids = ids[(ids >= 0) & (ids < self.capacity_blocks)]
        shard = self.shard_of(ids)
        for s in np.unique(shard).tolist():
            self.shards[s].verify_read(ids[shard == s] - self.base[s], names)

    def block_provenance(self, b: int) -> np.ndarray:
        s = int(self.shard_of(np.asarray([b]))[0])
        rows = np.array(self.shards[s].block_provenance(int(b - self.base[s])))
        rows[:, 0] += self.doc_base[s]
        return rows

    def words_array(self) -> np.ndarray | None:
        if not self.has_words:
            return None
        if self._words is None:
            self._words = np.concatenate([np.asarray(sh.words()) for sh in self.shards])
        return self._words

    def document_text(self, doc: int) -> str | None:
        s = int(np.searchsorted(self.doc_base, doc, side="right") - 1)
        return self.shards[s].document_text(int(doc - self.doc_base[s]))

    def close(self) -> None:
        for sh in self.shards:
            sh.close()

    def __enter__(self) -> ShardedBank:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_shard_set(out: Path, local: list[str], remote: list[str], ray: str | None = None) -> dict[str, Any]:
    """Write a shard set naming `local` shard banks (paths here) and `remote` ones
    ("NODE=PATH": a bank on a Ray node), then open it once to check the shards match. A set
    that does not open is removed again. Returns what `bank info` says of it."""
    specs = [ShardSpec(str(Path(p).resolve())) for p in local]
    for r in remote:
        node, sep, p = r.partition("=")
        if not sep or not node or not p:
            raise MemtxError(f"--remote takes NODE=PATH (a Ray node's address and the bank's path there), got {r!r}")
        specs.append(ShardSpec(p, node))
    if not specs:
        raise MemtxError("a shard set needs at least one shard")
    write_shard_set(out, specs, ray)
    try:
        with ShardedBank.open(out) as sb:
            return shard_set_info(sb)
    except BaseException:
        (out / SHARDS_FILE).unlink()
        out.rmdir()
        raise


def shard_set_info(sb: ShardedBank) -> dict[str, Any]:
    return {
        "shards": [{"path": sh.path, "documents": len(sh.docs), "blocks": len(sh.live_blocks)} for sh in sb.shards],
        "documents": len(sb.docs),
        "entries": sb.entries,
        "blocks": len(sb.live_blocks),
        "block_size": sb.geo.block_size,
        "dtype": sb.precision,
        "words": sb.has_words,
        "model": sb.manifest["model"],
    }
