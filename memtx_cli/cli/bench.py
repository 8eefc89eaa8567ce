"""memtx bench: throughput, memory quality and cost, index recall, passkey retrieval, questions
with sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from memtx_cli.cli.display import describe_retrieval, handle_errors, log, print_grid, print_json, print_table
from memtx_cli.cli.options import (
    MEMORY_FLAGS,
    RUN,
    JsonOpt,
    ModelOnlyOpt,
    PrecisionOpt,
    QuietOpt,
    SettingsArgs,
    settings_options,
)
from memtx_cli.errors import UsageError
from memtx_cli.tasks.runinfo import run_info

bench_app = typer.Typer(help="Benchmarks: throughput, memory, recall, passkey, ask.", no_args_is_help=True)

CorpusOpt = Annotated[
    str | None,
    typer.Option(help="Directory of the benchmark documents (books/, code/, legal/). Default: $MEMTX_CORPUS."),
]


def corpus_dir(corpus: str | None) -> Path:
    where = corpus or os.environ.get("MEMTX_CORPUS")
    if not where:
        raise UsageError("this benchmark reads long documents: give --corpus DIR (or set MEMTX_CORPUS)")
    return Path(where)


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
    text: Annotated[str | None, typer.Option(help="Text file for the ids. Default: sample_docs' GPL-3.")] = None,
    model: ModelOnlyOpt = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: one per core).")] = None,
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
        print_json({"meta": run_info(), **res})
        return
    peak = res["peak_gflops"]
    rows = []
    for r in res["rows"]:
        tf = r.get("transformers_tokens_per_s")
        rows.append(
            [
                r["dtype"],
                str(r["tokens"]),
                f"{r['window_tokens_per_s']:,.0f}",
                f"{r['full_tokens_per_s']:,.0f}",
                f"{tf:,.0f}" if tf else "-",
                f"{r['full_tokens_per_s'] / tf:.2f}x" if tf else "-",
                f"{100 * r['full_fraction_of_peak']:.0f}%",
                f"{r['ppl_full']:.4f}",
            ]
        )
    print_grid(
        f"throughput, tokens/s (median of {repeats}); matmul peak GFLOP/s: "
        f"float32 {peak['float32']:.0f}, bfloat16 {peak['bfloat16']:.0f}",
        [
            "dtype",
            "tokens",
            "memtx window",
            "memtx full",
            "transformers",
            "full / transformers",
            "full, % of peak",
            "ppl full",
        ],
        rows,
    )


@bench_app.command("memory")
@handle_errors
@settings_options("model", "dtype", *MEMORY_FLAGS)
def bench_memory(
    lengths: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "8192,32768,65536",
    genres: Annotated[
        str, typer.Option(help="Comma-separated: book, code, code-js, legal, legal-versions.")
    ] = "book,code,legal,legal-versions",
    corpus: CorpusOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Perplexity window-only vs memory vs full attention, and the cost of memory, on real text."""
    from memtx_cli.tasks.bench import run_memory_bench

    where = corpus_dir(corpus)
    cfg, _ = settings.resolve()
    res = run_memory_bench(
        where, [int(x) for x in lengths.split(",")], genres.split(","), cfg, log=lambda m: log(m, quiet)
    )
    if as_json:
        print_json({"meta": run_info(), **res})
        return
    st = res["settings"]
    rows = [
        [
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
        ]
        for r in res["rows"]
    ]
    print_grid(
        f"memory benchmark ({res['dtype']}): layers {st['memory_layers']}, {describe_retrieval(st)}, "
        f"{st['positions']} positions, sinks {st['sinks']}",
        ["genre", "tokens", "ppl window", "ppl memory", "ppl full", "gap recovered"]
        + ["tok/s window", "tok/s memory", "cost", "retrieval s"],
        rows,
    )


