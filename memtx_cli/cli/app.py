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
from memtx_cli.errors import MemtxError, UsageError

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
    from memtx_cli.config import merge_config, read_yaml_config, setting
    from memtx_cli.model.cards import resolve_model

    yaml_layer = read_yaml_config(config_file) if config_file else {}
    model_name = model or setting(yaml_layer, "model")
    card = resolve_model(model_name).card
    return merge_config(card.settings, yaml_layer, {"model": model, **flags})


# ----------------------------------------------------------------------------------------------
# Commands


def open_bank_for_reading(path: str) -> Any:
    """Open a bank read-only and verified (before the model loads: a bad bank fails fast)."""
    from memtx_cli.bank.store import Bank

    return Bank.open(path, writer=False, verify=True)


def check_bank_model(bank: Any, lm: Any) -> None:
    from memtx_cli.bank.ingest import model_identity
    from memtx_cli.bank.store import check_model

    check_model(bank, model_identity(lm))


def load_for(cfg: Any, bank: Any = None) -> Any:
    """The configured model; a bank given must come from it (one line otherwise)."""
    from memtx_cli.model.loading import load_model

    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads or None)
    if bank is not None:
        check_bank_model(bank, lm)
    return lm


def text_sink(as_json: bool) -> Callable[[str], None]:
    """Where generated text streams: stdout as it comes, or nowhere when --json prints it at the end."""

    def emit(piece: str) -> None:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    return emit


def describe_retrieval(st: dict[str, Any]) -> str:
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


def memory_flags(**flags: Any) -> dict[str, Any]:
    """The memory settings given on the command line (None = not given, the config decides)."""
    return dict(flags)


TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling: smallest set of tokens with this mass.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed: same seed, same output.")]
BankOpt = Annotated[
    str | None,
    typer.Option("--memory", help="A memory bank (from memtx ingest) to read, besides the document's own past."),
]
NoMemoryOpt = Annotated[
    bool, typer.Option("--no-memory", help="No kNN memory: the sliding-window baseline over the same segments.")
]
LayersOpt = Annotated[str | None, typer.Option("--memory-layers", help="Memory layers: all, 8,16,24 or 10-19.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Memories retrieved per query. Default: 32.")]
IndexOpt = Annotated[str | None, typer.Option("--index", help="flat (exact), ivf, hnsw or a FAISS factory string.")]
NprobeOpt = Annotated[int | None, typer.Option(help="IVF lists searched per query.")]
CombineOpt = Annotated[
    str | None, typer.Option(help="joint (one softmax over local + memory) or gate (paper's sigmoid gate).")
]
GateOpt = Annotated[float | None, typer.Option("--gate-init", help="Initial gate bias b (g = sigmoid(b)).")]
PositionsOpt = Annotated[
    str | None,
    typer.Option(help="Memory positions: fixed, true or clamped (true within the trained context, fixed beyond)."),
]
DistanceOpt = Annotated[
    int | None,
    typer.Option(
        "--mem-distance",
        help="fixed: distance memories sit at; clamped: the cap (token retrieval) or where memories "
        "beyond the trained context sit (block). 0 = auto.",
    ),
]
SinksOpt = Annotated[int | None, typer.Option(help="First tokens of the document kept visible in every window.")]
RetrievalOpt = Annotated[
    str | None,
    typer.Option(help="token: each query's own top-k (paper); block: query chunks pick whole blocks (InfLLM)."),
]
BlockSizeOpt = Annotated[int | None, typer.Option("--block-size", help="block retrieval: tokens per block.")]
BlocksOpt = Annotated[int | None, typer.Option("--blocks", help="block retrieval: blocks attended per query chunk.")]
BankBlocksOpt = Annotated[int | None, typer.Option("--bank-blocks", help="Blocks read from the bank per token.")]
BankBiasOpt = Annotated[
    float | None, typer.Option("--bank-bias", help="Subtracted from bank memories' attention scores (a prior).")
]
HeadsOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-heads",
        help="Heads with memory: all, topN (KV heads, the model card's ranking), topqN (query heads) or 18.2,8.0; "
        "18.2:224,8.0:32 gives KV heads block budgets of their own (--blocks: heads without one).",
    ),
]
SpreadOpt = Annotated[
    int | None,
    typer.Option("--block-spread", help="block retrieval: a block inherits the relevance of this many before it."),
]
BlockChunkOpt = Annotated[
    int | None, typer.Option("--block-chunk", help="block retrieval: queries that pick their blocks together.")
]
BlockSelectOpt = Annotated[
    str | None,
    typer.Option(
        "--block-select",
        help="block retrieval, clamped with voters: exact (each block scored by its best key's logit), "
        "means (by its mean key) or auto (exact where it applies).",
    ),
]
VotesOpt = Annotated[
    int | None,
    typer.Option(
        "--block-votes",
        help="block retrieval: the last N tokens of the previous chunk vote for blocks, per query head "
        "(0 = their summed query picks).",
    ),
]
FarBlocksOpt = Annotated[
    int | None,
    typer.Option("--far-blocks", help="clamped: blocks older than the trained context (-1 = share --blocks)."),
]
FarBiasOpt = Annotated[
    float | None,
    typer.Option("--far-bias", help="clamped, with --far-blocks / --far-top-k: a prior subtracted from their scores."),
]
FarTopKOpt = Annotated[
    int | None,
    typer.Option("--far-top-k", help="clamped: each query's own top-k memories older than the trained context."),
]


