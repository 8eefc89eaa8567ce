"""docs/cli.md, generated from the live CLI: every command, its arguments and options.

    python -m memtx_cli.cli.reference > docs/cli.md

tests/test_project.py fails when docs/cli.md differs from what this prints.
"""

from __future__ import annotations

from typing import Any

import typer

HEADER = """# CLI reference

Generated from the CLI by `python -m memtx_cli.cli.reference > docs/cli.md`; do not edit by
hand. Settings (the options under "Memory", "Input" and "Model and runtime") are declared once
in `memtx_cli/config.py`; every setting can also be given with `--set KEY=VALUE` or in a
`--config` YAML file, and `memtx config show` lists them all with their values.
"""


def _param_row(p: Any) -> str:
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    kind = "flag" if getattr(p, "is_flag", False) else str(p.bare_type()).replace("list[str]", "text")
    if getattr(p, "multiple", False):
        kind += ", repeatable"
    help_text = " ".join((getattr(p, "help", None) or "").split()).replace("|", "\\|")
    argument = p.param_type_name == "argument"
    panel = getattr(p, "rich_help_panel", None) or ("Arguments" if argument else "Options")
    return f"| {names} | {kind} | {panel} | {help_text} |"


def _command(name: str, cmd: Any, out: list[str]) -> None:
    if hasattr(cmd, "commands"):
        for sub in sorted(cmd.commands):
            _command(f"{name} {sub}", cmd.commands[sub], out)
        return
    out.append(f"## `{name}`\n")
    out.append(" ".join((cmd.help or "").split()) + "\n")
    rows = [_param_row(p) for p in cmd.params if p.name != "help"]
    if rows:
        out.append("| option | type | panel | meaning |")
        out.append("|---|---|---|---|")
        out.extend(rows)
        out.append("")


def render(app: typer.Typer | None = None) -> str:
    """The reference as markdown."""
    if app is None:
        from memtx_cli.cli.app import app
    root = typer.main.get_command(app)
    out = [HEADER]
    for name in sorted(root.commands):
        _command(f"memtx {name}", root.commands[name], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
