"""The project's own rules: it describes itself, not the rounds it was built in; the README stays
a user's page; the CLI reference matches the CLI; classes and functions stay readable."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Words of development history (assembled so that this file does not match itself).
HISTORY = re.compile(
    "|".join(
        [
            r"\b" + "sess" + r"ion[ -]?\d+",
            r"\b" + "iss" + r"ue[ -]?#?\d+",
            "tod" + "ay's machine",
            r"\bthis " + "mach" + "ine",
            r"_s\d{2}\b",
        ]
    ),
    re.IGNORECASE,
)
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".c", ".json", ".log", ".txt", ".cfg", ""}
SKIP_DIRS = {".git", ".venv", "__pycache__", "sample_docs", ".ruff_cache", ".pytest_cache"}
# Long functions stated as exceptions, with why (docs/decisions.md keeps the numbers).
LONG_FUNCTIONS: dict[str, str] = {}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        files = [REPO / f for f in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = [p for p in REPO.rglob("*") if p.is_file()]
    return [p for p in files if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)]


def test_no_development_history_in_the_tree():
    hits = []
    for p in tracked_files():
        rel = p.relative_to(REPO).as_posix()
        if HISTORY.search(rel):
            hits.append(f"{rel} (file name)")
        if p.suffix not in TEXT or p.stat().st_size > 5_000_000:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not hits, "development history in the tree:\n" + "\n".join(hits)


def test_readme_is_a_users_page():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250; topic pages go to docs/)"
    for link in re.findall(r"\]\(([^)#]+)\)", "\n".join(lines)):
        if not link.startswith(("http://", "https://")):
            assert (REPO / link).exists(), f"README.md links {link}, which does not exist"


def test_cli_reference_is_up_to_date():
    from memtx_cli.cli.reference import render

    on_disk = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert on_disk == render(), "docs/cli.md is out of date: python -m memtx_cli.cli.reference > docs/cli.md"


def test_classes_and_functions_stay_small():
    too_long = []
    for p in sorted((REPO / "memtx_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            where = f"{p.relative_to(REPO).as_posix()}:{getattr(node, 'name', '')}"
            if isinstance(node, ast.ClassDef) and n > 300:
                too_long.append(f"class {where} ({n} lines)")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and n > 80 and where not in LONG_FUNCTIONS:
                too_long.append(f"function {where} ({n} lines)")
    assert not too_long, "over 300 lines (class) or 80 (function):\n" + "\n".join(too_long)


def test_the_library_does_not_import_the_cli_toolkit():
    for p in sorted((REPO / "memtx_cli").rglob("*.py")):
        if "cli" in p.relative_to(REPO / "memtx_cli").parts:
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("typer", "rich"), f"{p.name} imports {name}"