@bench_app.command("recall")
@handle_errors
@settings_options("model", "memory_layers", "positions", "blocks")
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
    corpus: CorpusOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """recall@k of approximate FAISS indexes against exact search, on real keys from the model."""
    from memtx_cli.tasks.recall import run_recall

    where = corpus_dir(corpus)
    cfg, _ = settings.resolve()
    res = run_recall(where, tokens, genre, kinds.split(";"), cfg, k=k, log=lambda m: log(m, quiet))
    if as_json:
        print_json({"meta": run_info(), **res})
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
@settings_options(*RUN, *MEMORY_FLAGS, "segment")
def bench_passkey(
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens: 4k,16k,32768.")] = "4k,16k,32k",
    depths: Annotated[
        str, typer.Option(help="Where the key sits (0 = start, 1 = end): 0.1,0.5,0.9, or a count N.")
    ] = "5",
    trials: Annotated[int, typer.Option(help="Trials (random keys) per length and depth.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed of the keys.")] = 0,
    no_window: Annotated[bool, typer.Option("--no-window", help="Skip the window-only runs.")] = False,
    bank: Annotated[
        bool, typer.Option("--bank", help="Ingest the haystack into a bank; the prompt is the question alone.")
    ] = False,
    precision: PrecisionOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Passkey retrieval: a 5-digit key hidden in long filler text; accuracy with memory vs window."""
    from memtx_cli.engine.session import load_for
    from memtx_cli.tasks.passkey import parse_depths, parse_lengths, run_passkey

    lens, deps = parse_lengths(lengths), parse_depths(depths)
    cfg, _ = settings.resolve()
    lm = load_for(cfg)
    res = run_passkey(lm, cfg, lens, deps, trials, seed, not no_window, lambda m: log(m, quiet), bank, precision)
    if as_json:
        print_json({"meta": run_info(), **res})
        return
    st = res["settings"]
    rows = [
        [
            f"{r['tokens']:,}",
            f"{r['trials']}",
            f"{100 * r['accuracy_memory']:.0f}%",
            f"{100 * r['accuracy_window']:.0f}%" if "accuracy_window" in r else "-",
            f"{r['seconds_per_trial']:.1f}",
            f"{r['seconds_per_trial_window']:.1f}" if "seconds_per_trial_window" in r else "-",
        ]
        for r in res["rows"]
    ]
    print_grid(
        f"passkey retrieval from a {res['mode']} ({res['dtype']}): layers {st['memory_layers']}, "
        f"{describe_retrieval(st)}, {st['positions']} positions; window {res['window_tokens']} tokens",
        ["tokens", "trials", "accuracy memory", "accuracy window", "s/trial memory", "s/trial window"],
        rows,
    )


@bench_app.command("ask")
@handle_errors
@settings_options(*RUN, *MEMORY_FLAGS, "segment")
def bench_ask(
    questions: Annotated[
        str, typer.Option(help="The question set (YAML: documents, questions, gold lines, answers).")
    ] = "benchmarks/ask_set.yaml",
    corpus: CorpusOpt = None,
    workdir: Annotated[
        str | None,
        typer.Option(help="Keep the documents and their bank here and reuse them (default: a temporary directory)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Questions to ask: all, tune or held-out.")] = "all",
    sources: Annotated[int, typer.Option(help="Sources listed per answer (as memtx ask --sources).")] = 3,
    evidence: Annotated[int, typer.Option(help="Recalled excerpts quoted (as memtx ask --evidence).")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most (as memtx ask).")] = 128,
    precision: PrecisionOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Questions with sources: facts stated once in long documents, asked as memtx ask asks them
    over one bank of every document; right document first, gold lines among the sources, answer."""
    import tempfile

    from memtx_cli.engine.generate import Sampling
    from memtx_cli.engine.session import load_for
    from memtx_cli.tasks.ask_bench import load_set, prepare_bank, run_ask_bench

    where = corpus_dir(corpus)
    s = load_set(Path(questions)).only(split)
    cfg, _ = settings.resolve()
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0, stop_loops=True)  # as memtx ask
    lm = load_for(cfg)
    with tempfile.TemporaryDirectory(prefix="memtx-ask-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        bank = prepare_bank(lm, cfg, s, where, work, lambda m: log(m, quiet), precision)
        try:
            res = run_ask_bench(lm, cfg, s, bank, sampling, sources, evidence, lambda m: log(m, quiet))
        finally:
            bank.close()
    if as_json:
        print_json({"meta": run_info(), **res})
        return
    rows = [
        [
            name,
            str(x["questions"]),
            f"{100 * x['doc_first']:.0f}%",
            f"{100 * x['gold_lines']:.0f}%",
            f"{100 * x['answer_right']:.0f}%",
            f"{x['seconds_per_question']:.1f}",
        ]
        for name, x in res["summary"].items()
        if x["questions"]
    ]
    print_grid(
        f"questions with sources over {len(res['documents'])} documents ({', '.join(res['kinds'])}); "
        f"{sources} sources, {evidence} quoted",
        ["questions", "n", "right document first", "gold lines in sources", "answer right", "s/question"],
        rows,
    )
