"""memtx generate, ask and chat: text from the model, with memory of a bank."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from memtx_cli.cli.display import handle_errors, log, print_json, print_sources, text_sink
from memtx_cli.cli.options import (
    RUN,
    BankOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    SettingsArgs,
    SourcesOpt,
    SystemOpt,
    TopPOpt,
    settings_options,
)
from memtx_cli.errors import MemtxError, UsageError

# How long `chat --remember` waits for another writer of the bank: after each turn (then the
# exchange is kept and retried after the next one), and at the end of the conversation.
REMEMBER_WAIT = 5.0
REMEMBER_FINAL_WAIT = 120.0


@handle_errors
@settings_options(*RUN, "memory")
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
    bank: BankOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k most likely tokens; 0 = off.")] = 0,
    seed: SeedOpt = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Continue a text, with memory of the prompt itself and of a bank; tokens stream to stdout."""
    from memtx_cli.bank.reader import read_document
    from memtx_cli.engine.generate import Sampling, generate_from

    text = read_document("-").text if prompt == "-" else prompt
    sampling = Sampling(max_tokens, temperature, top_p, top_k, seed, list(stop or []))
    res = generate_from(text, settings.flags, settings.sets, settings.config_file, bank, sampling, text_sink(as_json))
    if as_json:
        print_json({"prompt_tokens": res.prompt_tokens, **res.to_dict()})
        return
    sys.stdout.write("\n")
    log(
        f"memtx: {res.tokens} tokens, {res.tokens_per_s:.1f} tokens/s "
        f"(prefill {res.prefill_seconds:.1f} s, retrieval {res.retrieval_seconds:.1f} s, stop: {res.stop_reason})",
        quiet,
    )


@handle_errors
@settings_options(*RUN)
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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Answer a question with memory of a bank (chat template), then list the sources: the
    documents and line ranges whose memories received the most attention while answering."""
    from memtx_cli.bank.reader import read_document
    from memtx_cli.engine.generate import Sampling
    from memtx_cli.tasks.chat import ask_bank

    text = read_document("-").text.strip() if question == "-" else question.strip()
    sampling = Sampling(max_tokens, temperature, top_p, 0, seed, stop_loops=True)
    f = settings
    res = ask_bank(text, f.flags, f.sets, f.config_file, bank, sampling, sources, evidence, system, text_sink(as_json))
    if as_json:
        print_json(res.to_dict())
        return
    sys.stdout.write("\n")
    print_sources(res.sources)
    g = res.generation
    if g.stop_reason == "quote":  # answer-mode quote: lines of the sources, nothing decoded
        log(f"memtx: {g.tokens} tokens quoted from the sources in {g.prefill_seconds:.1f} s", quiet)
    else:
        log(f"memtx: {g.tokens} tokens, {g.tokens_per_s:.1f} tokens/s, stop: {g.stop_reason}", quiet)


@handle_errors
@settings_options(*RUN)
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
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per reply on stdout.")] = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """An interactive conversation with memory of a bank; one message per line on stdin, an empty
    line or end of input ends it. With --remember each exchange is added to the bank."""
    from pathlib import Path

    from memtx_cli.bank.shards import is_shard_set
    from memtx_cli.engine.generate import Sampling
    from memtx_cli.engine.session import load_for, open_bank
    from memtx_cli.tasks.chat import Conversation, Remembered, check_counts

    check_counts(sources)
    if remember and not bank:
        raise MemtxError("--remember needs --memory BANK (the bank to append the conversation to)")
    if remember and is_shard_set(bank):
        raise UsageError(f"--remember appends to one bank; {bank} is a shard set: name one of its shards")
    sampling = Sampling(max_tokens, temperature, top_p, 0, seed, stop_loops=True)
    cfg, _ = settings.resolve()
    if bank:  # fail fast on a bad bank, before the model loads
        open_bank(bank).close()
    lm = load_for(cfg)
    memory = Remembered(Path(bank), lm, cfg) if remember and bank else None
    talk = Conversation(lm, cfg, sampling, bank, sources, system, memory)
    interactive = sys.stdin.isatty()
    if interactive and not quiet:
        print("memtx chat: one message per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        res, remembered = talk.turn(
            line.strip(), text_sink(as_json), REMEMBER_WAIT, lambda m: log(f"memtx: {m}", quiet)
        )
        if memory is not None and memory.pending:
            log(f"memtx: {len(memory.pending)} exchange(s) kept for the bank until its writer is done", quiet)
        if as_json:
            print_json({"turn": talk.turns - 1, **res.to_dict(), "remembered_tokens": remembered})
        else:
            sys.stdout.write("\n")
            print_sources(res.sources)
            sys.stdout.flush()
    talk.finish(REMEMBER_FINAL_WAIT, lambda m: log(f"memtx: {m}", quiet))
