"""Remote shards: a shard bank served by a Ray actor on the node whose disk holds it.

`ShardServer` opens the bank there, read-only, and answers what a reader asks of a shard:
block-mean searches, rows of keys or values, checksums, provenance, words and document text.
`RemoteShard` is its handle on the reading side, with the interface of `shards.LocalShard`.
The actor is placed with Ray's `node:<address>` resource, so it runs where the files are; it
takes no CPU from the cluster's accounting (it only answers reads)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memtx_cli.bank.format import BlockCounts, DocRecord, Geometry
from memtx_cli.bank.shards import LocalShard, ShardSpec
from memtx_cli.errors import MemtxError


class ShardServer:
    """The serving side (a Ray actor): one shard bank, opened once."""

    def __init__(self, path: str) -> None:
        self.shard = LocalShard(path)

    def meta(self) -> dict[str, Any]:
        sh = self.shard
        return {
            "path": sh.path,
            "manifest": sh.manifest,
            "geo": dataclasses.asdict(sh.geo),
            "blocks": sh.blocks,
            "docs": [dataclasses.asdict(d) for d in sh.docs.values()],
            "has_words": sh.has_words,
        }

    def search_heads(self, layer: int, heads: list[int], x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.bank.search_heads(layer, heads, x, k)

    def gather_many(self, layer: int, kind: int, parts: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Rows decoded, their blocks' checksums verified here first (the reader skips the
        separate round trip for keys and values: see RemoteShard.verify_read)."""
        bs = self.shard.geo.block_size
        blocks = np.concatenate([rows.reshape(-1) // bs for _, rows in parts]) if parts else np.zeros(0, np.int64)
        self.shard.verify_read(blocks, [f"L{layer}.{'keys' if kind == 0 else 'values'}"])
        return self.shard.gather_many(layer, kind, parts)

    def verify_read(self, blocks: np.ndarray, names: list[str]) -> None:
        self.shard.verify_read(blocks, names)

    def block_provenance(self, b: int) -> np.ndarray:
        return self.shard.block_provenance(b)

    def words(self) -> np.ndarray | None:
        w = self.shard.words()
        return None if w is None else np.array(w)

    def document_text(self, doc: int) -> str | None:
        return self.shard.document_text(doc)


class RemoteShard(BlockCounts):
    """A shard served by a `ShardServer` actor: the reading side."""

    remote = True

    def __init__(self, spec: ShardSpec, address: str | None) -> None:
        from memtx_cli.bank.ray_ingest import connect

        self.ray = connect(address or "auto", 1)
        where = {} if spec.node == "*" else {"resources": {f"node:{spec.node}": 0.001}}
        self.actor = self.ray.remote(ShardServer).options(num_cpus=0, **where).remote(spec.path)
        self.path = f"{spec.node}:{spec.path}"
        meta = self._get(self.actor.meta.remote())
        self.manifest, self.blocks, self.has_words = meta["manifest"], meta["blocks"], meta["has_words"]
        self.geo = Geometry(**meta["geo"])
        self.docs = {d["id"]: DocRecord(**d) for d in meta["docs"]}

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except Exception as e:  # the actor's error, or a lost node: one line naming the shard
            cause = getattr(e, "cause", None) or e
            msg = str(cause).strip().splitlines()
            raise MemtxError(f"shard {self.path}: {msg[-1] if msg else type(cause).__name__}") from None

    def search_heads_async(self, layer: int, heads: list[int], x: np.ndarray, k: int) -> Any:
        return self.actor.search_heads.remote(layer, heads, x, k)

    def wait(self, ref: Any) -> Any:
        return self._get(ref)

    def gather_many(self, layer: int, kind: int, parts: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        return self._get(self.actor.gather_many.remote(layer, kind, parts))

    def verify_read(self, blocks: np.ndarray, names: list[str]) -> None:
        names = [n for n in names if not n.endswith((".keys", ".values"))]  # verified by gather_many
        if names:
            self._get(self.actor.verify_read.remote(blocks, names))

    def block_provenance(self, b: int) -> np.ndarray:
        return self._get(self.actor.block_provenance.remote(b))

    def words(self) -> np.ndarray | None:
        return self._get(self.actor.words.remote())

    def document_text(self, doc: int) -> str | None:
        return self._get(self.actor.document_text.remote(doc))

    def close(self) -> None:
        try:
            self.ray.kill(self.actor)
        except Exception:  # already gone with its node: nothing to release here
            pass
