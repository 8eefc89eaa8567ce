"""memtx models and memtx config show: what is installed, and what a run would use."""

from __future__ import annotations

import typer

from memtx_cli.cli.display import handle_errors, print_json
from memtx_cli.cli.options import SCORE, JsonOpt, SettingsArgs, settings_options

config_app = typer.Typer(help="Settings: the merged values a run uses, and where each came from.", no_args_is_help=True)


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


@config_app.command("show")
@handle_errors
@settings_options(*SCORE)
def config_show(as_json: JsonOpt = False, settings: SettingsArgs = None) -> None:  # type: ignore[assignment]
    """Every setting a run would use (with the same flags, --set and --config as `memtx score`): its
    value, where it came from (default, card, config, set, flag) and what it means."""
    from memtx_cli.config import FIELDS_HELP

    cfg, sources = settings.resolve()
    values = cfg.to_dict()
    if as_json:
        print_json({k: {"value": v, "source": sources[k]} for k, v in values.items()})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="memtx config show", title_justify="left")
    for col in ("setting", "value", "from", "meaning"):
        t.add_column(col)
    for k, v in values.items():
        text = str(v) if len(str(v)) <= 40 else str(v)[:37] + "..."  # --json prints it whole
        t.add_row(k.replace("_", "-"), text, sources[k], FIELDS_HELP[k])
    Console(soft_wrap=True).print(t)