@app.command()
@handle_errors
def score(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for stdin.")],
    model: ModelOpt = None,
    bank: BankOpt = None,
    bank_blocks: BankBlocksOpt = None,
    bank_bias: BankBiasOpt = None,
    no_memory: NoMemoryOpt = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Run with and without memory; print both and the difference.")
    ] = False,
    curve: Annotated[
        bool, typer.Option("--curve", help="Per-segment perplexity as JSON lines on stdout, before the summary.")
    ] = False,
    memory_layers: LayersOpt = None,
    top_k: TopKOpt = None,
    index: IndexOpt = None,
    nprobe: NprobeOpt = None,
    combine: CombineOpt = None,
    gate_init: GateOpt = None,
    positions: PositionsOpt = None,
    mem_distance: DistanceOpt = None,
    sinks: SinksOpt = None,
    retrieval: RetrievalOpt = None,
    block_size: BlockSizeOpt = None,
    blocks: BlocksOpt = None,
    memory_heads: HeadsOpt = None,
    block_spread: SpreadOpt = None,
    block_chunk: BlockChunkOpt = None,
    block_votes: VotesOpt = None,
    block_select: BlockSelectOpt = None,
    far_blocks: FarBlocksOpt = None,
    far_bias: FarBiasOpt = None,
    far_top_k: FarTopKOpt = None,
    segment: Annotated[int | None, typer.Option(help="Segment length in tokens. Default: 512.")] = None,
    context: Annotated[
        str | None,
        typer.Option(
            help="window (segments + XL cache + memory) or full (causal attention up to the trained context). "
            "Default: window."
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
    """Perplexity of a document streamed segment by segment, with memory of its own past (and of a bank)."""
    import dataclasses
    import time

    from memtx_cli.bank.reader import read_document

    doc = read_document(file)  # bad input fails before the model loads
    for w in doc.warnings:
        log(f"memtx: warning: {w}", quiet)
    flags = {
        "segment": segment,
        "context": context,
        "xl_cache": xl_cache,
        "max_tokens": max_tokens,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        **memory_flags(
            memory=False if no_memory else None,
            memory_layers=memory_layers,
            top_k=top_k,
            index=index,
            nprobe=nprobe,
            combine=combine,
            gate_init=gate_init,
            positions=positions,
            mem_distance=mem_distance,
            sinks=sinks,
            retrieval=retrieval,
            block_size=block_size,
            blocks=blocks,
            memory_heads=memory_heads,
            block_spread=block_spread,
            block_chunk=block_chunk,
            block_votes=block_votes,
            block_select=block_select,
            far_blocks=far_blocks,
            far_bias=far_bias,
            far_top_k=far_top_k,
            bank_blocks=bank_blocks,
            bank_bias=bank_bias,
        ),
    }
    cfg = build_config(config, model, flags)
    the_bank = open_bank_for_reading(bank) if bank else None
    from memtx_cli.engine.stream import score_ids, tokenize_for_scoring

    t0 = time.perf_counter()
    lm = load_for(cfg, the_bank)
    load_s = time.perf_counter() - t0
    ids, n_bytes = tokenize_for_scoring(lm, doc.text, cfg.max_tokens)
    runs = (
        {"memory": dataclasses.replace(cfg, memory=True), "window": dataclasses.replace(cfg, memory=False)}
        if compare
        else {"main": cfg}
    )
    results = {}
    for name, c in runs.items():
        with progress_bar(f"scoring ({name})" if compare else "scoring", show_progress(quiet)) as cb:
            results[name] = score_ids(lm, ids, n_bytes, c, cb, the_bank)
    base = {
        "file": doc.name,
        "model": lm.name,
        "dtype": lm.describe()["dtype"],
        "device": str(lm.device),
        "segment": cfg.segment if cfg.context == "window" else lm.args.context_length,
        "xl_cache": cfg.xl_cache,
        "load_seconds": load_s,
    }
    if curve:
        seg = base["segment"]
        curves = {name: r.curve(seg) for name, r in results.items()}
        first = next(iter(curves.values()))
        for i, row in enumerate(first):
            if compare:
                row = {
                    "segment": row["segment"],
                    "start": row["start"],
                    "tokens": row["tokens"],
                    **{f"{k}_{n}": curves[n][i][k] for n in curves for k in ("nll", "ppl")},
                }
            print_json(row)
    if compare:
        m, w = results["memory"], results["window"]
        out = {
            **base,
            "memory": m.to_dict(),
            "window": w.to_dict(),
            "nll_delta": m.nll - w.nll,
            "ppl_ratio": m.ppl / w.ppl,
        }
        if as_json:
            print_json(out)
            return
        print_table(
            f"memtx score --compare: {doc.name}",
            [
                ("model", f"{lm.name} ({base['dtype']}, {base['device']})"),
                ("tokens", f"{m.tokens:,}"),
                ("perplexity, window only", f"{w.ppl:.4f}"),
                ("perplexity, with memory", f"{m.ppl:.4f}"),
                ("memory / window", f"{m.ppl / w.ppl:.3f} ({100 * (m.ppl / w.ppl - 1):+.1f}%)"),
                ("bits per byte (window -> memory)", f"{w.bits_per_byte:.4f} -> {m.bits_per_byte:.4f}"),
                ("tokens/s (window, memory)", f"{w.tokens_per_s:,.0f}, {m.tokens_per_s:,.0f}"),
                ("memory entries", f"{m.memory_entries:,}"),
                ("retrieval seconds", f"{m.retrieval_seconds:.2f}"),
            ],
        )
        return
    res = results["main"]
    out = {**base, **res.to_dict()}
    if as_json:
        print_json(out)
        return
    mem_desc = ""
    if res.memory:
        mm = res.memory
        mem_desc = f", memory: layers {mm['memory_layers']}, {describe_retrieval(mm)}, {mm['positions']} positions"
    print_table(
        f"memtx score: {doc.name}",
        [
            ("model", f"{lm.name} ({base['dtype']}, {base['device']})"),
            ("mode", f"{res.mode} (segment {base['segment']}{mem_desc})"),
            ("tokens", f"{res.tokens:,}"),
            ("mean NLL (nats)", f"{res.nll:.4f}"),
            ("perplexity", f"{res.ppl:.4f}"),
            ("bits per byte", f"{res.bits_per_byte:.4f}"),
            ("seconds", f"{res.seconds:.2f} (+{load_s:.1f} load; {res.retrieval_seconds:.2f} retrieval)"),
            ("tokens/s", f"{res.tokens_per_s:,.0f}"),
        ],
    )


@app.command()
@handle_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model cards and whether each model is installed."""
    from memtx_cli.model.cards import list_cards

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


@app.command()
@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
    bank: BankOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens; 0 = off.")] = 0,
    seed: SeedOpt = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")] = None,
    no_memory: NoMemoryOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Continue a text, with memory of the prompt itself and of a bank; tokens stream to stdout."""
    from memtx_cli.bank.reader import read_document
    from memtx_cli.engine.generate import Sampling, stop_token_ids
    from memtx_cli.engine.generate import generate as run_generate

    text = read_document("-").text if prompt == "-" else prompt
    if not text:
        raise MemtxError("the prompt is empty")
    sampling = Sampling(max_tokens, temperature, top_p, top_k, seed, list(stop or []))
    flags = {"device": device, "dtype": dtype, "threads": threads, "memory": False if no_memory else None}
    cfg = build_config(config, model, flags)
    the_bank = open_bank_for_reading(bank) if bank else None
    lm = load_for(cfg, the_bank)
    emit = text_sink(as_json)
    ids = lm.tokenizer.encode(text)
    res = run_generate(lm, ids, cfg, sampling, the_bank if cfg.memory else None, emit, stop_token_ids(lm))
    if as_json:
        print_json({"prompt_tokens": res.prompt_tokens, **res.to_dict()})
    else:
        sys.stdout.write("\n")
        log(
            f"memtx: {res.tokens} tokens, {res.tokens_per_s:.1f} tokens/s "
            f"(prefill {res.prefill_seconds:.1f} s, retrieval {res.retrieval_seconds:.1f} s, stop: {res.stop_reason})",
            quiet,
        )


@app.command()
@handle_errors
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive), or - for paths on stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The bank directory to create or extend.")],
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip files matching this glob (repeatable).")
    ] = None,
    follow_symlinks: Annotated[
        bool, typer.Option("--follow-symlinks", help="Ingest files that links in a directory lead to outside it.")
    ] = False,
    capacity: Annotated[int, typer.Option(help="Keep at most N entries (tokens); 0 = no limit.")] = 0,
    evict: Annotated[str, typer.Option(help="Eviction when over capacity: fifo, lru or reservoir.")] = "fifo",
    precision: Annotated[
        str | None, typer.Option(help="Key/value storage of a new bank: float16 (default) or int8 (half the bytes).")
    ] = None,
    model: ModelOpt = None,
    memory_layers: LayersOpt = None,
    block_size: BlockSizeOpt = None,
    blocks: BlocksOpt = None,
    block_chunk: BlockChunkOpt = None,
    sinks: SinksOpt = None,
    segment: Annotated[int | None, typer.Option(help="Segment length in tokens. Default: 512.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Ingest only the first N tokens of each document.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List skipped files and why.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build or extend a memory bank: stream documents through the model and keep their memories."""
    from pathlib import Path

    from memtx_cli.bank.corpus import select_files
    from memtx_cli.bank.store import EVICTION

    if evict not in EVICTION:
        raise UsageError(f"--evict must be one of {', '.join(EVICTION)}, got {evict!r}")
    if capacity < 0:
        raise UsageError(f"--capacity must be >= 0, got {capacity}")
    if max_tokens is not None and max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0 (0 = whole documents), got {max_tokens}")
    out_p = Path(out)
    sel = select_files(paths, include, exclude, out_p, follow_symlinks)  # bad paths fail before anything is written
    flags = {
        "segment": segment,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        **memory_flags(
            memory_layers=memory_layers, block_size=block_size, blocks=blocks, block_chunk=block_chunk, sinks=sinks
        ),
    }
    cfg = build_config(config, model, flags)
    from memtx_cli.bank.ingest import ingest as run_ingest
    from memtx_cli.bank.ingest import open_or_create_bank

    lm = load_for(cfg)
    bank = open_or_create_bank(out_p, lm, cfg, capacity, evict, precision=precision)
    try:
        with ingest_progress(show_progress(quiet), sel.files) as cb:
            rep = run_ingest(lm, bank, sel.files, cfg, cb, max_tokens=max_tokens or 0)
        info = bank.info()
    finally:
        bank.close()
    rep.skipped = sel.skipped + rep.skipped
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
    """Documents done / total, tokens, tokens/s, and an ETA from the bytes still to read."""
    if not enabled:
        yield lambda e: None
        return
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError:
            sizes.append(0)
    total = max(1, sum(sizes))
    before = [sum(sizes[:i]) for i in range(len(sizes))]
    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("ingesting", total=total, tokens="0", rate="")
        state = {"t0": time.perf_counter(), "tokens": 0, "doc": -1, "doc_done": 0}

        def update(e: dict[str, Any]) -> None:
            i = e["doc"]
            if i != state["doc"]:
                state["doc"], state["doc_done"] = i, 0
            state["tokens"] += e["done"] - state["doc_done"]
            state["doc_done"] = e["done"]
            el = time.perf_counter() - state["t0"]
            done_bytes = before[i] + sizes[i] * e["done"] / max(1, e["total"])
            name = str(e["path"]).rsplit("/", 1)[-1]
            bar.update(
                task,
                completed=done_bytes,
                description=f"[{i + 1}/{e['docs']}] {name[:30]}",
                tokens=f"{state['tokens']:,}",
                rate=f"{state['tokens'] / el:,.0f} tok/s" if el > 0 else "",
            )

        yield update


bank_app = typer.Typer(help="Inspect and manage memory banks.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")
BankArg = Annotated[str, typer.Argument(help="The bank directory.")]


@bank_app.command("info")
@handle_errors
def bank_info(bank: BankArg, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Documents, entries, bytes on disk, bytes per token, model and settings of a bank."""
    from memtx_cli.bank.store import Bank

    with Bank.open(bank, verify=False) as b:
        info = b.info()
        docs = [
            {"id": d.id, "path": d.path, "tokens": d.tokens, "entries": d.entries, "aliases": d.aliases}
            for d in b.docs.values()
        ]
    if as_json:
        print_json({**info, "docs": docs})
        return
    bpt = info["bytes_per_token"]
    print_table(
        f"memtx bank: {bank}",
        [
            ("documents", f"{info['documents']}"),
            ("entries (tokens in memory)", f"{info['entries']:,}"),
            ("blocks", f"{info['blocks']:,} of {info['block_size']}"),
            ("bytes on disk", f"{info['bytes_on_disk']:,}"),
            ("bytes per token", f"{bpt:,.0f}" if bpt else "-"),
            ("model", f"{info['model']['name']} ({info['model']['weights_fingerprint'][:12]})"),
            ("memory layers", f"{info['layers'][0]}-{info['layers'][-1]}" if info["layers"] else "-"),
            ("kv heads x head dim", f"{info['kv_heads']} x {info['head_dim']}, {info['dtype']}"),
            ("eviction", f"{info['eviction']}"),
            ("readable by (it holds its text)", f"{info['readable_by']} ({info['mode']})"),
        ],
    )


@bank_app.command("verify")
@handle_errors
def bank_verify(bank: BankArg, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Check a bank: manifest, state checksums, id alignment, every block's crc32."""
    from memtx_cli.bank.ops import verify_bank

    problems = verify_bank(bank)
    if as_json:
        print_json({"bank": bank, "ok": not problems, "problems": problems})
    elif not problems:
        print(f"{bank}: ok")
    else:
        for p in problems:
            print(f"{bank}: {p}")
    if problems:
        raise typer.Exit(1)


@bank_app.command("rm")
@handle_errors
def bank_rm(
    bank: BankArg,
    docs: Annotated[list[str], typer.Argument(help="Documents to remove: path (as ingested), alias or id.")],
) -> None:
    """Remove documents (and their memories) from a bank, and give their space back."""
    from memtx_cli.bank.ops import remove_documents
    from memtx_cli.bank.store import Bank

    with Bank.open(bank, writer=True, verify=False) as b:
        done = remove_documents(b, docs)
    for line in done:
        print(f"removed {line}")
    print(f"removed {len(done)} name(s) from {bank}")


@bank_app.command("compact")
@handle_errors
def bank_compact(bank: BankArg, as_json: JsonOpt = False) -> None:
    """Give space back: move memories into free blocks and shorten the files (blocks a running
    reader may still see are kept until it closes)."""
    from memtx_cli.bank.ops import compact
    from memtx_cli.bank.store import Bank

    with Bank.open(bank, writer=True, verify=False) as b:
        rep = compact(b)
    if as_json:
        print_json({"bank": bank, **rep})
        return
    print(
        f"{bank}: {rep['bytes_before']:,} -> {rep['bytes_after']:,} bytes on disk "
        f"({rep['moved_blocks']} blocks moved, {rep['released_blocks']} free blocks given back)"
    )


@bank_app.command("merge")
@handle_errors
def bank_merge(
    banks: Annotated[list[str], typer.Argument(help="Banks to merge (same model and geometry).")],
    out: Annotated[str, typer.Option("--out", "-o", help="The new bank.")],
) -> None:
    """Merge banks into a new one; identical documents are kept once."""
    from pathlib import Path

    from memtx_cli.bank.ops import merge_banks

    rep = merge_banks([Path(b) for b in banks], Path(out))
    print(f"merged {len(banks)} banks into {out}: {rep['documents']} documents, {rep['entries']:,} entries")


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
        str | None, typer.Option(help="Text file for the ids. Default: GPL-3 from ../shared/corpus or sample_docs.")
    ] = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Tokens/s of scoring vs transformers, and as a fraction of the CPU's matmul peak."""
    from memtx_cli.tasks.bench import run_throughput

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


@bench_app.command("memory")
@handle_errors
def bench_memory(
    lengths: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "8192,32768,65536",
    genres: Annotated[
        str, typer.Option(help="Comma-separated: book, code, code-js, legal, legal-versions.")
    ] = "book,code,legal,legal-versions",
    model: ModelOpt = None,
    memory_layers: LayersOpt = None,
    top_k: TopKOpt = None,
    index: IndexOpt = None,
    nprobe: NprobeOpt = None,
    combine: CombineOpt = None,
    positions: PositionsOpt = None,
    mem_distance: DistanceOpt = None,
    sinks: SinksOpt = None,
    retrieval: RetrievalOpt = None,
    block_size: BlockSizeOpt = None,
    blocks: BlocksOpt = None,
    memory_heads: HeadsOpt = None,
    block_spread: SpreadOpt = None,
    block_chunk: BlockChunkOpt = None,
    block_votes: VotesOpt = None,
    block_select: BlockSelectOpt = None,
    far_blocks: FarBlocksOpt = None,
    far_bias: FarBiasOpt = None,
    far_top_k: FarTopKOpt = None,
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity window-only vs memory vs full attention, and the cost of memory, on real text."""
    from memtx_cli.tasks.bench import run_memory_bench

    flags = {
        "dtype": dtype,
        **memory_flags(
            memory_layers=memory_layers,
            top_k=top_k,
            index=index,
            nprobe=nprobe,
            combine=combine,
            positions=positions,
            mem_distance=mem_distance,
            sinks=sinks,
            retrieval=retrieval,
            block_size=block_size,
            blocks=blocks,
            memory_heads=memory_heads,
            block_spread=block_spread,
            block_chunk=block_chunk,
            block_votes=block_votes,
            block_select=block_select,
            far_blocks=far_blocks,
            far_bias=far_bias,
            far_top_k=far_top_k,
        ),
    }
    cfg = build_config(config, model, flags)
    res = run_memory_bench([int(x) for x in lengths.split(",")], genres.split(","), cfg, log=lambda m: log(m, quiet))
    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    st = res["settings"]
    t = Table(
        title=f"memory benchmark ({res['dtype']}): layers {st['memory_layers']}, {describe_retrieval(st)}, "
        f"{st['positions']} positions, sinks {st['sinks']}"
    )
    for col in (
        "genre",
        "tokens",
        "ppl window",
        "ppl memory",
        "ppl full",
        "gap recovered",
        "tok/s window",
        "tok/s memory",
        "cost",
        "retrieval s",
    ):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(
            r["genre"],
            f"{r['tokens']:,}",
            f"{r['ppl_window']:.3f}",
            f"{r['ppl_memory']:.3f}",
            f"{r['ppl_full']:.3f}" if "ppl_full" in r else "-",
            f"{100 * r['gap_recovered']:.0f}%" if "gap_recovered" in r else "-",
            f"{r['tokens_per_s_window']:,.0f}",
            f"{r['tokens_per_s_memory']:,.0f}",
            f"{100 * r['memory_cost']:.0f}%",
            f"{r['retrieval_seconds']:.1f}",
        )
    Console(soft_wrap=True).print(t)


@bench_app.command("recall")
@handle_errors
def bench_recall(
    tokens: Annotated[int, typer.Option(help="Tokens streamed into memory before the query segment.")] = 32768,
    genre: Annotated[str, typer.Option(help="book, code, code-js, legal or legal-versions.")] = "code",
    kinds: Annotated[
        str,
        typer.Option(
            help="Semicolon-separated index kinds to compare with exact search (factory strings hold "
            "commas); 'block' = token recall of block retrieval."
        ),
    ] = "ivf;hnsw;IVF256,SQ8;block",
    k: Annotated[int, typer.Option(help="recall@k.")] = 32,
    model: ModelOpt = None,
    memory_layers: LayersOpt = None,
    nprobe: NprobeOpt = None,
    positions: PositionsOpt = None,
    block_size: BlockSizeOpt = None,
    blocks: BlocksOpt = None,
    block_chunk: BlockChunkOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """recall@k of approximate FAISS indexes against exact search, on real keys from the model."""
    from memtx_cli.tasks.bench import run_recall

    flags = memory_flags(
        memory_layers=memory_layers,
        nprobe=nprobe,
        positions=positions,
        block_size=block_size,
        blocks=blocks,
        block_chunk=block_chunk,
    )
    cfg = build_config(config, model, flags)
    res = run_recall(tokens, genre, kinds.split(";"), cfg, k=k, log=lambda m: log(m, quiet))
    if as_json:
        print_json(res)
        return
    print_table(
        f"recall@{k} vs exact, {res['entries_per_head']:,} real keys per head ({genre}, layers {res['layers']})",
        [
            (r["index"], f"{r['recall']:.3f} ({r['queries_per_s']:,.0f} queries/s, build {r['build_seconds']:.1f} s)")
            for r in res["rows"]
        ],
    )


@bench_app.command("passkey")
@handle_errors
def bench_passkey(
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens: 4k,16k,32768.")] = "4k,16k,32k",
    depths: Annotated[
        str, typer.Option(help="Where the key sits (0 = start, 1 = end): 0.1,0.5,0.9, or a count N.")
    ] = "5",
    trials: Annotated[int, typer.Option(help="Trials (random keys) per length and depth.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed of the keys.")] = 0,
    no_window: Annotated[bool, typer.Option("--no-window", help="Skip the window-only runs.")] = False,
    model: ModelOpt = None,
    memory_layers: LayersOpt = None,
    top_k: TopKOpt = None,
    index: IndexOpt = None,
    nprobe: NprobeOpt = None,
    positions: PositionsOpt = None,
    mem_distance: DistanceOpt = None,
    sinks: SinksOpt = None,
    retrieval: RetrievalOpt = None,
    block_size: BlockSizeOpt = None,
    blocks: BlocksOpt = None,
    block_chunk: BlockChunkOpt = None,
    segment: Annotated[int | None, typer.Option(help="Segment length in tokens. Default: 512.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Passkey retrieval: a 5-digit key hidden in long filler text; accuracy with memory vs window."""
    from memtx_cli.tasks.passkey import parse_depths, parse_lengths, run_passkey

    lens, deps = parse_lengths(lengths), parse_depths(depths)
    flags = {
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "segment": segment,
        **memory_flags(
            memory_layers=memory_layers,
            top_k=top_k,
            index=index,
            nprobe=nprobe,
            positions=positions,
            mem_distance=mem_distance,
            sinks=sinks,
            retrieval=retrieval,
            block_size=block_size,
            blocks=blocks,
            block_chunk=block_chunk,
        ),
    }
    cfg = build_config(config, model, flags)
    lm = load_for(cfg)
    res = run_passkey(lm, cfg, lens, deps, trials, seed, window=not no_window, log=lambda m: log(m, quiet))
    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    st = res["settings"]
    t = Table(
        title=f"passkey retrieval ({res['dtype']}): layers {st['memory_layers']}, {describe_retrieval(st)}, "
        f"{st['positions']} positions; window {res['window_tokens']} tokens"
    )
    for col in ("tokens", "trials", "accuracy memory", "accuracy window", "s/trial memory", "s/trial window"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(
            f"{r['tokens']:,}",
            f"{r['trials']}",
            f"{100 * r['accuracy_memory']:.0f}%",
            f"{100 * r['accuracy_window']:.0f}%" if "accuracy_window" in r else "-",
            f"{r['seconds_per_trial']:.1f}",
            f"{r['seconds_per_trial_window']:.1f}" if "seconds_per_trial_window" in r else "-",
        )
    Console(soft_wrap=True).print(t)


def print_sources(sources: list[Any]) -> None:
    if not sources:
        return
    print("\nSources:")
    for i, src in enumerate(sources, 1):
        print(f"  [{i}] {src.label()}  ({100 * src.weight:.0f}% of the attention on the bank)")


SystemOpt = Annotated[str | None, typer.Option("--system", help="A system message instead of the card's default.")]
SourcesOpt = Annotated[int, typer.Option("--sources", help="Sources to list (documents and line ranges).")]


@app.command()
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question, or - to read it from stdin.")],
    bank: BankOpt = None,
    sources: SourcesOpt = 3,
    evidence: Annotated[
        int,
        typer.Option(
            help="Recall, then read: quote the N sources the question attended to most into the prompt "
            "(0 = answer from memory attention alone)."
        ),
    ] = 2,
    system: SystemOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy (default).")] = 0.0,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer a question with memory of a bank (chat template), then list the sources: the
    documents and line ranges whose memories received the most attention while answering."""
    from memtx_cli.bank.reader import read_document
    from memtx_cli.engine.generate import Sampling
    from memtx_cli.tasks.chat import answer, check_counts

    check_counts(sources, evidence)
    text = read_document("-").text.strip() if question == "-" else question.strip()
    if not text:
        raise MemtxError("the question is empty")
    sampling = Sampling(max_tokens, temperature, top_p, 0, seed)
    cfg = build_config(config, model, {"device": device, "dtype": dtype, "threads": threads})
    the_bank = open_bank_for_reading(bank) if bank else None
    lm = load_for(cfg, the_bank)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    res = answer(lm, messages, cfg, sampling, the_bank, sources, text_sink(as_json), evidence=evidence)
    if as_json:
        print_json(res.to_dict())
        return
    sys.stdout.write("\n")
    print_sources(res.sources)
    g = res.generation
    log(f"memtx: {g.tokens} tokens, {g.tokens_per_s:.1f} tokens/s, stop: {g.stop_reason}", quiet)


@app.command()
@handle_errors
def chat(
    bank: BankOpt = None,
    remember: Annotated[
        bool,
        typer.Option("--remember", help="Append every exchange to the bank (a long-term memory across sessions)."),
    ] = False,
    sources: SourcesOpt = 0,
    system: SystemOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per reply at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.3,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per reply on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """An interactive conversation with memory of a bank; one message per line on stdin, an empty
    line or end of input ends it. With --remember each exchange is added to the bank."""
    import datetime
    from pathlib import Path

    from memtx_cli.bank.store import Bank
    from memtx_cli.engine.generate import Sampling
    from memtx_cli.tasks.chat import Remembered, answer, check_counts, conversation_text

    check_counts(sources)
    if remember and not bank:
        raise MemtxError("--remember needs --memory BANK (the bank to append the conversation to)")
    sampling = Sampling(max_tokens, temperature, top_p, 0, seed)
    cfg = build_config(config, model, {"device": device, "dtype": dtype, "threads": threads})
    if bank:  # fail fast on a bad bank, before the model loads
        open_bank_for_reading(bank).close()
    lm = load_for(cfg)
    session = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive and not quiet:
        print("memtx chat: one message per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    memory = Remembered(Path(bank), lm, cfg) if remember and bank else None
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        # Each turn reads the bank as committed now (with the exchanges remembered so far).
        the_bank = Bank.open(bank, writer=False, verify=False) if bank else None
        try:
            if the_bank is not None:
                check_bank_model(the_bank, lm)
            res = answer(lm, history, cfg, sampling, the_bank, sources, text_sink(as_json))
        finally:
            if the_bank is not None:
                the_bank.close()
        reply = res.generation.text.strip()
        history.append({"role": "assistant", "content": reply})
        remembered = 0
        if memory is not None:
            memory.add(f"chat:{session}#{turn}", conversation_text(history[-2:]))
            remembered = memory.commit(REMEMBER_WAIT, on_wait=lambda m: log(f"memtx: {m}", quiet))
            if memory.pending:
                log(f"memtx: {len(memory.pending)} exchange(s) kept for the bank until its writer is done", quiet)
        if as_json:
            print_json({"turn": turn, **res.to_dict(), "remembered_tokens": remembered})
        else:
            sys.stdout.write("\n")
            print_sources(res.sources)
            sys.stdout.flush()
        turn += 1
    if memory is not None and memory.pending:
        memory.commit(REMEMBER_FINAL_WAIT, on_wait=lambda m: log(f"memtx: {m}", quiet))
        if memory.pending:
            raise MemtxError(
                f"{len(memory.pending)} exchange(s) were not remembered: bank {bank} stayed busy "
                f"for {REMEMBER_FINAL_WAIT:.0f} s (another process is writing it)"
            )


# How long `chat --remember` waits for another writer of the bank: after each turn (then the
# exchange is kept and retried after the next one), and at the end of the conversation.
REMEMBER_WAIT = 5.0
REMEMBER_FINAL_WAIT = 120.0


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------
# Training


@app.command()
@handle_errors
def train(
    corpus: Annotated[list[str], typer.Argument(help="Training documents: files or directories (recursive).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint directory to write (a model for --model).")],
    model: ModelOpt = None,
    init: Annotated[
        str | None,
        typer.Option("--init", help="Train a new model from scratch: YAML of architecture, tokenizer, memory."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the checkpoint in --out where it stopped.")
    ] = False,
    val: Annotated[
        list[str] | None, typer.Option("--val", help="Held-out documents for validation (default: held-out sequences).")
    ] = None,
    what: Annotated[
        str | None,
        typer.Option("--train", help="gate (memory gates/biases only), memory-layers, or all. Default: gate."),
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps. Default: 100.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget in minutes (0 = none).")] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default by --train: 2e-2 gate, 2e-5 else, 1e-3 from scratch)."),
    ] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up steps. Default: 10.")] = None,
    accum: Annotated[int | None, typer.Option(help="Sequences per optimizer step (gradient accumulation).")] = None,
    clip: Annotated[float | None, typer.Option(help="Gradient norm clip (0 = off). Default: 1.0.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay on matrices. Default: 0.1.")] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per training sequence; memory resets at each. Default: 8192.")
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validations. Default: 25.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Tokens per validation document. Default: 8192.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints. Default: 25.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order and the initial weights.")] = None,
    grad_checkpoint: Annotated[
        bool | None, typer.Option("--grad-checkpoint/--no-grad-checkpoint", help="Recompute activations in backward.")
    ] = None,
    autocast: Annotated[str | None, typer.Option(help="auto (bfloat16 where the CPU has it), bfloat16 or off.")] = None,
    no_memory: NoMemoryOpt = False,
    memory_layers: LayersOpt = None,
    top_k: TopKOpt = None,
    index: IndexOpt = None,
    combine: CombineOpt = None,
    gate_init: GateOpt = None,
    positions: PositionsOpt = None,
    mem_distance: DistanceOpt = None,
    sinks: SinksOpt = None,
    retrieval: RetrievalOpt = None,
    blocks: BlocksOpt = None,
    segment: Annotated[int | None, typer.Option(help="Segment length in tokens.")] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model to use its memory (fine-tune), or a memorizing transformer from scratch (--init)."""
    from dataclasses import fields as dc_fields
    from pathlib import Path

    from memtx_cli.config import merge_config, read_yaml_config
    from memtx_cli.tasks.train import InitConfig, TrainConfig
    from memtx_cli.tasks.train import train as run_train

    if init and model:
        raise MemtxError("give --model (fine-tune) or --init (from scratch), not both")
    yaml_all = read_yaml_config(config) if config else {}
    tkeys = {f.name for f in dc_fields(TrainConfig)}
    yaml_train = {k: v for k, v in yaml_all.items() if k in tkeys}
    yaml_cfg = {k: v for k, v in yaml_all.items() if k not in tkeys}
    tflags = {
        "train": what or ("all" if init else None),
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "lr": lr,
        "warmup": warmup,
        "accum": accum,
        "clip": clip,
        "weight_decay": weight_decay,
        "seq_len": seq_len,
        "eval_every": eval_every,
        "eval_tokens": eval_tokens,
        "save_every": save_every,
        "seed": seed,
        "grad_checkpoint": grad_checkpoint,
        "autocast": autocast,
    }
    tc = TrainConfig(**{**yaml_train, **{k: v for k, v in tflags.items() if v is not None}})
    flags = {
        "segment": segment,
        "device": device,
        "threads": threads,
        "memory": False if no_memory else None,
        **memory_flags(
            memory_layers=memory_layers,
            top_k=top_k,
            index=index,
            combine=combine,
            gate_init=gate_init,
            positions=positions,
            mem_distance=mem_distance,
            sinks=sinks,
            retrieval=retrieval,
            blocks=blocks,
        ),
    }
    from memtx_cli.model.cards import resolve_model

    init_cfg = None
    if init:
        init_cfg = InitConfig.from_yaml(init)
        cfg = merge_config(init_cfg.settings, yaml_cfg, flags)  # no other model's card applies
    elif resume:  # the checkpoint's card holds the memory settings it trains with
        if not Path(out).is_dir():
            raise MemtxError(f"--resume: {out} does not exist")
        from memtx_cli.tasks.train import recover_checkpoint

        recover_checkpoint(Path(out))
        if not (Path(out) / "train_state.yaml").is_file():
            raise MemtxError(f"--resume: {out} is not a memtx training checkpoint (no train_state.yaml)")
        run_flags = {k: v for k, v in flags.items() if k in ("device", "threads")}
        cfg = merge_config(resolve_model(out).card.settings, {"model": out, **run_flags})
    else:
        cfg = merge_config(resolve_model(model).card.settings, yaml_cfg, {"model": model, **flags})
    enabled = show_progress(quiet)
    with train_progress(enabled, quiet) as on_event:
        res = run_train(
            corpus, out, cfg, tc, model=model, init=init_cfg, val_paths=val, resume=resume, on_event=on_event
        )
    if as_json:
        print_json(
            {
                "out": res.out,
                "steps": res.steps,
                "tokens": res.tokens,
                "seconds": res.seconds,
                "stopped": res.stopped,
                "losses": res.losses,
                "evals": res.evals,
            }
        )
        return
    last = res.evals[-1] if res.evals else {}
    first = res.evals[0] if res.evals else {}
    rows = [
        ("checkpoint", res.out),
        ("steps", f"{res.steps} ({res.stopped} budget)"),
        ("tokens", f"{res.tokens:,}"),
        ("time", f"{res.seconds:.0f} s"),
        ("loss (last step)", f"{res.losses[-1]:.4f}" if res.losses else "-"),
    ]
    for key, label in (("ppl_memory", "val ppl with memory"), ("ppl_window", "val ppl window-only")):
        if key in last:
            rows.append((label, f"{first.get(key, float('nan')):.3f} -> {last[key]:.3f}"))
    print_table("memtx train", rows)


@contextmanager
def train_progress(enabled: bool, quiet: bool) -> Iterator[Callable[[str, dict[str, Any]], None]]:
    """Training events -> a progress bar (steps, loss, tokens/s, ETA) and log lines on stderr."""

    def log_event(kind: str, info: dict[str, Any]) -> None:
        if kind in ("start", "eval"):
            log(_event_line(kind, info), quiet)

    if not enabled:
        yield log_event
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps {task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("train", total=None, info="")

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                bar.update(task, total=info["steps"], completed=info["step"])
            elif kind == "step":
                bar.update(
                    task,
                    completed=info["step"],
                    info=f"loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s",
                )
            if kind in ("start", "eval"):
                bar.console.print(_event_line(kind, info))

        yield on_event


def _event_line(kind: str, info: dict[str, Any]) -> str:
    if kind == "start":
        return (
            f"training {info['trainable']:,} parameters on {info['sequences']} sequences "
            f"({info['val_sequences']} for validation), lr {info['lr']:g}, "
            f"memory layers {info['memory_layers'] or 'none'}"
        )
    vals = ", ".join(f"{k} {v:.3f}" for k, v in info.items() if k.startswith("ppl"))
    return f"step {info['step']}: validation {vals}"
