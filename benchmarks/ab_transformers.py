"""A/B of memtx against transformers in one process, runs interleaved (less drift than a table).

python benchmarks/ab_transformers.py float32 1024
"""

from __future__ import annotations

import sys
import time

import torch

from memtx_cli.engine.stream import full_nll, stream_nll
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import _transformers_runner, default_text


def main() -> None:
    dtype, n = sys.argv[1], int(sys.argv[2])
    lm = load_model(None, device="cpu", dtype=dtype)
    tf = _transformers_runner(lm.card.weights_path(), lm.dtype)
    base = lm.tokenizer.encode(default_text().read_text(encoding="utf-8"))
    ids = torch.tensor((base * (n // len(base) + 1))[:n])
    fns = {
        "full": lambda: full_nll(lm.model, ids, lm.args.context_length),
        "window": lambda: stream_nll(lm.model, ids, 512),
        "transformers": lambda: tf(ids),
    }
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(4):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    tps = {k: n / sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        dtype, n, {k: round(v) for k, v in tps.items()}, f"full/transformers {tps['full'] / tps['transformers']:.2f}x"
    )


if __name__ == "__main__":
    main()
