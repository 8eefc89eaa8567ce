"""The memtx command line: the app and its commands, one module per command or group.

Each command parses its options, makes one call into the library and displays the result.
Nothing here imports torch at module level: `memtx --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from memtx_cli import __version__
from memtx_cli.cli import bank, bench, generate, ingest, models, score, train

app = typer.Typer(
    name="memtx",
    help="Long-term memory for language models (Memorizing Transformers over FAISS).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


app.command()(score.score)
app.command()(generate.generate)
app.command()(generate.ask)
app.command()(generate.chat)
app.command()(ingest.ingest)
app.command()(train.train)
app.command()(models.models)
app.add_typer(models.config_app, name="config")
app.add_typer(bank.bank_app, name="bank")
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
