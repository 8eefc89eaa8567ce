"""The passkey retrieval test (Mohtashami & Jaggi, 2023, "Landmark Attention"): a random 5-digit
key is stated once inside long, repetitive filler text at a chosen depth; at the end the model
is asked for it. The same prompt is answered with memory and with the window alone (the very
same segments, memory off), greedy, so both see exactly the same tokens."""

from __future__ import annotations

import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from memtx_cli.config import Config
from memtx_cli.engine.generate import Sampling, generate, stop_token_ids
from memtx_cli.errors import MemtxError
from memtx_cli.model.loading import LoadedModel

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def parse_lengths(spec: str) -> list[int]:
    """'2k,8k,32768' -> [2048, 8192, 32768] (k = 1024 tokens)."""
    out = []
    for part in spec.split(","):
        p = part.strip().lower()
        try:
            n = int(float(p[:-1]) * 1024) if p.endswith("k") else int(p)
        except ValueError:
            raise MemtxError(f"--lengths: {part!r} is not a token count (e.g. 4k,16k,32768)") from None
        if n < 256:
            raise MemtxError(f"--lengths: {part!r} is too short; use at least 256 tokens")
        out.append(n)
    if not out:
        raise MemtxError("--lengths is empty")
    return out


def parse_depths(spec: str) -> list[float]:
    """'0.1,0.5,0.9' -> those depths; a bare count N -> N evenly spaced depths (i + 0.5) / N."""
    s = spec.strip()
    if s.isdigit():
        n = int(s)
        if n < 1:
            raise MemtxError("--depths: the count must be >= 1")
        return [round((i + 0.5) / n, 4) for i in range(n)]
    try:
        depths = [float(x) for x in s.split(",")]
    except ValueError:
        raise MemtxError(f"--depths: {spec!r} is neither a count nor a list like 0.1,0.5,0.9") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise MemtxError(f"--depths must lie in [0, 1], got {spec!r}")
    return depths


def build_text(lm: LoadedModel, length: int, depth: float, key: int) -> tuple[str, str]:
    """A prompt of about `length` tokens with the key at `depth` (0 = start, 1 = just before
    the question), as its text and the text before the key's sentence."""
    tok = lm.tokenizer
    per_filler = len(tok.encode(FILLER * 16)) / 16
    fixed = len(tok.encode(INTRO + NEEDLE.format(key=key) + QUESTION))
    n = max(1, int((length - fixed) / per_filler))
    before = round(depth * n)
    head = INTRO + FILLER * before
    return head + NEEDLE.format(key=key) + FILLER * (n - before) + QUESTION, head


