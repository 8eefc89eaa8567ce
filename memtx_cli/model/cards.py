"""Model cards (`models/*.yaml`) and resolving `--model NAME|PATH` to weights on disk.

Cards are found in the checkout (`<repo>/models`) and, in an installed wheel, in
`memtx_cli/_cards` (the wheel build copies `models/` there). No torch here: `memtx models`
must stay fast.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtx_cli.errors import MemtxError, UsageError

DEFAULT_MODEL = "smollm2-135m"


def card_dirs() -> list[Path]:
    """Card folders, first match wins: $MEMTX_MODELS_DIR (os.pathsep-separated), the checkout, the wheel."""
    package = Path(__file__).resolve().parent.parent  # memtx_cli/
    extra = [Path(p) for p in os.environ.get("MEMTX_MODELS_DIR", "").split(os.pathsep) if p]
    return [d for d in (*extra, package.parent / "models", package / "_cards") if d.is_dir()]


@dataclass
class ModelCard:
    name: str
    data: dict[str, Any]
    path: Path | None = None  # the YAML file; None for a card synthesised from a weights path

    @property
    def weights(self) -> dict[str, Any]:
        return self.data.get("weights", {})

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.data.get("settings") or {})

    @property
    def install_hint(self) -> str:
        return str(self.weights.get("install", ""))

    def weights_path(self) -> Path | None:
        """Where the weights are, or None when they are not installed."""
        w = self.weights
        if "python_package" in w:
            spec = importlib.util.find_spec(w["python_package"])  # finds, does not import
            if spec is None or not spec.submodule_search_locations:
                return None
            for loc in spec.submodule_search_locations:
                p = Path(loc) / w["file"]
                if p.is_file():
                    return p
            return None
        if "path" in w:
            p = Path(w["path"]).expanduser()
            if not p.is_absolute() and self.path is not None:
                p = self.path.parent / p
            return p if p.exists() else None
        return None

    def require_weights(self) -> Path:
        p = self.weights_path()
        if p is None:
            how = f"; install it with: {self.install_hint}" if self.install_hint else ""
            raise MemtxError(f"model '{self.name}' is not installed{how}")
        return p


@dataclass
class ModelRef:
    """What `--model` resolved to: a card (maybe synthesised) and the weights path."""

    card: ModelCard
    weights: Path


def _read_card(path: Path) -> ModelCard:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MemtxError(f"model card {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or "name" not in data or "weights" not in data:
        raise MemtxError(f"model card {path} needs at least 'name' and 'weights'")
    return ModelCard(str(data["name"]), data, path)


def list_cards() -> list[ModelCard]:
    seen: dict[str, ModelCard] = {}
    for d in card_dirs():
        for p in sorted(d.glob("*.yaml")):
            c = _read_card(p)
            seen.setdefault(c.name, c)
    return list(seen.values())


def find_card(name: str) -> ModelCard | None:
    for c in list_cards():
        if c.name == name:
            return c
    return None


def resolve_model(name_or_path: str | None) -> ModelRef:
    """`--model` value -> card + weights path. Paths (GGUF file, HF dir) win over card names."""
    name = name_or_path or DEFAULT_MODEL
    card = find_card(name)
    p = Path(name).expanduser()
    if card is None and (p.exists() or "/" in name or name.endswith(".gguf")):
        if not p.exists():
            raise MemtxError(f"model path {name} does not exist")
        if p.is_dir() and not (p / "config.json").is_file():
            raise MemtxError(
                f"{name} is a directory without config.json; give a GGUF file or a Hugging Face model directory"
            )
        if p.is_dir() and (p / "memtx.yaml").is_file():  # a memtx train checkpoint carries its card
            ckpt = _read_card(p / "memtx.yaml")
            return ModelRef(ckpt, p.resolve())
        fmt = "hf" if p.is_dir() else "gguf"
        synth = ModelCard(p.name, {"name": p.name, "weights": {"format": fmt, "path": str(p.resolve())}})
        return ModelRef(synth, p.resolve())
    if card is None:
        known = ", ".join(c.name for c in list_cards()) or "none"
        raise UsageError(
            f"unknown model '{name}' (known: {known}); or give a path to a .gguf file or a Hugging Face directory"
        )
    return ModelRef(card, card.require_weights())
