"""What the far past is worth: memory's margin over the window, split by where it comes from.

    python benchmarks/far_value.py 65536 code,code-js,legal \
        --config benchmarks/configs/memory_quality.yaml --json benchmarks/results/far_value.json

For the first N tokens of each document, per-token NLL of
- window: the sliding window (segments + XL cache + sinks), no memory;
- memory: the config's memory settings;
- near: the same memory limited to the trained context (`far_blocks: 0`; clamped positions only);
- full-8K: full causal attention over the last 4,097-8,192 tokens (regions of 4,096 tokens,
  each read after the 4,096 before it): all the model reads in its trained context, no memory.

Margins are log(window ppl / X ppl) in nats. They are printed over the prefixes 8K / 32K / 64K
(what `memtx bench memory` reports: streaming is causal, so a prefix of one run equals a shorter
run) and per 8K region. full-8K's margin is a ceiling for what memory can recover inside the
trained context; memory's margin above full-8K's, or above near's, is what the far past adds.
"""

import argparse
import dataclasses
import json
import math
import time

import torch

from memtx_cli.config import merge_config, read_yaml_config
from memtx_cli.engine.stream import full_nll, run_stream
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS, GENRE_DOCS


def margins(window: torch.Tensor, other: torch.Tensor, prefixes: list[int], region: int) -> dict:
    w, o = window.double(), other.double()
    return {
        "prefix": {p: float(w[: p - 1].mean() - o[: p - 1].mean()) for p in prefixes},
        "region": [float(w[s : s + region].mean() - o[s : s + region].mean()) for s in range(0, w.shape[0], region)],
        "ppl": {p: math.exp(float(o[: p - 1].mean())) for p in prefixes},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", type=int)
    ap.add_argument("genres")
    ap.add_argument("--config", default=None)
    ap.add_argument("--region", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    cfg = merge_config(lm.card.settings, read_yaml_config(args.config) if args.config else None)
    ctx = lm.args.context_length
    prefixes = [p for p in (8192, 32768, 65536) if p <= args.tokens]
    runs = {"window": dataclasses.replace(cfg, memory=False), "memory": cfg}
    if cfg.positions == "clamped":
        runs["near"] = dataclasses.replace(cfg, far_blocks=0)
    report: dict = {"settings": cfg.memory_settings(), "tokens": args.tokens, "documents": {}}
    for g in args.genres.split(","):
        text = (CORPUS / GENRE_DOCS[g]).read_text(encoding="utf-8")
        ids = torch.tensor(lm.tokenizer.encode(text)[: args.tokens])
        nll, secs = {}, {}
        for name, c in runs.items():
            t = time.perf_counter()
            nll[name] = run_stream(lm.model, ids, c)[0]
            secs[name] = time.perf_counter() - t
        t = time.perf_counter()
        nll["full-8K"] = full_nll(lm.model, ids, ctx // 2, before=ctx // 2)
        secs["full-8K"] = time.perf_counter() - t
        w = nll["window"].double()
        doc = {"doc": GENRE_DOCS[g], "ppl_window": {p: math.exp(float(w[: p - 1].mean())) for p in prefixes}}
        for name in nll:
            if name != "window":
                doc[name] = margins(nll["window"], nll[name], prefixes, args.region) | {"seconds": secs[name]}
        report["documents"][g] = doc
        heads = " / ".join(f"{p // 1024}K" for p in prefixes)
        print(f"{g} ({GENRE_DOCS[g]}): margin log(window/x) over the first {heads}")
        for name in nll:
            if name != "window":
                m = doc[name]
                pre = " / ".join(f"{m['prefix'][p]:.3f}" for p in prefixes)
                reg = " ".join(f"{r:.2f}" for r in m["region"])
                print(f"  {name:8s} {pre}   per {args.region // 1024}K region: {reg}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
