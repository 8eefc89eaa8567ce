"""Training set-up: the run's settings (TrainConfig, InitConfig for a model from scratch, and
their resolution from flags and YAML), the corpus cut into sequences, a tokenizer trained on it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.errors import MemtxError
from memtx_cli.tasks.checkpoint import (
    recover_checkpoint,
)

# on_event(kind, info): "start", "step", "eval", "save", "done". The library reports; the CLI draws.
Events = Callable[[str, dict[str, Any]], None]


TRAIN_MODES = ("gate", "memory-layers", "all")


@dataclass
class TrainConfig:
    train: str = "gate"  # gate | memory-layers | all (what receives gradients)
    max_steps: int = 100
    max_minutes: float = 0.0  # wall-clock budget; 0 = none (the step budget alone)
    # 0 = by what trains: the per-head memory scalars tolerate a large rate (2e-2 moves a
    # bias by ~1 in 50 steps); pretrained weights want a small one (2e-5); from scratch 1e-3.
    lr: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 10  # steps of linear warm-up
    weight_decay: float = 0.1  # on matrices only (not on norms, embeddings' rows or gates)
    clip: float = 1.0  # gradient norm clipping
    accum: int = 1  # sequences per optimizer step
    seq_len: int = 8192  # tokens per training sequence (memory resets at its start)
    eval_every: int = 25  # steps between validations (0 = only at the end)
    eval_tokens: int = 8192  # tokens of each validation sequence
    val_sequences: int = 2  # held-out sequences when no --val files are given
    save_every: int = 25  # steps between checkpoints (0 = only at the end)
    seed: int = 0
    # Off by default: one 512-token segment's activations are small next to the weights (the
    # segment-at-a-time backward already bounds them); on, backward recomputes layers.
    grad_checkpoint: bool = False
    autocast: str = "auto"  # auto (bfloat16 where the CPU has it) | bfloat16 | off
    min_seq_len: int = 0  # skip document pieces shorter than this (0 = two segments)

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise MemtxError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        for name in ("max_steps", "accum", "seq_len", "eval_tokens"):
            if getattr(self, name) < 1:
                raise MemtxError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "lr", "warmup", "weight_decay", "clip", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MemtxError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise MemtxError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.autocast not in ("auto", "bfloat16", "off"):
            raise MemtxError(f"autocast must be auto, bfloat16 or off, got {self.autocast!r}")

    def default_lr(self, scratch: bool) -> float:
        if self.lr:
            return self.lr
        if scratch:
            return 1e-3
        return 2e-2 if self.train == "gate" else 2e-5


@dataclass
class InitConfig:
    """`memtx train --init FILE.yaml`: a new model (architecture, tokenizer, memory layout)."""

    name: str
    args: Any  # ModelArgs (vocab_size from the tokenizer)
    vocab_size: int = 4096
    settings: dict[str, Any] = field(default_factory=dict)  # memory settings (model card `settings`)

    @classmethod
    def from_yaml(cls, path: str | Path) -> InitConfig:
        import yaml

        from memtx_cli.model.llama import ModelArgs

        p = Path(path)
        if not p.is_file():
            raise MemtxError(f"init config {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise MemtxError(f"init config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), dict):
            raise MemtxError(f"init config {path} needs an 'architecture' mapping (dim, n_layers, n_heads, ...)")
        arch = dict(data["architecture"])
        vocab = int((data.get("tokenizer") or {}).get("vocab_size", 4096))
        if not 256 < vocab <= 1 << 20:
            raise MemtxError(f"init config {path}: tokenizer vocab_size must be in 257..{1 << 20}, got {vocab}")
        known = {f.name for f in fields(ModelArgs)} - {"vocab_size"}
        bad = sorted(set(arch) - known)
        if bad:
            raise MemtxError(f"init config {path}: unknown architecture key(s) {bad} (known: {sorted(known)})")
        try:
            args = ModelArgs(vocab_size=vocab, **arch)
        except TypeError as e:
            raise MemtxError(f"init config {path}: {e}") from None
        settings = dict(data.get("settings") or {})
        from memtx_cli.config import merge_config

        merge_config(settings)  # checked now, not after the tokenizer has trained
        return cls(str(data.get("name") or p.stem), args, vocab, settings)


@dataclass
class Corpus:
    files: list[dict[str, Any]]  # name, sha256, tokens
    sequences: list[torch.Tensor]  # training sequences (token ids)
    val: list[torch.Tensor]  # validation sequences
    val_names: list[str] = field(default_factory=list)


def read_texts(paths: list[str]) -> list[tuple[str, str, str]]:
    """(name, sha256, text) of every file the paths select (directories recursively)."""
    from memtx_cli.bank.corpus import select_files
    from memtx_cli.bank.reader import read_document

    sel = select_files(paths)
    out = []
    for f in sel.files:
        doc = read_document(str(f))
        out.append((str(f), hashlib.sha256(doc.text.encode("utf-8")).hexdigest()[:16], doc.text))
    return out


def build_corpus(
    train_texts: list[tuple[str, str, str]],
    val_texts: list[tuple[str, str, str]],
    tokenizer: Any,
    tc: TrainConfig,
    segment: int,
) -> Corpus:
    """Cut documents into training sequences; validation = --val files, or held-out sequences."""
    min_len = tc.min_seq_len or 2 * segment
    files, seqs = [], []
    for name, sha, text in train_texts:
        ids = tokenizer.encode(text)
        files.append({"name": name, "sha256": sha, "tokens": len(ids)})
        for s in range(0, len(ids), tc.seq_len):
            piece = ids[s : s + tc.seq_len]
            if len(piece) >= min_len:
                seqs.append(torch.tensor(piece, dtype=torch.long))
    val, val_names = [], []
    for name, _, text in val_texts:
        ids = tokenizer.encode(text)[: tc.eval_tokens]
        if len(ids) >= 2:
            val.append(torch.tensor(ids, dtype=torch.long))
            val_names.append(Path(name).name)
    if not val_texts:  # hold out a seeded choice of sequences
        if len(seqs) < tc.val_sequences + 1:
            raise MemtxError(
                f"the corpus gives {len(seqs)} training sequence(s) of up to {tc.seq_len} tokens; "
                f"need more than {tc.val_sequences} (add documents, lower --seq-len or give --val files)"
            )
        g = torch.Generator().manual_seed(tc.seed + 7919)
        held = set(torch.randperm(len(seqs), generator=g)[: tc.val_sequences].tolist())
        val = [seqs[i][: tc.eval_tokens] for i in sorted(held)]
        val_names = [f"held-out sequence {i}" for i in sorted(held)]
        seqs = [s for i, s in enumerate(seqs) if i not in held]
    if not seqs:
        raise MemtxError(f"no training sequence of at least {min_len} tokens in the corpus")
    return Corpus(files, seqs, val, val_names)


def sequence_order(n: int, index: int, seed: int) -> int:
    """Which sequence the index-th draw reads: a seeded permutation per epoch (resumable)."""
    epoch, i = divmod(index, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[i])


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style pre-tokenizer) trained on the corpus, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from memtx_cli.model.tokenizer import TextTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id("<|endoftext|>")
    fp = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    return TextTokenizer(tok, None, eos, False, fp)


def init_weights(model: Any) -> None:
    """GPT-2 style initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    n = model.args.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "mem_gate", "mem_bias")):
                continue
            std = 0.02 / math.sqrt(2 * n) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()


