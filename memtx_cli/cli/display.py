"""How the CLI speaks: one error line, results on stdout (tables or JSON), progress and logs on
stderr through one progress bar."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from memtx_cli.errors import MemtxError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    print(f"memtx: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """MemtxError -> one line and its exit code (2 for usage); Ctrl-C -> 130; a closed stdout
    pipe -> a quiet exit. MEMTX_DEBUG=1 shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MemtxError as e:
            if os.environ.get("MEMTX_DEBUG"):
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            if os.environ.get("MEMTX_DEBUG"):
                raise
            print("memtx: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # The reader went away (memtx ... | head): stop quietly, and stop Python from
            # complaining when it flushes stdout at exit.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def show_progress(quiet: bool) -> bool:
    if quiet:
        return False
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column key / value table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(soft_wrap=True).print(table)


def print_grid(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table with a header row on stdout (benchmarks)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*r)
    Console(soft_wrap=True).print(t)


class Bar:
    """The progress bar: a description, a bar, a count and a free text; `note` prints a line
    above it. Disabled (quiet, or stderr not a terminal), every call does nothing."""

    def __init__(self, progress: Any = None) -> None:
        self._p = progress
        self._task = progress.add_task("", total=None, info="") if progress is not None else None

    def update(self, completed: float, total: float | None, description: str = "", info: str = "") -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed, total=total, description=description, info=info)

    def note(self, line: str) -> None:
        if self._p is not None:
            self._p.console.print(line)


@contextmanager
def progress(enabled: bool) -> Iterator[Bar]:
    if not enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=True) as p:
        yield Bar(p)


@contextmanager
def token_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """The bar, handed to the library as a (done, total) tokens callback."""
    with progress(enabled) as bar:
        start = time.perf_counter()

        def update(done: int, total: int) -> None:
            el = time.perf_counter() - start
            bar.update(done, total, description, f"tokens  {done / el:,.0f} tok/s" if el > 0 else "tokens")

        yield update


def text_sink(as_json: bool) -> Callable[[str], None]:
    """Where generated text streams: stdout as it comes, or nowhere when --json prints it at the end."""

    def emit(piece: str) -> None:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    return emit


def describe_retrieval(st: dict[str, Any]) -> str:
    """One line for a run's memory settings (tables' titles)."""
    from memtx_cli.config import blocks_read, exact_block_select

    heads = str(st.get("memory_heads", "all"))
    where = "" if heads == "all" else f" in heads {heads if len(heads) <= 12 else heads[:12] + '...'}"
    if st.get("retrieval") == "block":
        spread = f", spread {st['block_spread']}" if st.get("block_spread") else ""
        votes = f", {st['block_votes']} voters" if st.get("block_votes") else ""
        if st.get("block_votes") and exact_block_select(st):
            votes += " (exact)"
        blocks = blocks_read(heads, st["blocks"])  # per-head budgets (layer.head:n) or `blocks`
        return f"{blocks} blocks of {st['block_size']} per {st['block_chunk']} queries{spread}{votes}{where}"
    return f"top-{st['top_k']} {st['index']}{where}"


def print_sources(sources: list[Any]) -> None:
    if not sources:
        return
    print("\nSources:")
    for i, src in enumerate(sources, 1):
        print(f"  [{i}] {src.label()}  ({100 * src.weight:.0f}% of the attention on the bank)")
