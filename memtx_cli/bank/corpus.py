"""Which files an ingest reads: paths, directories (recursive, .gitignore honoured), stdin lists,
--include / --exclude globs. Pure filesystem logic (no model): every refusal is a MemtxError
or a recorded skip with its reason."""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memtx_cli.errors import MemtxError


@dataclass
class Selection:
    files: list[Path] = field(default_factory=list)  # absolute, resolved, in a stable order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


class GitIgnore:
    """The subset of .gitignore rules people use: globs, `dir/`, `/anchored`, `**`, `!negation`,
    comments. Rules of a .gitignore apply below its directory; later rules win."""

    def __init__(self) -> None:
        self.rules: list[tuple[Path, str, bool, bool, bool]] = []  # base, pattern, neg, dir_only, anchored

    def add_file(self, gi: Path) -> None:
        try:
            lines = gi.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            if neg:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = "/" in line
            self.rules.append((gi.parent, line.lstrip("/"), neg, dir_only, anchored))

    def ignored(self, path: Path, is_dir: bool) -> bool:
        out = False
        for base, pat, neg, dir_only, anchored in self.rules:
            if dir_only and not is_dir:
                continue
            try:
                rel = path.relative_to(base).as_posix()
            except ValueError:
                continue
            target = rel if anchored else path.name
            if fnmatch.fnmatchcase(target, pat) or (anchored and _match_globstar(rel, pat)):
                out = not neg
        return out


def _match_globstar(rel: str, pat: str) -> bool:
    if "**" not in pat:
        return False
    return fnmatch.fnmatchcase(rel, pat.replace("**/", "*").replace("/**", "/*"))


def _matches(path: Path, globs: list[str], root: Path | None) -> bool:
    names = {path.name, path.as_posix()}
    if root is not None:
        try:
            names.add(path.relative_to(root).as_posix())
        except ValueError:
            pass
    return any(fnmatch.fnmatchcase(n, g) for g in globs for n in names)


def select_files(
    paths: list[str],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    out: Path | None = None,
    follow_symlinks: bool = False,
) -> Selection:
    """Expand `paths` ("-" = read paths from stdin, one per line) into the files to ingest.

    Refused with a MemtxError (nothing is written): a path that does not exist, a symlink loop,
    the output bank itself or a path inside it, an empty selection. Skipped with a reason:
    unreadable files, files under a bank, .gitignore'd files, non-matching globs, and (unless
    follow_symlinks) links in a walked directory that lead out of it: `ln -s ~/.ssh/id_rsa
    repo/notes.md` must not put a key into a bank. Paths given by name are taken as given.
    """
    expanded: list[str] = []
    for p in paths:
        if p == "-":
            expanded += [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        else:
            expanded.append(p)
    if not expanded:
        raise MemtxError("no input paths given (use files, directories or - for a list on stdin)")
    out_r = out.resolve() if out is not None else None
    sel = Selection()
    seen: set[Path] = set()
    for raw in expanded:
        p = Path(raw)
        try:
            rp = p.resolve(strict=True)
        except RuntimeError:
            raise MemtxError(f"{raw}: symlink loop") from None
        except FileNotFoundError:
            if p.is_symlink():
                raise MemtxError(f"{raw}: broken symlink") from None
            raise MemtxError(f"no such file or directory: {raw}") from None
        except OSError as e:
            if e.errno == 40:  # ELOOP
                raise MemtxError(f"{raw}: symlink loop") from None
            raise MemtxError(f"cannot read {raw}: {e.strerror}") from None
        if out_r is not None and (rp == out_r or out_r in rp.parents):
            raise MemtxError(f"{raw} is the output bank {out}; give the documents to ingest, not the bank")
        if rp.is_dir():
            if out_r is not None and rp in out_r.parents:
                pass  # the bank sits inside this directory: its files are skipped below
            _walk(rp, include or [], exclude or [], out_r, sel, seen, follow_symlinks)
        elif rp.is_file():
            if rp in seen:
                continue
            if exclude and _matches(rp, exclude, None):
                sel.skipped.append((raw, "excluded"))
                continue
            if include and not _matches(rp, include, None):
                sel.skipped.append((raw, "not included"))
                continue
            if not os.access(rp, os.R_OK):
                raise MemtxError(f"cannot read {raw}: permission denied")
            seen.add(rp)
            sel.files.append(rp)
        else:
            raise MemtxError(f"{raw} is not a regular file or directory")
    return sel


def _walk(
    root: Path,
    include: list[str],
    exclude: list[str],
    out_r: Path | None,
    sel: Selection,
    seen: set,
    follow_symlinks: bool = False,
) -> None:
    gi = GitIgnore()
    found = 0
    # followlinks=False: a symlinked directory is never entered, so loops cannot happen here.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if (d / ".gitignore").is_file():
            gi.add_file(d / ".gitignore")
        keep = []
        for name in sorted(dirnames):
            sub = d / name
            if name == ".git" or (sub / "manifest.yaml").is_file() and (sub / "state").is_dir():
                continue  # version control, or a memtx bank (never ingest a bank's files)
            if out_r is not None and sub == out_r:
                continue
            if gi.ignored(sub, True) or (exclude and _matches(sub, exclude, root)):
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            f = d / name
            rel = f.relative_to(root).as_posix()
            if gi.ignored(f, False):
                sel.skipped.append((rel, "gitignored"))
                continue
            if exclude and _matches(f, exclude, root):
                sel.skipped.append((rel, "excluded"))
                continue
            if include and not _matches(f, include, root):
                continue
            try:
                rf = f.resolve(strict=True)
            except (OSError, RuntimeError):
                sel.skipped.append((rel, "broken symlink or symlink loop"))
                continue
            if not rf.is_file():
                sel.skipped.append((rel, "not a regular file"))
                continue
            if rf != f and not follow_symlinks and root != rf and root not in rf.parents:
                sel.skipped.append((rel, "symlink out of the tree (--follow-symlinks to ingest it)"))
                continue
            if out_r is not None and (rf == out_r or out_r in rf.parents):
                continue
            if rf in seen:
                continue
            if not os.access(rf, os.R_OK):
                sel.skipped.append((rel, "permission denied"))
                continue
            seen.add(rf)
            sel.files.append(rf)
            found += 1
    if found == 0:
        raise MemtxError(f"{root} has no files to ingest (empty, or everything is ignored or excluded)")
