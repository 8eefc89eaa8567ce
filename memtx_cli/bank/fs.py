"""Files of a bank, handled as untrusted: a bank is a directory anybody may have made.

Rules every bank file operation follows:
- a bank holds only regular files and directories: symlinks, FIFOs, devices and sockets are
  refused when it is opened (`check_tree`), and files are opened with O_NOFOLLOW;
- new files are created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW), private (0600, or the
  umask's stricter choice), and replace their target with `os.replace` (atomic);
- a writer modifies only files it has checked: regular, not hard-linked, owned by the user
  (`check_writable`), so a planted file can never redirect a write outside the bank;
- directories are removed only when they are real directories inside the bank (never through
  a link), and only the names a bank uses;
- space is reserved before it is written (`reserve`): a full disk is an error line, never a
  SIGBUS in the middle of a memory-mapped write.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from memtx_cli.errors import MemtxError

FILE_MODE = 0o600
DIR_MODE = 0o700
GEN_NAME = re.compile(r"^[0-9]{6}$")
NOSPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(path: Path | str) -> MemtxError:
    return MemtxError(
        f"no space left on the device of {path}; the bank keeps its last committed state: free "
        f"space (e.g. `memtx bank rm` or `memtx bank compact`) and run the command again"
    )


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NOSPACE


def check_tree(root: Path) -> None:
    """Refuse a bank holding anything but regular files and directories (two levels: the bank
    and state/<generation>/)."""

    def kind(st: os.stat_result) -> str | None:
        if stat.S_ISLNK(st.st_mode):
            return "a symlink"
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return "a special file"
        return None

    def scan(d: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:  # an old generation a writer just deleted
            return
        except OSError as e:
            raise MemtxError(f"bank {root}: cannot list {d}: {e.strerror}") from None
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            bad = kind(st)
            if bad:
                rel = Path(e.path).relative_to(root)
                raise MemtxError(f"bank {root}: {rel} is {bad}; a bank holds only regular files (refused)")
            if depth > 0 and stat.S_ISDIR(st.st_mode):
                scan(Path(e.path), depth - 1)

    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise MemtxError(f"{root} is not a directory")
    scan(root, 2)


def check_writable(path: Path) -> None:
    """A file a writer is about to modify: a regular file of this user, with no other link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MemtxError(f"bank {path.parent}: {path.name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise MemtxError(f"bank {path.parent}: {path.name} is not a regular file (refused)")
    if st.st_nlink != 1:
        raise MemtxError(f"bank {path.parent}: {path.name} has {st.st_nlink} hard links; refusing to write it")
    if st.st_uid != os.geteuid():
        raise MemtxError(f"bank {path.parent}: {path.name} belongs to another user; refusing to write it")


def check_dir_for_writing(path: Path) -> None:
    """A bank directory a writer may use: a real directory of this user, not writable by others."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MemtxError(f"{path} is not a directory (refused)")
    if st.st_uid != os.geteuid():
        raise MemtxError(f"bank {path} belongs to another user; copy it (memtx bank merge) to write it")
    if st.st_mode & stat.S_IWOTH:
        raise MemtxError(f"bank {path} is writable by every user; `chmod o-w {path}` before writing it")


def open_file(path: Path, flags: int) -> int:
    """os.open without following a symlink in the last component; a file it creates is private."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def create_file(path: Path, data: bytes = b"", mode: int = FILE_MODE) -> None:
    """Create `path` exclusively (it must not exist, not even as a link), write, fsync."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.fchmod(fd, mode & ~_umask())
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: written to a fresh private file beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        create_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes (no link followed), refused when larger than `limit`."""
    fd = open_file(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MemtxError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise MemtxError(f"{path} is {st.st_size:,} bytes, more than its bound {limit:,}: damaged or crafted")
        return _read_all(fd, st.st_size)
    finally:
        os.close(fd)


def _read_all(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 24))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def make_dir(path: Path) -> None:
    """mkdir, private; fails if anything (a link included) is already there."""
    os.mkdir(path, DIR_MODE)


def remove_dir(path: Path) -> None:
    """Remove a directory of the bank: never through a link (the link itself is not followed)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise MemtxError(f"{path} is not a directory; not removing it")
    shutil.rmtree(path)  # on Linux rmtree works on file descriptors and never follows links


def reserve(fd: int, offset: int, length: int, where: Path) -> None:
    """Allocate disk blocks for [offset, offset + length) before they are written."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if is_no_space(e):
            raise no_space(where) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@functools.cache
def _fallocate() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the disk blocks of [offset, offset + length) back, keeping the file's size (the
    range then reads as zeros). False where the file system cannot."""
    if length <= 0:
        return True
    fn = _fallocate()
    return fn is not None and fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def refresh_reserve(p: Path, want: int) -> None:
    """Hold `want` bytes of disk in the reserve file `p` (best effort: a full disk has less)."""
    try:
        fd = open_file(p, os.O_RDWR | os.O_CREAT)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size < want:
            os.posix_fallocate(fd, 0, want)
        elif size > 2 * want:
            os.ftruncate(fd, want)
    except OSError:
        pass
    finally:
        os.close(fd)


def release_reserve(p: Path) -> bool:
    """Delete the reserve file `p` (a regular file, not a link); False if there was none."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return False
    os.unlink(p)
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    m = os.umask(0o077)
    os.umask(m)
    return m


def readable_by(path: Path) -> dict[str, str]:
    """Who can read a bank: its directory's owner and mode, in words."""
    import grp
    import pwd

    st = os.stat(path)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    m = st.st_mode
    if m & stat.S_IROTH and m & stat.S_IXOTH:
        who = "everyone"
    elif m & stat.S_IRGRP and m & stat.S_IXGRP:
        who = f"owner {owner} and group {group}"
    else:
        who = f"owner {owner} only"
    return {"readable_by": who, "owner": owner, "group": group, "mode": f"{stat.S_IMODE(m):04o}"}
