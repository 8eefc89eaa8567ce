"""Training: teach a model to use its kNN memory (fine-tuning), or build one from scratch.

Data flow: corpus files -> token ids -> training sequences of `seq_len` tokens (consecutive
pieces of a document; the memory resets at the start of each, as at a document boundary) ->
segments streamed through the engine's `Streamer` exactly as scoring streams them (XL cache,
sinks, memory read before write) but with autograd on.

One optimizer step = `accum` sequences. Every segment's loss is backpropagated as soon as the
segment has run: the XL cache and the memory are detached (the paper's stop-gradient), so
segment graphs are independent and activation memory stays at one segment. Checkpoints are
written at step boundaries, where no memory is live, and everything random derives from
(seed, step): resuming a killed run reproduces the uninterrupted run's loss curve.

What trains (`train`): `gate` = the per-head memory parameters of the memory layers only
(mem_gate for combine=gate, mem_bias for combine=joint); `memory-layers` = those plus every
weight of the memory layers; `all` = everything. Layers below the lowest trained layer run
without autograd.

Checkpoints are Hugging Face directories (config.json, model.safetensors, tokenizer.json; the
memory parameters as extra tensors) plus `memtx.yaml`, the model card (what it was trained from
and on, and the memory settings it was trained with, which become its defaults), and
`train_state.safetensors` / `train_state.yaml` for --resume. No pickle anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from memtx_cli.config import Config
from memtx_cli.engine import plan
from memtx_cli.errors import MemtxError
from memtx_cli.tasks.checkpoint import (
    STATE_VERSION,
    _card,
    load_optimizer_tensors,
    optimizer_tensors,
    read_train_state,
    save_checkpoint,
)
from memtx_cli.tasks.optim import autocast_dtype, lr_at, make_optimizer, trainable_parameters
from memtx_cli.tasks.train_setup import (
    InitConfig,
    TrainConfig,
    build_corpus,
    init_weights,
    read_texts,
    sequence_order,
    train_tokenizer,
)

# on_event(kind, info): "start", "step", "eval", "save", "done". The library reports; the CLI draws.
Events = Callable[[str, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# Evaluation and the loop


def evaluate(
    model: Any, val: list[torch.Tensor], cfg: Config, amp: torch.dtype | None, names: list[str] | None = None
) -> dict[str, Any]:
    """Validation perplexity with memory and window-only (same segments): pooled over all
    sequences, and per sequence under `docs`."""
    from memtx_cli.engine.stream import run_stream

    dev = model.embed.weight.device
    out: dict[str, Any] = {}
    docs: dict[str, dict[str, float]] = {}
    for name, c in (("memory", cfg), ("window", replace(cfg, memory=False))):
        if name == "memory" and not cfg.memory:
            continue
        tot, n = 0.0, 0
        for j, ids in enumerate(val):
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                nll, _ = run_stream(model, ids.to(dev), c)
            tot += float(nll.double().sum())
            n += nll.numel()
            key = names[j] if names and j < len(names) else f"val {j}"
            docs.setdefault(key, {})[f"ppl_{name}"] = math.exp(float(nll.double().mean()))
        out[f"ppl_{name}"] = math.exp(tot / max(n, 1))
    out["docs"] = docs
    return out


@dataclass
class TrainResult:
    out: str
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    evals: list[dict[str, Any]]
    stopped: str  # "steps" | "minutes"


def train(
    corpus_paths: list[str],
    out: str | Path,
    cfg: Config,
    tc: TrainConfig,
    *,
    model: str | None = None,
    init: InitConfig | None = None,
    val_paths: list[str] | None = None,
    resume: bool = False,
    on_event: Events = lambda kind, info: None,
) -> TrainResult:
    """Train and checkpoint to `out`. `model`: fine-tune that model; `init`: build a new one
    (InitConfig.from_yaml). `cfg` holds the memory settings the training streams with (for
    --init: the init file's settings under the flags; for --resume: the checkpoint's card)."""
    from memtx_cli.model.loading import tune_allocator

    tune_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    if init is not None and resume:
        raise MemtxError("--resume continues a checkpoint; drop --init")
    if not resume and out.exists() and any(out.iterdir()):
        raise MemtxError(f"{out} exists and is not empty; use --resume to continue it, or another --out")
    state: dict[str, Any] = {}
    state_tensors: dict[str, torch.Tensor] = {}
    if resume:
        state, state_tensors = read_train_state(out)
        # The run's settings come from the checkpoint; only the budgets from this invocation.
        tc = TrainConfig(**{**state["train_config"], "max_steps": tc.max_steps, "max_minutes": tc.max_minutes})
    train_texts = read_texts(corpus_paths)
    val_texts = read_texts(val_paths) if val_paths else []
    torch.manual_seed(tc.seed)
    net = Network.build(cfg, tc, out, model, init, resume, train_texts)
    run = Run(net, cfg, tc, out, train_texts, val_texts, state, state_tensors, on_event)
    if not run.evals:
        run.evaluate()
    t0 = time.perf_counter()
    prior = float(state.get("seconds", 0.0))
    stopped = "steps"
    while run.step < tc.max_steps:
        if tc.max_minutes and time.perf_counter() - t0 >= tc.max_minutes * 60:
            stopped = "minutes"
            break
        run.optimizer_step(prior + time.perf_counter() - t0)
        elapsed = prior + time.perf_counter() - t0
        if tc.eval_every and run.step % tc.eval_every == 0 and run.step < tc.max_steps:
            run.evaluate()
        if tc.save_every and run.step % tc.save_every == 0 and run.step < tc.max_steps:
            run.checkpoint(elapsed)
    if not run.evals or run.evals[-1]["step"] != run.step:
        run.evaluate()
    elapsed = prior + time.perf_counter() - t0
    run.checkpoint(elapsed)
    net.model.frozen_below, net.model.grad_checkpoint = 0, False
    res = TrainResult(str(out), run.step, run.tokens, elapsed, run.losses, run.evals, stopped)
    on_event("done", asdict(res))
    return res


@dataclass
class Network:
    """The model a run trains, its tokenizer, the card it starts from, and where it came from."""

    model: Any
    tokenizer: Any
    base_card: dict[str, Any]
    scratch: bool
    trained_from: Any

    @classmethod
    def build(
        cls,
        cfg: Config,
        tc: TrainConfig,
        out: Path,
        model: str | None,
        init: InitConfig | None,
        resume: bool,
        train_texts: list,
    ) -> Network:
        """Resume the checkpoint, build a new model (--init), or load the model to fine-tune."""
        from memtx_cli.model.llama import Transformer
        from memtx_cli.model.loading import load_model, pick_device

        # Gate training leaves every weight frozen: with bfloat16 autocast they can be held in
        # bfloat16 (no per-segment cast of the float32 weights); the trained scalars stay float32.
        # A resumed run loads the same way, or its numbers would differ in the last bits.
        frozen_bf16 = tc.train == "gate" and autocast_dtype(tc.autocast, pick_device(cfg.device)) is torch.bfloat16
        weights_dtype = "bfloat16" if frozen_bf16 else "float32"
        if resume:
            lm = load_model(str(out), device=cfg.device, dtype=weights_dtype)
            card = dict(lm.card.data)
            trained = card.get("trained", {})
            return cls(lm.model, lm.tokenizer, card, bool(trained.get("from_scratch")), trained.get("from"))
        if init is not None:
            tokenizer = train_tokenizer([t for _, _, t in train_texts], init.vocab_size)
            args = replace(init.args, vocab_size=tokenizer.vocab_size)
            net = Transformer(args).to(pick_device(cfg.device))
            net.inv_freq = net.inv_freq.float()
            init_weights(net)
            card = {"name": init.name, "description": "a memorizing transformer trained from scratch by memtx"}
            return cls(net, tokenizer, card, True, None)
        lm = load_model(model or cfg.model, device=cfg.device, dtype=weights_dtype)
        trained_from = {"model": lm.name, "weights_fingerprint": lm.fingerprint}
        return cls(lm.model, lm.tokenizer, dict(lm.card.data), False, trained_from)


class Run:
    """One training run's state: parameters, optimizer, data, history; a step, an evaluation and
    a checkpoint at a time."""

    def __init__(
        self,
        net: Network,
        cfg: Config,
        tc: TrainConfig,
        out: Path,
        train_texts: list,
        val_texts: list,
        state: dict[str, Any],
        state_tensors: dict[str, torch.Tensor],
        on_event: Events,
    ) -> None:
        m = net.model
        self.net, self.cfg, self.tc, self.out, self.on_event = net, cfg, tc, out, on_event
        cfg.validate_for(m.args.context_length)
        # layers with memory heads
        layers = list(plan.heads_for(cfg, m.args.n_layers, m.args.n_kv_heads, m.args.n_heads))
        if layers:
            m.add_memory_params(layers, cfg.gate_init)
            for i in layers:  # trained scalars in float32 whatever the weights' dtype
                a = m.layers[i].attn
                a.mem_gate.data, a.mem_bias.data = a.mem_gate.data.float(), a.mem_bias.data.float()
        self.params, lowest = trainable_parameters(m, tc.train, layers if tc.train != "all" else [])
        self.names = {id(p): n for n, p in self.params.items()}
        self.dev = m.embed.weight.device
        self.amp = autocast_dtype(tc.autocast, self.dev)
        self.corpus = build_corpus(train_texts, val_texts, net.tokenizer, tc, cfg.segment)
        self.base_lr = tc.default_lr(net.scratch)
        self.opt = make_optimizer(self.params, self.base_lr, tc.weight_decay)
        self.losses: list[float] = list(state.get("losses", []))
        self.evals: list[dict[str, Any]] = list(state.get("evals", []))
        self.step = int(state.get("step", 0))
        self.tokens = int(state.get("tokens", 0))
        if state:
            load_optimizer_tensors(self.opt, self.params, state_tensors, state.get("optimizer", {}))
        m.frozen_below = lowest
        m.grad_checkpoint = tc.grad_checkpoint
        self.card = _card(net.base_card, cfg, tc, self.corpus, net.trained_from, net.scratch, m)
        on_event(
            "start",
            {
                "steps": tc.max_steps,
                "step": self.step,
                "sequences": len(self.corpus.sequences),
                "val_sequences": len(self.corpus.val),
                "trainable": sum(p.numel() for p in self.params.values()),
                "lr": self.base_lr,
                "memory_layers": layers,
            },
        )

    def checkpoint(self, elapsed: float) -> None:
        tensors, scalars = optimizer_tensors(self.opt, self.names)
        st = {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens": self.tokens,
            "seconds": elapsed,
            "train_config": asdict(self.tc),
            "settings": self.cfg.memory_settings(),
            "optimizer": scalars,
            "losses": self.losses,
            "evals": self.evals,
        }
        self.card["trained"]["steps"], self.card["trained"]["tokens"] = self.step, self.tokens
        save_checkpoint(self.out, self.net.model, self.net.tokenizer, self.card, tensors, st)
        self.on_event("save", {"step": self.step, "path": str(self.out)})

    def evaluate(self) -> None:
        self.net.model.eval()
        ev = {"step": self.step, **evaluate(self.net.model, self.corpus.val, self.cfg, self.amp, self.corpus.val_names)}
        self.evals.append(ev)
        self.on_event("eval", ev)

    def optimizer_step(self, elapsed_before: float) -> None:
        """One optimizer step over `accum` sequences, each streamed segment by segment with a
        fresh memory; every segment is backpropagated as soon as it has run."""
        tc, net, corpus = self.tc, self.net.model, self.corpus
        t0 = time.perf_counter()
        net.train()
        lr = lr_at(self.step, tc.max_steps, self.base_lr, tc.warmup, tc.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        seqs = [
            corpus.sequences[sequence_order(len(corpus.sequences), self.step * tc.accum + j, tc.seed)]
            for j in range(tc.accum)
        ]
        n_tok = sum(len(s) - 1 for s in seqs)
        self.opt.zero_grad(set_to_none=True)
        ts = time.perf_counter()
        total = 0.0
        for ids in seqs:
            total = self._sequence_loss(ids.to(self.dev), n_tok, total)
        gnorm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), tc.clip or float("inf")))
        self.opt.step()
        self.step += 1
        self.tokens += n_tok
        self.losses.append(total)
        self.on_event(
            "step",
            {
                "step": self.step,
                "steps": tc.max_steps,
                "loss": total,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens": self.tokens,
                "tokens_per_s": n_tok / (time.perf_counter() - ts),
                "seconds": elapsed_before + time.perf_counter() - t0,
            },
        )

    def _sequence_loss(self, ids: torch.Tensor, n_tok: int, total: float) -> float:
        """Backpropagate one sequence's loss (its share of the step's tokens); returns `total`
        plus it."""
        from memtx_cli.engine.stream import Streamer
        from memtx_cli.model.llama import token_nll

        net, cfg, amp = self.net.model, self.cfg, self.amp
        streamer = Streamer(net, cfg)  # memory and cache reset: a new document
        for s in range(0, len(ids), cfg.segment):
            targets = ids[s + 1 : s + cfg.segment + 1]
            with torch.autocast(self.dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                hidden = streamer.step(ids[s : s + cfg.segment])
                if not targets.numel():
                    continue
                nll = token_nll(net, hidden[: targets.shape[0]], targets, rows=64)
            loss = nll.sum() / n_tok
            if loss.requires_grad:  # not before the memory fills, when only gates train
                loss.backward()
            total += float(loss.detach())
        return total
