"""Training checkpoints: a Hugging Face model directory plus memtx's card and the optimizer's
state, written beside the target and swapped in by renames (a kill leaves the previous whole)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.errors import MemtxError

STATE_VERSION = 1  # of train_state.yaml


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as flat named tensors (safetensors) + scalars (YAML)."""
    tensors, scalars = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            tensors[f"{n}.exp_avg"] = st["exp_avg"].detach().clone()
            tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().clone()
            scalars[n] = float(st["step"])
    return tensors, scalars


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], scalars: dict
) -> None:
    for n, p in params.items():
        if n not in scalars:
            continue
        try:
            opt.state[p] = {
                "step": torch.tensor(float(scalars[n])),
                "exp_avg": tensors[f"{n}.exp_avg"].to(p.device, p.dtype),
                "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device, p.dtype),
            }
        except KeyError:
            raise MemtxError(
                f"checkpoint optimizer state lacks {n}; it was written by another training set-up"
            ) from None


def _ours(out: Path, kind: str) -> list[Path]:
    """Directories a save of `out` made beside it (`.NAME.<random>.memtx-save|old`): names only
    memtx creates (exclusively, with a random part), so removing them never removes the user's."""
    return sorted(p for p in out.parent.glob(f".{out.name}.*.memtx-{kind}") if p.is_dir() and not p.is_symlink())


def recover_checkpoint(out: Path) -> None:
    """Finish a save interrupted between its two renames (the previous checkpoint set aside,
    CKPT missing), and remove what interrupted saves left."""
    old = _ours(out, "old")
    if old and not os.path.lexists(out):
        os.replace(old.pop(), out)
    for p in old + _ours(out, "save"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    out: Path,
    model: Any,
    tokenizer: Any,
    card: dict[str, Any],
    state_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Write the whole checkpoint into a new private directory beside CKPT, then swap it in: a
    crash leaves the previous one. Only directories this save created are ever removed."""
    import tempfile

    import yaml
    from safetensors.torch import save_file

    from memtx_cli.model.weights import save_hf_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".memtx-save", dir=out.parent))
    try:
        weights = {k: v for k, v in model.state_dict().items() if k != "inv_freq"}
        save_hf_dir(tmp, model.args, weights, tokenizer)
        (tmp / "memtx.yaml").write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
        save_file({k: v.contiguous() for k, v in state_tensors.items()}, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.yaml").write_text(yaml.safe_dump(state, sort_keys=False))
        for f in tmp.iterdir():  # on disk before the swap
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".memtx-old", dir=out.parent))
        os.replace(out, old)  # onto the empty directory just made: the name is ours
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_train_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import yaml
    from safetensors.torch import load_file

    recover_checkpoint(out)
    sy, st = out / "train_state.yaml", out / "train_state.safetensors"
    if not sy.is_file() or not st.is_file():
        raise MemtxError(f"--resume: {out} is not a memtx training checkpoint (no train_state.yaml)")
    try:
        state = yaml.safe_load(sy.read_text())
        tensors = load_file(str(st))
    except Exception as e:
        raise MemtxError(f"--resume: cannot read the training state in {out}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise MemtxError(f"--resume: {out} has a training state of another version")
    return state, tensors


def _card(
    base: dict[str, Any],
    cfg: Config,
    tc: Any,  # TrainConfig
    corpus: Any,  # Corpus
    trained_from: Any,
    scratch: bool,
    net: Any,
) -> dict[str, Any]:
    """The checkpoint's model card: the base card's chat template and stop tokens, the memory
    settings it was trained with (its scoring defaults), and what it was trained from and on."""
    a = net.args
    settings = {k.replace("_", "-"): v for k, v in cfg.memory_settings().items() if k not in ("memory",)}
    card = {
        "name": base.get("name", "checkpoint") if scratch else f"{base.get('name', 'model')}-memtx-{tc.train}",
        "display_name": base.get("display_name", base.get("name", "")),
        "description": base.get("description", ""),
        "license": base.get("license", ""),
        "architecture": {
            "family": "qwen2" if a.qkv_bias else "llama",
            "n_layers": a.n_layers,
            "dim": a.dim,
            "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim,
            "ffn_dim": a.ffn_dim,
            "vocab_size": a.vocab_size,
            "context_length": a.context_length,
        },
        "weights": {"format": "hf", "path": "."},
        "settings": settings,
        "trained": {
            "from": trained_from,
            "from_scratch": scratch,
            "on": [{k: f[k] for k in ("name", "sha256", "tokens")} for f in corpus.files],
            "what": tc.train,
            "config": asdict(tc),
            "steps": 0,
            "tokens": 0,
        },
    }
    if scratch and "trained" in base:  # resuming a from-scratch model keeps its own name
        card["name"] = base["name"]
    for key in ("chat_template", "stop_tokens"):
        if base.get(key):
            card[key] = base[key]
    if base.get("trained") and not scratch:  # resuming: keep the original provenance
        card["name"] = base["name"]
        card["trained"]["from"] = base["trained"].get("from")
    return json.loads(json.dumps(card))  # plain types only (YAML-safe)
