"""memtx ingest: build or extend a memory bank from documents."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from memtx_cli.cli.display import handle_errors, log, print_json, print_table, progress, show_progress
from memtx_cli.cli.options import INGEST, JsonOpt, PrecisionOpt, QuietOpt, SettingsArgs, settings_options
from memtx_cli.config import INPUT

RayOpt = Annotated[
    str | None,
    typer.Option(
        help="Spread the documents over Ray workers: local (a cluster on the local host), auto (the one "
        "`ray start` made here) or a cluster ADDRESS. Needs pip install 'memtx[ray]'."
    ),
]
WorkersOpt = Annotated[int, typer.Option(help="--ray: worker actors (each loads the model once).")]


@handle_errors
@settings_options(*INGEST)
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive), or - for paths on stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The bank directory to create or extend.")],
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only files matching this glob (repeatable).", rich_help_panel=INPUT),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Skip files matching this glob (repeatable).", rich_help_panel=INPUT),
    ] = None,
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Ingest files that links in a directory lead to outside it.",
            rich_help_panel=INPUT,
        ),
    ] = False,
    capacity: Annotated[int, typer.Option(help="Keep at most N entries (tokens); 0 = no limit.")] = 0,
    evict: Annotated[str, typer.Option(help="Eviction when over capacity: fifo, lru or reservoir.")] = "fifo",
    precision: PrecisionOpt = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Ingest only the first N tokens of each document.", rich_help_panel=INPUT)
    ] = None,
    ray: RayOpt = None,
    workers: WorkersOpt = 2,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List skipped files and why.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Build or extend a memory bank: stream documents through the model and keep their memories."""
    from pathlib import Path

    from memtx_cli.bank.ingest import ingest_files

    out_p = Path(out)
    rep, info = ingest_files(
        paths,
        out_p,
        settings.flags,
        settings.sets,
        settings.config_file,
        include=include,
        exclude=exclude,
        follow_symlinks=follow_symlinks,
        capacity=capacity,
        evict=evict,
        precision=precision,
        max_tokens=max_tokens,
        progress=lambda files: ingest_progress(show_progress(quiet), files),
        ray=ray,
        workers=workers,
    )
    for w in rep.warnings:
        log(f"memtx: warning: {w}", quiet)
    if verbose:
        for path, why in rep.skipped:
            log(f"skipped {path}: {why}", quiet)
    if as_json:
        print_json({"bank": str(out_p), **rep.to_dict(), "entries": info["entries"], "documents": info["documents"]})
        return
    print_table(
        f"memtx ingest -> {out_p}",
        [
            ("documents added", f"{len(rep.added)}"),
            ("unchanged (skipped)", f"{len(rep.unchanged)}"),
            ("duplicates (aliased)", f"{len(rep.aliased)}"),
            ("replaced (changed)", f"{len(rep.replaced)}"),
            ("skipped (binary, unreadable, ...)", f"{len(rep.skipped)}" + ("" if verbose else " (-v lists them)")),
            ("tokens", f"{rep.tokens:,}"),
            ("tokens/s", f"{rep.tokens_per_s:,.0f}"),
            ("evicted blocks", f"{rep.evicted_blocks}"),
            ("bank documents / entries", f"{info['documents']} / {info['entries']:,}"),
        ],
    )


@contextmanager
def ingest_progress(enabled: bool, files: list[Any]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Document events -> the bar: documents done / total, tokens, tokens/s, and an ETA from the
    bytes still to read."""
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError:
            sizes.append(0)
    total = max(1, sum(sizes))
    before = [sum(sizes[:i]) for i in range(len(sizes))]
    with progress(enabled) as bar:
        state = {"t0": time.perf_counter(), "tokens": 0, "doc": -1, "doc_done": 0}

        def update(e: dict[str, Any]) -> None:
            i = e["doc"]
            if i != state["doc"]:
                state["doc"], state["doc_done"] = i, 0
            state["tokens"] += e["done"] - state["doc_done"]
            state["doc_done"] = e["done"]
            el = time.perf_counter() - state["t0"]
            rate = f"  {state['tokens'] / el:,.0f} tok/s" if el > 0 else ""
            name = str(e["path"]).rsplit("/", 1)[-1]
            done = before[i] + sizes[i] * e["done"] / max(1, e["total"])
            bar.update(
                int(done), total, f"[{i + 1}/{e['docs']}] {name[:30]}", f"bytes, {state['tokens']:,} tokens{rate}"
            )

        yield update
