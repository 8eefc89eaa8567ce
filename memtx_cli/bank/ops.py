"""Operations on whole banks: verify, remove documents, compact, merge."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank import lock as banklock
from memtx_cli.bank.format import B_VALID, DocRecord, check_model
from memtx_cli.bank.store import Bank
from memtx_cli.errors import MemtxError, UsageError


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


def remove_documents(bank: Bank, keys: list[str]) -> list[str]:
    """Remove documents by id, path or alias, and commit; then give the space back. A name is
    removed, not content: removing an alias removes that alias, and removing a document's own
    path while identical content was also ingested under another path keeps the memories under
    that other path. A document goes (with its memories) when its last name goes. Every key is
    checked before anything changes. Returns one line per key."""
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"{dup!r} is given twice")
    plan: list[tuple[DocRecord, str | None]] = []  # (document, the name removed; None = all)
    for key in keys:
        rec = bank.find_doc(key)
        if rec is None and not key.isdigit():
            rec = bank.find_doc(str(Path(key).resolve()))
            key = str(Path(key).resolve()) if rec is not None else key
        if rec is None:
            raise MemtxError(f"no document {key!r} in {bank.path} (see memtx bank info {bank.path})")
        name = None if key == str(rec.id) else key
        if (rec.id, name) in {(r.id, n) for r, n in plan} or (rec.id, None) in {(r.id, n) for r, n in plan}:
            raise UsageError(f"{key!r} names a document given before")
        plan.append((rec, name))
    done = []
    bank.frees_space = True
    for rec, name in plan:
        if rec.id not in bank.docs:
            continue
        names = [rec.path, *rec.aliases]
        if name is None or names == [name]:
            bank.remove_document(rec.id)
            done.append(f"{rec.path} ({rec.entries:,} entries)")
        elif name in rec.aliases:
            rec.aliases.remove(name)
            done.append(f"{name} (an alias; {rec.path} kept)")
        else:  # its own path, with aliases: the first alias becomes its path
            rec.path = rec.aliases.pop(0)
            done.append(f"{name} (its memories kept under {rec.path})")
    bank.commit()
    bank.trim()
    bank.give_back()
    return done


def compact(bank: Bank) -> dict[str, Any]:
    """Move live blocks from the end of the files into free blocks no reader can see, commit,
    then give back the end of the files (and the space of any block still free)."""
    before = bank.info()["bytes_on_disk"]
    bank.frees_space = True
    free = sorted(int(b) for b in bank.reusable_blocks())
    live = sorted(int(b) for b in bank.live_blocks)
    moved = 0
    owner = {b: d for d in bank.docs.values() for b in d.blocks}
    while free and live and free[0] < live[-1]:
        dst, src = free.pop(0), live.pop()
        _move_block(bank, src, dst)
        rec = owner[src]
        rec.blocks = [dst if b == src else b for b in rec.blocks]
        moved += 1
    if moved:
        bank.commit()
    bank.trim()
    released = bank.give_back()
    return {
        "moved_blocks": moved,
        "released_blocks": released,
        "bytes_before": before,
        "bytes_after": bank.info()["bytes_on_disk"],
        "readers": len(banklock.held_generations(bank.path)),
    }


def _move_block(bank: Bank, src: int, dst: int) -> None:
    """Copy block src's bytes into free block dst and make dst take its place (ids, crc, index)."""
    for name, fd in bank._fds.items():
        rb = bank._block_bytes(name)
        data = os.pread(fd, rb, src * rb)
        bankfs.reserve(fd, dst * rb, rb, bank.path)
        bankfs.pwrite_all(fd, data, dst * rb)
    row = bank.blocks[src].copy()
    for idx in bank.indexes.values():
        vec = idx.reconstruct(int(src))
        idx.remove_ids(np.asarray([src], np.int64))
        idx.add_with_ids(vec[None], np.asarray([dst], np.int64))
    bank.crc[dst] = bank.crc[src]
    bank.blocks[dst] = row
    bank.blocks[src] = [-1, 0, bank.generation + 1, -1]
    bank.crc[src] = 0


def merge_banks(sources: list[Path], out: Path) -> dict[str, Any]:
    """A new bank holding the documents of all `sources` (identical content kept once)."""
    if not sources:
        raise MemtxError("bank merge needs at least one bank")
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists; bank merge writes a new bank")
    opened: list[Bank] = []
    try:
        for p in sources:
            opened.append(Bank.open(p, verify=True))
        first = opened[0]
        for b in opened[1:]:
            check_model(first, b.manifest["model"])
            if asdict(b.geo) != asdict(first.geo):
                raise MemtxError(f"bank {b.path} has different memory layers or block size than {first.path}")
        for b in opened[1:]:
            if b.precision != first.precision:
                raise MemtxError(f"bank {b.path} stores {b.precision}, {first.path} {first.precision}: cannot merge")
        dst = Bank.create(
            out,
            first.manifest["model"],
            first.geo,
            first.manifest["config"],
            {"capacity": 0},
            first.precision,
            words=all(b.has_words for b in opened),
        )
        if first.codec_params is not None:  # one trained codec: the first bank's; others re-encode
            dst.codec_params, dst._codecs = first.codec_params, None
            dst.manifest["codec_trained"] = True
        try:
            for src in opened:
                for rec in sorted(src.docs.values(), key=lambda d: d.id):
                    copy_document(src, rec, dst)
            return {"documents": len(dst.docs), "entries": dst.entries}
        finally:
            dst.close()
    finally:
        for b in opened:
            b.close()


def copy_document(src: Bank, rec: DocRecord, dst: Bank) -> None:
    """Copy document `rec` of `src` into `dst` (decoded, encoded in dst's codec) and commit."""
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
        words = src.words_array()
        (nb,) = dst.allocate(1, set(new_blocks))
        dst.write_blocks([nb], kv, prov, None if words is None else np.array(words[rows]))
        new_blocks.append(nb)
        valid.append(n)
    dst.attach_blocks(doc_id, new_blocks, valid)
    d = DocRecord(**{**asdict(rec), "id": doc_id, "blocks": new_blocks})
    dst.add_document(d)
    dst.commit()
