"""Reading documents: files or stdin, with one stated encoding policy.

Policy: text is UTF-8 (a BOM is dropped). A file with NUL bytes in its first 8 KiB, or where
more than 1% of the bytes are not valid UTF-8, is binary and refused. A text file with a few
invalid bytes is decoded with U+FFFD replacement and a warning that says how many: one bad
byte in a log or a Latin-1 quote should not stop a 100 MB ingest, but the user should know.

Only regular files are read (never a FIFO, a device or /dev/zero), and nothing larger than
MAX_DOCUMENT_BYTES: a document is streamed through a model token by token, so 256 MiB (about
60M tokens, most of a day on one machine) is more than any single document a user means.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memtx_cli.errors import MemtxError

SNIFF_BYTES = 8192
MAX_BAD_FRACTION = 0.01
MAX_DOCUMENT_BYTES = 256 << 20


@dataclass
class Document:
    name: str  # path as given, or "<stdin>"
    text: str
    n_bytes: int  # size of the raw input
    warnings: list[str] = field(default_factory=list)


def looks_binary(data: bytes) -> bool:
    return b"\0" in data[:SNIFF_BYTES]


def decode_text(data: bytes, name: str) -> tuple[str, list[str]]:
    """Decode per the policy above; raise MemtxError for binary input."""
    if looks_binary(data):
        raise MemtxError(f"{name} looks like a binary file (NUL bytes); memtx reads text")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    # Count bad bytes: a U+FFFD that was not in the input stands for at least one bad byte.
    bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
    if bad > MAX_BAD_FRACTION * max(len(data), 1):
        raise MemtxError(
            f"{name} is not UTF-8 text ({bad} undecodable bytes of {len(data)}); convert it, "
            "e.g. iconv -f latin1 -t utf-8"
        )
    return text, [f"{name}: {bad} invalid UTF-8 byte(s) replaced with U+FFFD"]


def read_bytes(path: str | Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """A regular file's bytes, at most `limit` (MemtxError otherwise). Opened without blocking,
    so a FIFO is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MemtxError(f"no such file: {path}") from None
    except PermissionError:
        raise MemtxError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise MemtxError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise MemtxError(f"{path} is a directory; give a file (memtx ingest reads directories)")
        if not stat.S_ISREG(st.st_mode):
            raise MemtxError(f"{path} is not a regular file (a device, FIFO or socket); memtx reads files")
        if st.st_size > limit:
            raise MemtxError(f"{path} is {st.st_size:,} bytes; memtx reads documents up to {limit:,} bytes: split it")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise MemtxError(f"{path} is over {limit:,} bytes; memtx reads documents up to {limit:,} bytes: split it")
    return data


def read_stdin(limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise MemtxError(f"standard input is over {limit:,} bytes; memtx reads documents up to that: split it")
    return data


def read_document(path: str) -> Document:
    """Read `path` ("-" = stdin) as text, or raise MemtxError with one actionable line."""
    if path == "-":
        data = read_stdin()
        name = "<stdin>"
    else:
        data = read_bytes(path)
        name = path
    text, warnings = decode_text(data, name)
    if not text.strip():
        raise MemtxError(f"{name} is empty: nothing to score")
    return Document(name=name, text=text, n_bytes=len(data), warnings=warnings)


def text_if_unchanged(path: str, sha256: str, size: int) -> str | None:
    """The text of the file at `path` if it is still the one recorded (a regular file of `size`
    bytes and this sha256); None otherwise. Never blocks on a FIFO nor reads a device."""
    import hashlib

    try:
        data = read_bytes(path, limit=size)
    except MemtxError:
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data.decode("utf-8", errors="replace")
