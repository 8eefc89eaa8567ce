"""Run configuration: one flat dataclass whose keys are the CLI flags.

Precedence: dataclass defaults < the model card's `settings` < `--config FILE.yaml` < flags.
YAML keys are the flag names (`segment: 512`, `xl-cache: false`; `_` and `-` both accepted).
The merged config is what banks record, so a bank says exactly how it was built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from memtx_cli.errors import MemtxError

CONTEXT_MODES = ("window", "full")


@dataclass
class Config:
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0  # 0 = torch's default (one per physical core)
    # Segment length: 512 tokens, as in the paper; a segment attends to itself plus the XL
    # cache (previous segment), so local attention spans 512..1024 tokens.
    segment: int = 512
    xl_cache: bool = True
    # "window": stream segments with the XL cache; "full": causal attention over chunks of the
    # model's trained context (the reference computation).
    context: str = "window"
    max_tokens: int = 0  # 0 = the whole document

    def __post_init__(self) -> None:
        if self.segment < 1:
            raise MemtxError(f"segment must be >= 1 token, got {self.segment}")
        if self.context not in CONTEXT_MODES:
            raise MemtxError(f"context must be one of {', '.join(CONTEXT_MODES)}, got {self.context!r}")
        if self.max_tokens < 0:
            raise MemtxError(f"max-tokens must be >= 0, got {self.max_tokens}")
        if self.threads < 0:
            raise MemtxError(f"threads must be >= 0, got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16", "fp32", "bf16"):
            raise MemtxError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")

    def validate_for(self, context_length: int) -> None:
        """Checks that need the model: a window longer than the trained context is refused."""
        window = self.segment * (2 if self.xl_cache else 1)
        if self.context == "window" and window > context_length:
            raise MemtxError(
                f"segment {self.segment} with the XL cache spans {window} tokens, more than the "
                f"model's trained context ({context_length}); use --segment {context_length // 2} or less"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _norm_key(k: str) -> str:
    return k.replace("-", "_")


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MemtxError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MemtxError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MemtxError(f"config file {path} must be a mapping of setting: value")
    return {_norm_key(str(k)): v for k, v in data.items()}


def merge_config(*layers: dict[str, Any] | None) -> Config:
    """Merge dicts left to right (later wins; None values are skipped) into a checked Config."""
    known = {f.name: f for f in fields(Config)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            k = _norm_key(k)
            if v is None:
                continue
            if k not in known:
                raise MemtxError(f"unknown setting {k!r} (known: {', '.join(sorted(known))})")
            merged[k] = _coerce(k, v, known[k].type)
    return Config(**merged)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if t == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "on", "1"):
                    return True
                if value.lower() in ("false", "no", "off", "0"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if t == "float":
            return float(value)
        if t == "str":
            return str(value)
    except (TypeError, ValueError):
        raise MemtxError(f"setting {key!r}: {value!r} is not a valid {t}") from None
    return value
