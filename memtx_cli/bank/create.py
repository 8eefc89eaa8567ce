"""Creating a bank: built in a private directory beside its path and renamed into place."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memtx_cli.bank import fs as bankfs
from memtx_cli.bank import lock as banklock
from memtx_cli.bank.codec import CODECS
from memtx_cli.bank.format import FORMAT, VERSION, Geometry
from memtx_cli.errors import MemtxError


def create_bank(
    cls: type,
    path: Path,
    model: dict[str, Any],
    geo: Geometry,
    config: dict[str, Any],
    evict: dict,
    precision: str = "float16",
    words: bool = True,
) -> Any:
    """A new, empty, committed bank at `path`, open for writing. It is built in a private
    directory beside `path` and renamed into place, so `path` is a whole bank or nothing."""
    if precision not in CODECS:
        raise MemtxError(f"precision must be one of {', '.join(CODECS)}, got {precision!r}")
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
        "words": words,
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


def _remove_unfinished(path: Path) -> None:
    """Remove what killed creations of `path` left beside it: directories named as only
    Bank.create names them (`.NAME.<random>.memtx-new`), this user's, holding only bank files,
    whose creator is gone (their lock is free)."""
    import fcntl

    bank_names = re.compile(
        r"^(manifest\.yaml|lock|reserve|state|provenance\.bin|words\.bin|L\d+\.(keys|values)|\..*\.tmp)$"
    )
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
