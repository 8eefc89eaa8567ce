"""Every CLI option declared once.

Settings (memtx_cli/config.py) declare their own type, default and help; `settings_options`
turns the ones a command shows as everyday flags into typer options, and adds `--set KEY=VALUE`
(any setting) and `--config FILE.yaml`. The other options here are the commands' own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, TypeVar

import typer

from memtx_cli.config import INPUT, MEMORY, RUNTIME, Config

OUTPUT = "Output"
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=OUTPUT)]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or log lines on stderr.", rich_help_panel=OUTPUT)
]
BankOpt = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="A memory bank (from memtx ingest) to read, besides the document's own past.",
        rich_help_panel=MEMORY,
    ),
]
BankArg = Annotated[str, typer.Argument(help="The bank directory.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling: smallest set of tokens with this mass.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed: same seed, same output.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="A system message instead of the card's default.")]
SourcesOpt = Annotated[int, typer.Option("--sources", help="Sources to list (documents and line ranges).")]
ModelOnlyOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Model card name or path to a .gguf file / HF directory.", rich_help_panel=RUNTIME
    ),
]

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
FIELDS = {f.name: f for f in fields(Config)}


@dataclass
class SettingsArgs:
    """What a command received for the settings: flags given, --set items, --config file."""

    flags: dict[str, Any] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    config_file: str | None = None

    def resolve(self) -> tuple[Config, dict[str, str]]:
        """The Config these settings give (default < card < config < --set < flag), and where
        each value came from."""
        from memtx_cli.engine.session import resolve_settings

        return resolve_settings(self.flags, self.sets, self.config_file)


def _setting_param(key: str) -> inspect.Parameter:
    f = FIELDS[key]
    help_text, panel, flag = f.metadata["help"], f.metadata["panel"], f.metadata["flag"]
    typ = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
    if typ is bool and flag.startswith("--memory/"):  # --memory names the bank: memory off is --no-memory
        opt = typer.Option("--no-memory", help="No kNN memory: the sliding-window baseline.", rich_help_panel=panel)
        return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, opt])
    if typ is bool:
        name = key.replace("_", "-")
        decls = [flag or f"--{name}/--no-{name}"]
    else:
        decls = flag.split("/") if flag else ["--" + key.replace("_", "-")]
    # No default shown: the model card sets many of them (`memtx config show` lists what a run uses).
    opt = typer.Option(*decls, help=help_text, rich_help_panel=panel, show_default=False)
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[typ | None, opt])


_SET = inspect.Parameter(
    "set_",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Any setting (repeatable), e.g. --set block-votes=8; `memtx config show` lists them and their values.",
            rich_help_panel=RUNTIME,
        ),
    ],
)
_CONFIG = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation=Annotated[
        str | None,
        typer.Option("--config", help="YAML file of settings (the same keys as --set).", rich_help_panel=RUNTIME),
    ],
)


PANELS = (None, INPUT, MEMORY, OUTPUT, RUNTIME)  # None: a command's own options, first


def _panel_rank(p: inspect.Parameter) -> int:
    meta = getattr(p.annotation, "__metadata__", ())
    panel = next((getattr(m, "rich_help_panel", None) for m in meta), None)
    return PANELS.index(panel) if panel in PANELS else 0


def _is_argument(p: inspect.Parameter) -> bool:
    return any(type(m).__name__ == "ArgumentInfo" for m in getattr(p.annotation, "__metadata__", ()))


def settings_options(*keys: str) -> Callable[[F], F]:
    """Give a command the settings `keys` as flags, plus --set and --config; the command receives
    them as one `settings: SettingsArgs` argument. A memory flag given as False (--no-memory)
    counts as given; None means not given (the card, YAML or --set decides)."""
    for k in keys:
        if k not in FIELDS:
            raise KeyError(k)

    def deco(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "settings"]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = {k: kwargs.pop(k) for k in keys}
            if "memory" in flags:
                flags["memory"] = False if flags["memory"] else None
            sets, config = kwargs.pop("set_"), kwargs.pop("config")
            kwargs["settings"] = SettingsArgs(flags, list(sets or []), config)
            return fn(*args, **kwargs)

        extra = [_setting_param(k) for k in keys] + [_SET, _CONFIG]
        positional = [p for p in own if _is_argument(p)]  # typer arguments keep their order, first
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in positional]
        # --help shows panels in the order their first option appears: input, memory, output, runtime.
        keyword = sorted(keyword + extra, key=_panel_rank)
        wrapper.__signature__ = sig.replace(parameters=positional + keyword)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {}
        return wrapper  # type: ignore[return-value]

    return deco


# The everyday settings of the commands that run the model.
RUN = ("model", "device", "dtype", "threads")
MEMORY_FLAGS = ("memory_layers", "retrieval", "blocks", "block_size", "top_k", "positions")
SCORE = (*RUN, "memory", *MEMORY_FLAGS, "segment", "context", "max_tokens")
INGEST = (*RUN, *MEMORY_FLAGS, "segment")

PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        help="Key/value codec of a new bank: float16 (default); sq8, sq6 or sq4 (FAISS scalar quantizers "
        "trained on its first document: 1/2, 3/8 or 1/4 of the bytes); int8 (legacy absmax)."
    ),
]