def build_prompt(lm: LoadedModel, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of build_text's prompt, and the token position where the key's sentence starts."""
    text, head = build_text(lm, length, depth, key)
    return lm.tokenizer.encode(text), len(lm.tokenizer.encode(head))


def answer_is(text: str, key: int) -> bool:
    """Right when the first number in the answer is the key."""
    m = re.search(r"\d+", text)
    return m is not None and m.group(0) == str(key)


def run_passkey(
    lm: LoadedModel,
    cfg: Config,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    window: bool = True,
    log: Callable[[str], None] = lambda m: None,
    bank: bool = False,
    precision: str | None = None,
) -> dict[str, Any]:
    """Accuracy with memory (cfg as given) and window-only (memory off, same segments), per
    length and depth. Keys come from `seed`: the same seed asks the same questions. bank=True:
    the haystack (all but the question) is ingested into a bank (its codec `precision`) and
    only the question is the prompt, answered with the bank as memory; window-only then sees
    the question alone."""
    if trials < 1:
        raise MemtxError(f"--trials must be >= 1, got {trials}")
    if not cfg.memory:
        raise MemtxError("bench passkey compares memory with the window; drop --no-memory")
    cfg.validate_for(lm.args.context_length)
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        trials_out = []
        for depth in depths:
            for trial in range(trials):
                out = one_trial(lm, cfg, length, depth, rng.randint(10000, 99999), window, bank, precision)
                out["trial"] = trial
                trials_out.append(out)
                log(
                    f"passkey {length:>6} tokens, depth {depth:.2f}, trial {trial}: key {out['key']} | memory "
                    f"{out['answer_memory'].strip()[:12]!r} {'ok' if out['correct_memory'] else 'WRONG'}"
                    + (f" | window {'ok' if out['correct_window'] else 'wrong'}" if window else "")
                    + f" ({out['seconds_memory']:.1f} s)"
                )
        rows.append(summary_row(length, depths, trials, trials_out, window))
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "settings": cfg.memory_settings(),
        "mode": "bank" if bank else "document",
        "precision": (precision or "float16") if bank else None,
        "depths": depths,
        "seed": seed,
        "window_tokens": window_tokens(cfg),
        "rows": rows,
    }


def one_trial(
    lm: LoadedModel,
    cfg: Config,
    length: int,
    depth: float,
    key: int,
    window: bool,
    bank: bool,
    precision: str | None = None,
) -> dict[str, Any]:
    """One key at one depth, answered greedily with memory and (window) with memory off."""
    text, head = build_text(lm, length, depth, key)
    ids = lm.tokenizer.encode(text)
    at = len(lm.tokenizer.encode(head))
    out: dict[str, Any] = {"depth": depth, "key": key, "tokens": len(ids), "key_position": at}
    # the window alone can see the key (never with a bank: the prompt is the question alone)
    out["key_in_window"] = not bank and len(ids) - at <= window_tokens(cfg)
    sampling = Sampling(max_tokens=8, temperature=0)
    stops = stop_token_ids(lm)
    modes = [("memory", cfg)] + ([("window", replace(cfg, memory=False))] if window else [])
    with tempfile.TemporaryDirectory(prefix="memtx-passkey-") as tmp:
        memory = None
        if bank:  # the haystack as a bank; the prompt is the question alone
            t0 = time.perf_counter()
            memory = haystack_bank(lm, cfg, Path(tmp) / "haystack.idx", text.removesuffix(QUESTION), precision)
            out["seconds_ingest"] = time.perf_counter() - t0
            ids = lm.tokenizer.encode(QUESTION.strip())
        try:
            for name, c in modes:
                t0 = time.perf_counter()
                g = generate(lm, ids, c, sampling, memory if name == "memory" else None, stop_ids=stops)
                out[f"answer_{name}"] = g.text
                out[f"correct_{name}"] = answer_is(g.text, key)
                out[f"seconds_{name}"] = time.perf_counter() - t0
        finally:
            if memory is not None:
                memory.close()
    return out


def window_tokens(cfg: Config) -> int:
    """Tokens the window alone sees: the sinks, the XL cache and the segment."""
    return cfg.sinks + cfg.segment * (2 if cfg.xl_cache else 1)


def haystack_bank(lm: LoadedModel, cfg: Config, path: Path, text: str, precision: str | None = None) -> Any:
    """A new bank at `path` holding `text` (as `memtx ingest` would), opened for reading."""
    from memtx_cli.bank.ingest import open_or_create_bank, remember_text
    from memtx_cli.bank.store import Bank

    w = open_or_create_bank(path, lm, cfg, 0, "fifo", precision=precision)
    try:
        remember_text(lm, w, "haystack.txt", text, cfg)
    finally:
        w.close()
    return Bank.open(path, writer=False, verify=False)


def summary_row(
    length: int, depths: list[float], trials: int, trials_out: list[dict[str, Any]], window: bool
) -> dict[str, Any]:
    """A length's accuracy and seconds per trial, overall and per depth."""
    n = len(trials_out)
    row: dict[str, Any] = {
        "length": length,
        "tokens": round(sum(t["tokens"] for t in trials_out) / n),
        "trials": n,
        "accuracy_memory": sum(t["correct_memory"] for t in trials_out) / n,
        "seconds_per_trial": sum(t["seconds_memory"] for t in trials_out) / n,
        "by_depth": {str(d): sum(t["correct_memory"] for t in trials_out if t["depth"] == d) / trials for d in depths},
        "details": trials_out,
    }
    if "seconds_ingest" in trials_out[0]:
        row["seconds_ingest_per_trial"] = sum(t["seconds_ingest"] for t in trials_out) / n
    if window:
        row["accuracy_window"] = sum(t["correct_window"] for t in trials_out) / n
        row["seconds_per_trial_window"] = sum(t["seconds_window"] for t in trials_out) / n
        out_of_window = [t for t in trials_out if not t["key_in_window"]]
        row["accuracy_window_key_outside"] = (
            sum(t["correct_window"] for t in out_of_window) / len(out_of_window) if out_of_window else None
        )
    return row
