"""Who holds a bank: one writer (`lock`), and readers registered per state generation.

A reader holds a shared flock on `state/<gen>/readers` of the generation it opened, for as long
as it is open. It takes the lock and then checks that the manifest still names that
generation (else it retries with the newer one), so a writer that finds the lock free may
delete the generation: nobody opened it, and nobody can any more.

A writer keeps every generation some reader holds (its state files stay readable), and reuses
a block freed at generation f only when no reader holds a generation older than f: a reader
never sees data change under it, and a writer reuses space as soon as the last reader that
could see it has gone, instead of never.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from memtx_cli.bank.fs import FILE_MODE, GEN_NAME, open_file, remove_dir
from memtx_cli.errors import MemtxError

READERS = "readers"


class BankBusy(MemtxError):
    """Another process is writing the bank."""


def writer_lock(path: Path, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> int:
    """The exclusive writer lock; waits up to `wait` seconds (saying so once) for another writer."""
    try:
        fd = open_file(path / "lock", os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MemtxError(f"bank {path}: lock is a symlink (refused)") from None
        raise MemtxError(f"bank {path}: cannot open its lock file ({e.strerror})") from None
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise BankBusy(f"bank {path} is being written by another memtx process; try again later") from None
            if on_wait is not None and not told:
                on_wait(f"bank {path} is being written by another memtx process; waiting up to {wait:.0f} s")
                told = True
            time.sleep(0.1)


def _readers_file(path: Path, gen: int) -> Path:
    return path / "state" / f"{gen:06d}" / READERS


def reader_lock(path: Path, gen: int) -> tuple[int | None, bool]:
    """A shared lock on generation `gen`: (fd, False); (None, True) when the caller must read
    the manifest again (a writer deleted or is deleting that generation); (None, False) when
    no lock can be taken at all (a read-only bank without the file: nobody here writes it)."""
    p = _readers_file(path, gen)
    if not p.parent.is_dir():
        return None, True
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = open_file(p, flags)
            break
        except FileNotFoundError:
            return None, True
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise MemtxError(f"bank {path}: {p.relative_to(path)} is a symlink (refused)") from None
            continue
    if fd is None:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a writer is deleting this generation right now
        os.close(fd)
        return None, True
    return fd, False


def generations(path: Path) -> list[int]:
    """The state generations present on disk."""
    try:
        names = os.listdir(path / "state")
    except OSError:
        return []
    return sorted(int(n) for n in names if GEN_NAME.match(n))


def _try_exclusive(path: Path, gen: int) -> int | None:
    """An exclusive lock on `gen`'s readers file (nobody reads it), or None (someone does). A
    generation without the file has no reader."""
    p = _readers_file(path, gen)
    try:
        fd = open_file(p, os.O_RDWR | os.O_CREAT)
        os.fchmod(fd, FILE_MODE)
    except OSError:
        return -1 if not p.parent.exists() else None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def held_generations(path: Path) -> list[int]:
    """Generations some reader holds (the current one included)."""
    held = []
    for g in generations(path):
        fd = _try_exclusive(path, g)
        if fd is None:
            held.append(g)
        elif fd >= 0:
            os.close(fd)
    return held


def drop_unread(path: Path, current: int) -> None:
    """Delete every generation other than `current` that no reader holds (each removed while
    its lock is held, so no reader can take it meanwhile)."""
    for g in generations(path):
        if g == current:
            continue
        fd = _try_exclusive(path, g)
        if fd is None:
            continue
        try:
            d = path / "state" / f"{g:06d}"
            if d.exists():
                remove_dir(d)
        except OSError:
            pass  # a reader raced in (it will retry with the current generation): next time
        finally:
            if fd >= 0:
                os.close(fd)
