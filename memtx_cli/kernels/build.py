"""Building and loading the C kernels: compiled on first use with the system C compiler (`$CC`,
else `cc`) into a per-user cache, loaded through ctypes only from a private file. Two
libraries: attn.c and linear.c for CPUs with AVX512-BF16 (`load`), quant.c for any x86-64 CPU
with AVX2 and FMA (`load_portable`).

Each returns None whenever its kernels cannot run here (no compiler, a CPU without the
instructions, not Linux, MEMTX_KERNEL=0 via `enabled()`); callers then use torch's kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("attn.c", "linear.c")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"}
PORTABLE_SOURCES = [Path(__file__).with_name("quant.c")]
PORTABLE_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
PORTABLE_CPU_FLAGS = {"avx2", "fma"}

_P, _I = ctypes.c_void_p, ctypes.c_int64  # pointer, int64_t
SIGNATURES = {  # each returns 0, or non-zero when out of memory (or shapes out of range)
    "memtx_attention": [_P] * 4 + [_I] * 7 + [ctypes.c_float] + [_P] * 4 + [ctypes.c_int],
    "memtx_block_max": [_P] * 2 + [_I] * 7 + [_P, ctypes.c_int],
    "memtx_block_attention": [_P] * 6 + [_I] * 8 + [ctypes.c_float, _P, _P, _I, _P, _P, ctypes.c_int],
    "memtx_far_attention": [_P] * 5 + [_I] * 4 + [ctypes.c_float] * 2 + [_P] * 2 + [_I] * 2 + [_P] * 3 + [ctypes.c_int],
    "memtx_block_pick": [_P] * 3 + [_I] * 9 + [_P] * 2 + [ctypes.c_int],
    "memtx_pack_rows": [_P] * 2 + [_I] * 4 + [_P] * 2 + [_I, ctypes.c_int],
    "memtx_linear": [_P] * 2 + [_I] * 3 + [_P, ctypes.c_int],
}
PORTABLE_SIGNATURES = {n: [_P] * 3 + [_I] * 3 + [_P, ctypes.c_int] for n in ("memtx_q4_linear", "memtx_q8_linear")}

_lib: ctypes.CDLL | None = None
_tried = False
_portable: ctypes.CDLL | None = None
_portable_tried = False


def enabled() -> bool:
    """MEMTX_KERNEL=0 turns the kernel off (torch's kernel everywhere), e.g. for A/B timing."""
    return os.environ.get("MEMTX_KERNEL", "1") != "0"


def _cpu_ok(wanted: set[str] = CPU_FLAGS) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to check the flags, so no kernel
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return wanted <= set(line.split(":", 1)[1].split())
    return False


def cache_dir() -> Path | None:
    """Where compiled kernels are kept: the weights cache's root (model/loading.py) + kernels/;
    None with MEMTX_NO_CACHE=1 (then each process compiles into a temporary directory)."""
    if os.environ.get("MEMTX_NO_CACHE"):
        return None
    root = os.environ.get("MEMTX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memtx")
    return Path(root) / "kernels"


def _private_dir(d: Path) -> bool:
    """A directory only this user can write: owned by us, no group/other write, not a link."""
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _trusted_file(p: Path) -> bool:
    """A compiled kernel we may load: a regular file (not a link) owned by us, writable by
    nobody else, in a private directory."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022 and _private_dir(p.parent)


def _compile(out: Path, sources: list[Path], flags: list[str]) -> None:
    """Compile `sources` into `out`: into a file beside it, then renamed (atomic)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, *flags, "-shared", "-fPIC", *map(str, sources), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_name(sources: list[Path] = SOURCES, flags: list[str] = FLAGS) -> str:
    """The cached library's file name: a hash of the sources, the compiler and its flags."""
    src = b"".join(p.read_bytes() for p in sources)
    tag = hashlib.sha256(src + " ".join([os.environ.get("CC", "cc"), *flags]).encode()).hexdigest()[:16]
    return f"{'attn_kernel' if sources == SOURCES else 'portable_kernel'}-{tag}.so"


def _open(sources: list[Path] = SOURCES, flags: list[str] = FLAGS) -> ctypes.CDLL:
    """The compiled library for these sources, compiler and flags (compiled now if not cached).
    A cached file is loaded only if it is ours in a directory only we can write (it is code
    this process runs); anything else there is never loaded: we compile privately instead."""
    name = library_name(sources, flags)
    where = cache_dir()
    if where is not None:
        try:
            where.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            pass
        out = where / name
        if _private_dir(where):
            if not os.path.lexists(out):
                _compile(out, sources, flags)
            if _trusted_file(out):
                return ctypes.CDLL(str(out))
        log.warning("memtx: the kernel cache %s is not private to this user; compiling the kernel privately", where)
    with tempfile.TemporaryDirectory() as tmp:  # a loaded library outlives its file on Linux
        out = Path(tmp) / name
        _compile(out, sources, flags)
        return ctypes.CDLL(str(out))


def _build(sources: list[Path], flags: list[str], cpu: set[str], signatures: dict, what: str) -> ctypes.CDLL | None:
    """The library of `sources`, or None when it cannot run here; a library that does not load
    or lacks a function falls back to torch's kernel with one warning."""
    if not _cpu_ok(cpu):
        log.debug("%s: CPU without %s (or not Linux); using torch's kernel", what, ", ".join(sorted(cpu)))
        return None
    try:
        lib = _open(sources, flags)
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, args
    except (FileNotFoundError, subprocess.SubprocessError) as e:  # no compiler, or it failed
        detail = getattr(e, "stderr", b"") or b""
        log.debug("%s: not built (%s %s); using torch's kernel", what, e, detail.decode(errors="replace")[:500])
        return None
    except (OSError, AttributeError) as e:
        log.warning("memtx: the compiled %s is unusable (%s); using torch's kernel", what, e)
        return None
    return lib


def load() -> ctypes.CDLL | None:
    """The AVX512-BF16 kernels (attn.c, linear.c), or None (tried once per process)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build(SOURCES, FLAGS, CPU_FLAGS, SIGNATURES, "attention kernel")
    return _lib


def load_portable() -> ctypes.CDLL | None:
    """The AVX2 kernels (quant.c), or None (tried once per process)."""
    global _portable, _portable_tried
    if not _portable_tried:
        _portable_tried = True
        _portable = _build(
            PORTABLE_SOURCES, PORTABLE_FLAGS, PORTABLE_CPU_FLAGS, PORTABLE_SIGNATURES, "quantized-weights kernel"
        )
    return _portable
