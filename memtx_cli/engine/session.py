"""One step below the CLI: settings resolved from their layers, a bank opened and checked
against the model, the model loaded. No torch at import: `memtx config show` uses it."""

from __future__ import annotations

from typing import Any

from memtx_cli.config import Config, merge_sources, parse_set, read_yaml_config, setting


def resolve_settings(
    flags: dict[str, Any], sets: list[str] | None = None, config_file: str | None = None
) -> tuple[Config, dict[str, str]]:
    """defaults < model card < --config YAML < --set < flags; and where each value came from."""
    from memtx_cli.model.cards import resolve_model

    yaml_layer = read_yaml_config(config_file) if config_file else {}
    set_layer = parse_set(sets)
    model_name = flags.get("model") or setting(set_layer, "model") or setting(yaml_layer, "model")
    card = resolve_model(model_name).card
    return merge_sources([("card", card.settings), ("config", yaml_layer), ("set", set_layer), ("flag", flags)])


def open_bank(path: str) -> Any:
    """A bank (or a shard set, read as one bank) opened read-only, its structure and state
    checked (before the model loads: a bad bank fails fast); each block's crc32 is checked
    when it is first read."""
    from memtx_cli.bank.shards import ShardedBank, is_shard_set
    from memtx_cli.bank.store import Bank

    if is_shard_set(path):
        return ShardedBank.open(path)
    return Bank.open(path, writer=False, verify=False)


def check_bank_model(bank: Any, lm: Any) -> None:
    """A bank is read only by the model (same weights) that built it."""
    from memtx_cli.bank.format import check_model
    from memtx_cli.bank.ingest import model_identity

    check_model(bank, model_identity(lm))


def load_for(cfg: Config, bank: Any = None) -> Any:
    """The configured model; a bank given must come from it (one line otherwise)."""
    from memtx_cli.model.loading import load_model

    lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, threads=cfg.threads or None)
    if bank is not None:
        check_bank_model(bank, lm)
    return lm
