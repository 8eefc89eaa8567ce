"""memtx score: perplexity of a document, with memory of its own past (and of a bank)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memtx_cli.cli.display import (
    describe_retrieval,
    handle_errors,
    log,
    print_json,
    print_table,
    show_progress,
    token_progress,
)
from memtx_cli.cli.options import OUTPUT, SCORE, BankOpt, JsonOpt, QuietOpt, SettingsArgs, settings_options
from memtx_cli.config import MEMORY


@handle_errors
@settings_options(*SCORE)
def score(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for stdin.")],
    bank: BankOpt = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Run with and without memory; print both and the difference.", rich_help_panel=MEMORY
        ),
    ] = False,
    curve: Annotated[
        bool,
        typer.Option(
            "--curve",
            help="Per-segment perplexity as JSON lines on stdout, before the summary.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Perplexity of a document streamed segment by segment, with memory of its own past (and of a bank)."""
    from memtx_cli.engine.score import score_file

    enabled = show_progress(quiet)
    got = score_file(
        file,
        settings.flags,
        settings.sets,
        settings.config_file,
        bank,
        compare,
        lambda name: token_progress(f"scoring ({name})" if compare else "scoring", enabled),
        warn=lambda w: log(f"memtx: warning: {w}", quiet),
    )
    cfg, m, results = got.cfg, got.model, got.results
    base = {
        "file": got.name,
        "model": m["model"],
        "dtype": m["dtype"],
        "device": m["device"],
        "segment": cfg.segment if cfg.context == "window" else m["context_length"],
        "xl_cache": cfg.xl_cache,
        "load_seconds": got.load_seconds,
    }
    if curve:
        print_curve(results, base["segment"])
    if compare:
        show_compare(got.name, m["model"], base, results, as_json)
    else:
        show_score(got.name, m["model"], base, results["main"], got.load_seconds, as_json)


def print_curve(results: dict[str, Any], seg: int) -> None:
    curves = {name: r.curve(seg) for name, r in results.items()}
    first = next(iter(curves.values()))
    for i, row in enumerate(first):
        if len(curves) > 1:
            row = {
                "segment": row["segment"],
                "start": row["start"],
                "tokens": row["tokens"],
                **{f"{k}_{n}": curves[n][i][k] for n in curves for k in ("nll", "ppl")},
            }
        print_json(row)


def show_compare(name: str, model: str, base: dict[str, Any], results: dict[str, Any], as_json: bool) -> None:
    m, w = results["memory"], results["window"]
    if as_json:
        out = {**base, "memory": m.to_dict(), "window": w.to_dict()}
        print_json({**out, "nll_delta": m.nll - w.nll, "ppl_ratio": m.ppl / w.ppl})
        return
    print_table(
        f"memtx score --compare: {name}",
        [
            ("model", f"{model} ({base['dtype']}, {base['device']})"),
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


def show_score(name: str, model: str, base: dict[str, Any], res: Any, load_s: float, as_json: bool) -> None:
    if as_json:
        print_json({**base, **res.to_dict()})
        return
    mem_desc = ""
    if res.memory:
        mm = res.memory
        mem_desc = f", memory: layers {mm['memory_layers']}, {describe_retrieval(mm)}, {mm['positions']} positions"
    print_table(
        f"memtx score: {name}",
        [
            ("model", f"{model} ({base['dtype']}, {base['device']})"),
            ("mode", f"{res.mode} (segment {base['segment']}{mem_desc})"),
            ("tokens", f"{res.tokens:,}"),
            ("mean NLL (nats)", f"{res.nll:.4f}"),
            ("perplexity", f"{res.ppl:.4f}"),
            ("bits per byte", f"{res.bits_per_byte:.4f}"),
            ("seconds", f"{res.seconds:.2f} (+{load_s:.1f} load; {res.retrieval_seconds:.2f} retrieval)"),
            ("tokens/s", f"{res.tokens_per_s:,.0f}"),
        ],
    )
