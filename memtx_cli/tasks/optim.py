"""What trains and how: parameter selection by mode, AdamW, the learning-rate schedule, autocast."""

from __future__ import annotations

import math
from typing import Any

import torch

from memtx_cli.errors import MemtxError


def trainable_parameters(model: Any, mode: str, layers: list[int]) -> tuple[dict[str, torch.nn.Parameter], int]:
    """Set requires_grad by mode; return {name: param} that train and the lowest layer that does."""
    model.requires_grad_(False)
    chosen: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "layers" else None
        if mode == "all":
            take = True
        elif mode == "memory-layers":
            take = layer in layers
        else:
            take = name.endswith(("attn.mem_gate", "attn.mem_bias")) and layer in layers
        if take:
            p.requires_grad_(True)
            chosen[name] = p
    if not chosen:
        raise MemtxError(f"--train {mode}: nothing to train (memory is off or has no layers)")
    lowest = 0 if mode == "all" else min(layers)
    return chosen, lowest


def make_optimizer(params: dict[str, torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for n, p in params.items() if p.dim() >= 2 and not n.startswith("embed")]
    rest = [p for n, p in params.items() if not (p.dim() >= 2 and not n.startswith("embed"))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # foreach (not fused): the fused CPU kernel differs in the last bits between runs here.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), foreach=True)


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `base`, then cosine down to base * min_ratio at `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    from memtx_cli.model.loading import cpu_has_fast_bf16

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None
