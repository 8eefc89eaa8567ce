"""Recall and perplexity of memory settings side by side: passkey answers and held-out gaps.

    python benchmarks/recall_variants.py passkey --length 8000 --depths 0.1,0.7 \
        "" "far-scope=all;far-heads=all;far-bias=0"
    python benchmarks/recall_variants.py ppl --tokens 8192 "" "far-scope=all;recall-heads=18.2,17.1,23.0,20.2"

Each variant is a `;`-separated list of `--set` items on top of the defaults ("" = the
defaults). `passkey`: the prompts of `memtx bench passkey` (keys from --seed), answered greedily
with each variant, printed with seconds per trial. `ppl`: each held-out document's first N
tokens streamed with the window and every variant interleaved segment by segment (their tok/s
see the same machine), and full attention when N fits the trained context: the share of the
window-to-full log-perplexity gap each variant recovers.

Held out: documents no setting was chosen on (the per-head budgets used Persuasion, the Lua
sources, the SPDX texts and the Debian constitution; the head rankings Northanger Abbey,
pydecimal.py and the GPL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from memtx_cli.engine.generate import Sampling, generate, stop_token_ids
from memtx_cli.engine.session import load_for, resolve_settings
from memtx_cli.engine.stream import full_nll, run_streams
from memtx_cli.tasks.passkey import answer_is, build_prompt

sys.path.insert(0, str(Path(__file__).parent))
from _meta import CORPUS, REPO, run_metadata  # noqa: E402

HELD_OUT = ["books/milton_paradise_lost.txt", "code/cpython311_typing.py", "code/lodash.js"]


def sets_of(variant: str) -> list[str]:
    return [s for s in variant.split(";") if s]


def passkey(lm, variants: list[str], length: int, depths: list[float], seed: int) -> list[dict]:
    rng = random.Random(seed)
    keys = [rng.randint(10000, 99999) for _ in depths]
    rows = []
    for v in variants:
        cfg, _ = resolve_settings({}, sets_of(v))
        t0, answers, ok = time.perf_counter(), [], 0
        for d, key in zip(depths, keys, strict=True):
            ids, _ = build_prompt(lm, length, d, key)
            g = generate(lm, ids, cfg, Sampling(max_tokens=8, temperature=0), stop_ids=stop_token_ids(lm))
            ok += answer_is(g.text, key)
            answers.append(g.text.strip()[:16])
        row = {"variant": v or "defaults", "correct": ok, "trials": len(depths), "answers": answers}
        row["seconds_per_trial"] = (time.perf_counter() - t0) / len(depths)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def ppl(lm, variants: list[str], tokens: int, docs: list[str]) -> list[dict]:
    base, _ = resolve_settings({}, [])
    cfgs = [dataclasses.replace(base, memory=False)] + [resolve_settings({}, sets_of(v))[0] for v in variants]
    rows = []
    for doc in docs:
        ids = torch.tensor(lm.tokenizer.encode((CORPUS / doc).read_text(encoding="utf-8"))[:tokens])
        runs = run_streams(lm.model, ids, cfgs)
        lw = float(runs[0][0].double().mean())
        lf = None
        if len(ids) <= lm.args.context_length:
            lf = float(full_nll(lm.model, ids, lm.args.context_length).double().mean())
        row = {"doc": doc, "tokens": len(ids), "ppl_full": None if lf is None else math.exp(lf), "variants": []}
        for (nll, _, sec), v in zip(runs, ["window", *variants], strict=True):
            lv = float(nll.double().mean())
            row["variants"].append(
                {
                    "variant": v or "defaults",
                    "ppl": math.exp(lv),
                    "gap_recovered": None if lf is None else (lw - lv) / (lw - lf),
                    "margin_over_window": 1 - math.exp(lv - lw),
                    "tokens_per_s": len(ids) / sec,
                }
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["passkey", "ppl"])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--docs", default=",".join(HELD_OUT))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lm = load_for(resolve_settings({}, [])[0])
    if a.what == "passkey":
        rows = passkey(lm, a.variants, a.length, [float(x) for x in a.depths.split(",")], a.seed)
    else:
        rows = ppl(lm, a.variants, a.tokens, a.docs.split(","))
    out = a.out or REPO / "benchmarks" / "results" / f"recall_variants_{a.what}.json"
    out.write_text(json.dumps({"meta": run_metadata(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