def resolve_training(
    out: str,
    flags: dict[str, Any],
    train_flags: dict[str, Any],
    sets: list[str] | None = None,
    config_file: str | None = None,
    init: str | None = None,
    resume: bool = False,
) -> tuple[Config, TrainConfig, InitConfig | None]:
    """Settings of a training run. A --config YAML may hold both training keys (TrainConfig) and
    settings. From scratch (--init) no model card applies; --resume takes the memory settings
    from the checkpoint's own card (only device and threads may change)."""
    from memtx_cli.config import merge_config, parse_set, read_yaml_config
    from memtx_cli.model.cards import resolve_model

    model = flags.get("model")
    if init and model:
        raise MemtxError("give --model (fine-tune) or --init (from scratch), not both")
    yaml_all = read_yaml_config(config_file) if config_file else {}
    tkeys = {f.name for f in fields(TrainConfig)}
    yaml_train = {k: v for k, v in yaml_all.items() if k in tkeys}
    yaml_cfg = {k: v for k, v in yaml_all.items() if k not in tkeys}
    given = {**train_flags, "train": train_flags.get("train") or ("all" if init else None)}
    tc = TrainConfig(**{**yaml_train, **{k: v for k, v in given.items() if v is not None}})
    set_layer = parse_set(sets)
    init_cfg = None
    if init:
        init_cfg = InitConfig.from_yaml(init)
        cfg = merge_config(init_cfg.settings, yaml_cfg, set_layer, flags)  # no other model's card applies
    elif resume:  # the checkpoint's card holds the memory settings it trains with
        if not Path(out).is_dir():
            raise MemtxError(f"--resume: {out} does not exist")
        recover_checkpoint(Path(out))
        if not (Path(out) / "train_state.yaml").is_file():
            raise MemtxError(f"--resume: {out} is not a memtx training checkpoint (no train_state.yaml)")
        run_flags = {k: v for k, v in flags.items() if k in ("device", "threads")}
        cfg = merge_config(resolve_model(out).card.settings, {"model": out, **run_flags})
    else:
        cfg = merge_config(resolve_model(model).card.settings, yaml_cfg, set_layer, flags)
    return cfg, tc, init_cfg
