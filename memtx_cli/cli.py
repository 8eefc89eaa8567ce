"""The command line: parse, call the library, display. Nothing else lives here.

Heavy modules (torch, faiss, the engine) are imported inside commands, so `memtx --help`
stays fast. Results go to stdout (a table, or JSON with --json); progress and warnings go to
stderr, and only when stderr is a terminal and --quiet is not given.

Exit codes: 0 ok, 1 user error (one line on stderr; MEMTX_DEBUG=1 for the traceback),
2 usage error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer

from memtx_cli import __version__
from memtx_cli.errors import MemtxError

app = typer.Typer(
    name="memtx",
    help="Long-term memory for language models (Memorizing Transformers over FAISS).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: throughput and more.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    print(f"memtx: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """MemtxError -> one line + exit 1; Ctrl-C -> exit 130; a closed stdout pipe -> quiet exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MemtxError as e:
            if os.environ.get("MEMTX_DEBUG"):
                raise
            fail(str(e))
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


def version_callback(value: bool) -> None:
    if value:
        print(f"memtx {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """memtx: give a language model a long-term memory."""


# ----------------------------------------------------------------------------------------------
# Display helpers (stderr for progress/logs, stdout for results)


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


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, handed to the library as a (done, total) callback."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None, rate="")
        start: list[float] = []

        def update(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            if not start:
                start.append(now)
            el = now - start[0]
            rate = f"{done / el:,.0f} tok/s" if el > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(soft_wrap=True).print(table)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# Shared options

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model card name or path to a .gguf file / HF directory. Default: smollm2-135m."
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu, cuda[:N].")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto (bfloat16 where the hardware has it), float32, bfloat16.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: one per core).")]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="YAML file of settings (same keys as the flags).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or log lines on stderr.")]


def build_config(config_file: str | None, model: str | None, flags: dict[str, Any]) -> Any:
    """defaults < model card settings < YAML < flags."""
    from memtx_cli.cards import resolve_model
    from memtx_cli.config import merge_config, read_yaml_config

    yaml_layer = read_yaml_config(config_file) if config_file else {}
    model_name = model or yaml_layer.get("model")
    card = resolve_model(model_name).card
    return merge_config(card.settings, yaml_layer, {"model": model, **flags})


# ----------------------------------------------------------------------------------------------
# Commands


@app.command()
@handle_errors
def score(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for stdin.")],
    model: ModelOpt = None,
    segment: Annotated[int | None, typer.Option(help="Segment length in tokens. Default: 512.")] = None,
    context: Annotated[
        str | None,
        typer.Option(
            help="window (segments + XL cache) or full (causal attention up to the trained context). Default: window."
        ),
    ] = None,
    xl_cache: Annotated[
        bool | None, typer.Option("--xl-cache/--no-xl-cache", help="Attend to the previous segment too. Default: on.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Score only the first N tokens.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of a document, streamed segment by segment."""
    import time

    from memtx_cli.reader import read_document

    doc = read_document(file)  # bad input fails before the model loads
    for w in doc.warnings:
        log(f"memtx: warning: {w}", quiet)
    cfg = build_config(
        config,
        model,
        {
            "segment": segment,
            "context": context,
            "xl_cache": xl_cache,
            "max_tokens": max_tokens,
            "device": device,
            "dtype": dtype,
            "threads": threads,
        },
    )
    from memtx_cli.engine import score_text
    from memtx_cli.runtime import load_model

    t0 = time.perf_counter()
    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads or None)
    load_s = time.perf_counter() - t0
    with progress_bar("scoring", show_progress(quiet)) as cb:
        res = score_text(lm, doc.text, cfg, cb)
    out = {
        "file": doc.name,
        "model": lm.name,
        **res.to_dict(),
        "dtype": lm.describe()["dtype"],
        "device": str(lm.device),
        "segment": cfg.segment if cfg.context == "window" else lm.args.context_length,
        "xl_cache": cfg.xl_cache,
        "load_seconds": load_s,
    }
    if as_json:
        print_json(out)
        return
    print_table(
        f"memtx score: {doc.name}",
        [
            ("model", f"{lm.name} ({out['dtype']}, {out['device']})"),
            (
                "mode",
                f"{res.mode} (segment {out['segment']}{', XL cache' if cfg.xl_cache and res.mode == 'window' else ''})",
            ),
            ("tokens", f"{res.tokens:,}"),
            ("mean NLL (nats)", f"{res.nll:.4f}"),
            ("perplexity", f"{res.ppl:.4f}"),
            ("bits per byte", f"{res.bits_per_byte:.4f}"),
            ("seconds", f"{res.seconds:.2f} (+{load_s:.1f} load)"),
            ("tokens/s", f"{res.tokens_per_s:,.0f}"),
        ],
    )


@app.command()
@handle_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model cards and whether each model is installed."""
    from memtx_cli.cards import list_cards

    rows = []
    for c in list_cards():
        p = c.weights_path()
        arch = c.data.get("architecture", {})
        rows.append(
            {
                "name": c.name,
                "display_name": c.data.get("display_name", c.name),
                "installed": p is not None,
                "path": str(p) if p else None,
                "install": c.install_hint,
                "license": c.data.get("license"),
                "layers": arch.get("n_layers"),
                "context_length": arch.get("context_length"),
            }
        )
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="memtx models")
    for col in ("name", "model", "licence", "installed", "install with"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"],
            r["display_name"],
            str(r["license"]),
            "yes" if r["installed"] else "no",
            "" if r["installed"] else r["install"],
        )
    Console(soft_wrap=True).print(t)


@bench_app.command("throughput")
@handle_errors
def bench_throughput(
    lengths: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "1024,2048,8192",
    dtypes: Annotated[str, typer.Option(help="Comma-separated dtypes.")] = "float32,bfloat16",
    repeats: Annotated[int, typer.Option(help="Timed runs per cell (median reported).")] = 3,
    transformers: Annotated[
        bool,
        typer.Option("--transformers/--no-transformers", help="Also time Hugging Face transformers on the same ids."),
    ] = True,
    text: Annotated[
        str | None, typer.Option(help="Text file for the ids Default: GPL-3 from ../shared/corpus or sample_docs..")
    ] = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tokens/s of scoring vs transformers, and as a fraction of the CPU's matmul peak."""
    from memtx_cli.bench import run_throughput

    res = run_throughput(
        lengths=[int(x) for x in lengths.split(",")],
        dtypes=dtypes.split(","),
        repeats=repeats,
        with_transformers=transformers,
        text_path=text,
        model=model,
        threads=threads,
        log=lambda m: log(m, quiet),
    )
    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    peak = res["peak_gflops"]
    title = f"throughput, tokens/s (median of {repeats}); matmul peak GFLOP/s: "
    t = Table(title=title + f"float32 {peak['float32']:.0f}, bfloat16 {peak['bfloat16']:.0f}")
    for col in (
        "dtype",
        "tokens",
        "memtx window",
        "memtx full",
        "transformers",
        "full / transformers",
        "full, % of peak",
        "ppl full",
    ):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        tf = r.get("transformers_tokens_per_s")
        t.add_row(
            r["dtype"],
            str(r["tokens"]),
            f"{r['window_tokens_per_s']:,.0f}",
            f"{r['full_tokens_per_s']:,.0f}",
            f"{tf:,.0f}" if tf else "-",
            f"{r['full_tokens_per_s'] / tf:.2f}x" if tf else "-",
            f"{100 * r['full_fraction_of_peak']:.0f}%",
            f"{r['ppl_full']:.4f}",
        )
    Console(soft_wrap=True).print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
