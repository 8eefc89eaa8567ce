"""Where a memory's gain comes from: per-token NLL by where the token could be copied from.

    python benchmarks/copy_classes.py 32768 code --config benchmarks/configs/memory_quality.yaml \
        '{"label": "16 far blocks", "far_blocks": 16, "far_top_k": 0}' '{"label": "far top-32"}'

Every token past the trained context (8,192) is put in one class by the last earlier occurrence
of the n+1 tokens ending at it (its n-token context and itself; n = 8 by default):
- window: at most 1,028 tokens back (the local window: sinks + XL cache + segment);
- near: 1,029 to 8,191 tokens back (memory at real distances, within the trained context);
- far-only: only more than 8,191 tokens back (only a far memory can hold it);
- none: never seen.
For the window baseline and each variant (JSON Config fields over the config; "label" names
it) it prints the mean NLL per class and the margin log(window/x) over the prefixes 8K / 16K /
32K / 64K. Variants run one causal stream each.
"""

import argparse
import dataclasses
import json
import time

import torch

from memtx_cli.config import merge_config, read_yaml_config
from memtx_cli.engine.stream import run_stream
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS, GENRE_DOCS

CLASSES = ("window", "near", "far-only", "none")


def copy_classes(ids: list[int], n: int, window: int, horizon: int) -> torch.Tensor:
    """(T,) class of every token (index into CLASSES); the first n tokens are `none`."""
    last: dict[tuple[int, ...], int] = {}
    cls = torch.full((len(ids),), 3)
    for t in range(n, len(ids)):
        key = tuple(ids[t - n : t + 1])
        prev = last.get(key)
        if prev is not None:
            d = t - prev
            cls[t] = 0 if d <= window else (1 if d <= horizon else 2)
        last[key] = t
    return cls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", type=int)
    ap.add_argument("genre")
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--config", default=None)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_intermixed_args()  # variants may follow --config
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    cfg = merge_config(lm.card.settings, read_yaml_config(args.config) if args.config else None)
    horizon = lm.args.context_length - 1
    window = cfg.sinks + cfg.segment * (2 if cfg.xl_cache else 1)
    ids = lm.tokenizer.encode((CORPUS / GENRE_DOCS[args.genre]).read_text(encoding="utf-8"))[: args.tokens]
    cls = copy_classes(ids, args.n, window, horizon)[1:]  # NLL index i predicts token i + 1
    past = torch.arange(len(ids) - 1) >= horizon  # tokens past the trained context
    counts = " ".join(f"{c} {int(((cls == i) & past).sum())}" for i, c in enumerate(CLASSES))
    print(f"{args.genre} {len(ids)} tokens, n={args.n}; tokens past {horizon + 1} by class: {counts}")
    runs = [("window", dataclasses.replace(cfg, memory=False))]
    for v in args.variants or ["{}"]:
        v = json.loads(v)
        label = v.pop("label", None) or json.dumps(v)
        runs.append((label, dataclasses.replace(cfg, **v)))
    w = None
    prefixes = [p for p in (8192, 16384, 32768, 65536) if p <= len(ids)]
    for label, c in runs:
        t = time.perf_counter()
        nll = run_stream(lm.model, torch.tensor(ids), c)[0].double()
        sec = time.perf_counter() - t
        w = nll if w is None else w
        per = " | ".join(f"{name} {float(nll[(cls == i) & past].mean()):.3f}" for i, name in enumerate(CLASSES))
        mar = " / ".join(f"{float(w[: p - 1].mean() - nll[: p - 1].mean()):.4f}" for p in prefixes)
        ppl = float(nll.mean().exp())
        print(f"{label}: ppl {ppl:.4f}, {len(ids) / sec:.0f} tok/s; NLL past the context by class: {per}", flush=True)
        print(f"  margin over {' / '.join(f'{p // 1024}K' for p in prefixes)}: {mar}", flush=True)


if __name__ == "__main__":
    main()
