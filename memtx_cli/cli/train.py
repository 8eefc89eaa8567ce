"""memtx train: teach a model to use its memory, or train a memorizing transformer from scratch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from memtx_cli.cli.display import handle_errors, log, print_json, print_table, progress, show_progress
from memtx_cli.cli.options import JsonOpt, QuietOpt, SettingsArgs, settings_options

TRAIN = "Training"


def _opt(help: str, *decls: str) -> Any:
    return typer.Option(*decls, help=help, rich_help_panel=TRAIN)


@handle_errors
@settings_options("model", "device", "threads", "memory", "memory_layers", "retrieval", "blocks", "segment")
def train(
    corpus: Annotated[list[str], typer.Argument(help="Training documents: files or directories (recursive).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint directory to write (a model for --model).")],
    init: Annotated[
        str | None, _opt("Train a new model from scratch: YAML of architecture, tokenizer, memory.", "--init")
    ] = None,
    resume: Annotated[bool, _opt("Continue the checkpoint in --out where it stopped.", "--resume")] = False,
    val: Annotated[
        list[str] | None, _opt("Held-out documents for validation (default: held-out sequences).", "--val")
    ] = None,
    what: Annotated[
        str | None, _opt("gate (memory gates/biases only), memory-layers, or all. Default: gate.", "--train")
    ] = None,
    max_steps: Annotated[int | None, _opt("Optimizer steps. Default: 100.")] = None,
    max_minutes: Annotated[float | None, _opt("Wall-clock budget in minutes (0 = none).")] = None,
    lr: Annotated[
        float | None, _opt("Peak learning rate (default by --train: 2e-2 gate, 2e-5 else, 1e-3 from scratch).")
    ] = None,
    warmup: Annotated[int | None, _opt("Warm-up steps. Default: 10.")] = None,
    accum: Annotated[int | None, _opt("Sequences per optimizer step (gradient accumulation).")] = None,
    clip: Annotated[float | None, _opt("Gradient norm clip (0 = off). Default: 1.0.")] = None,
    weight_decay: Annotated[float | None, _opt("AdamW weight decay on matrices. Default: 0.1.")] = None,
    seq_len: Annotated[int | None, _opt("Tokens per training sequence; memory resets at each. Default: 8192.")] = None,
    eval_every: Annotated[int | None, _opt("Steps between validations. Default: 25.")] = None,
    eval_tokens: Annotated[int | None, _opt("Tokens per validation document. Default: 8192.")] = None,
    save_every: Annotated[int | None, _opt("Steps between checkpoints. Default: 25.")] = None,
    seed: Annotated[int | None, _opt("Seed of the data order and the initial weights.")] = None,
    grad_checkpoint: Annotated[
        bool | None, _opt("Recompute activations in backward.", "--grad-checkpoint/--no-grad-checkpoint")
    ] = None,
    autocast: Annotated[str | None, _opt("auto (bfloat16 where the CPU has it), bfloat16 or off.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    settings: SettingsArgs = None,  # type: ignore[assignment]
) -> None:
    """Train a model to use its memory (fine-tune), or a memorizing transformer from scratch (--init)."""
    from memtx_cli.tasks.train import train as run_train
    from memtx_cli.tasks.train_setup import resolve_training

    train_flags = {
        "train": what,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "lr": lr,
        "warmup": warmup,
        "accum": accum,
        "clip": clip,
        "weight_decay": weight_decay,
        "seq_len": seq_len,
        "eval_every": eval_every,
        "eval_tokens": eval_tokens,
        "save_every": save_every,
        "seed": seed,
        "grad_checkpoint": grad_checkpoint,
        "autocast": autocast,
    }
    cfg, tc, init_cfg = resolve_training(
        out, settings.flags, train_flags, settings.sets, settings.config_file, init, resume
    )
    model = settings.flags.get("model")
    with train_progress(show_progress(quiet), quiet) as on_event:
        res = run_train(
            corpus, out, cfg, tc, model=model, init=init_cfg, val_paths=val, resume=resume, on_event=on_event
        )
    show_training(res, as_json)


def show_training(res: Any, as_json: bool) -> None:
    if as_json:
        keys = ("out", "steps", "tokens", "seconds", "stopped", "losses", "evals")
        print_json({k: getattr(res, k) for k in keys})
        return
    last = res.evals[-1] if res.evals else {}
    first = res.evals[0] if res.evals else {}
    rows = [
        ("checkpoint", res.out),
        ("steps", f"{res.steps} ({res.stopped} budget)"),
        ("tokens", f"{res.tokens:,}"),
        ("time", f"{res.seconds:.0f} s"),
        ("loss (last step)", f"{res.losses[-1]:.4f}" if res.losses else "-"),
    ]
    for key, label in (("ppl_memory", "val ppl with memory"), ("ppl_window", "val ppl window-only")):
        if key in last:
            rows.append((label, f"{first.get(key, float('nan')):.3f} -> {last[key]:.3f}"))
    print_table("memtx train", rows)


@contextmanager
def train_progress(enabled: bool, quiet: bool) -> Iterator[Callable[[str, dict[str, Any]], None]]:
    """Training events -> the bar (steps, loss, tokens/s, ETA) and log lines on stderr."""
    with progress(enabled) as bar:
        total: list[int | None] = [None]

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                total[0] = info["steps"]
                bar.update(info["step"], total[0], "train")
            elif kind == "step":
                bar.update(
                    info["step"],
                    total[0],
                    "train",
                    f"steps  loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s",
                )
            if kind in ("start", "eval"):
                if enabled:
                    bar.note(event_line(kind, info))
                else:
                    log(event_line(kind, info), quiet)

        yield on_event


def event_line(kind: str, info: dict[str, Any]) -> str:
    if kind == "start":
        return (
            f"training {info['trainable']:,} parameters on {info['sequences']} sequences "
            f"({info['val_sequences']} for validation), lr {info['lr']:g}, "
            f"memory layers {info['memory_layers'] or 'none'}"
        )
    vals = ", ".join(f"{k} {v:.3f}" for k, v in info.items() if k.startswith("ppl"))
    return f"step {info['step']}: validation {vals}"
