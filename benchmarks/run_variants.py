"""Perplexity and tokens/s of memory-setting variants on the first N tokens of each genre.

    python benchmarks/run_variants.py 8192 book,code,legal '{"memory": false}' '{"retrieval": "token"}' \
        '{"retrieval": "block", "block_chunk": 32}'
    python benchmarks/run_variants.py 65536:8192,32768 code '{"memory": false}' '{}'

N:P,Q also prints each variant's perplexity over the first P and Q tokens: scoring is causal,
so a prefix of a run is the shorter run (the same numbers as running P tokens alone).

Each variant is a JSON object of Config fields applied on top of the model card's settings
(an optional "label" names it in the output). The variants run interleaved, segment by
segment, each timed over its own steps (`engine.run_streams`): their tok/s are paired.
One line per (genre, variant) on stdout. Interleaved comparisons in docs/decisions.md came from this.
"""

import dataclasses
import json
import sys

import torch

from memtx_cli.config import merge_config
from memtx_cli.engine.stream import run_streams
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS, GENRE_DOCS


def main() -> None:
    length, _, spec = sys.argv[1].partition(":")
    n = int(length)
    prefixes = [int(p) for p in spec.split(",") if p]
    genres = sys.argv[2].split(",")
    variants = [json.loads(v) for v in sys.argv[3:]] or [{}]
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    base = merge_config(lm.card.settings)
    names, cfgs = [], []
    for v in variants:
        v = dict(v)
        label = v.pop("label", None)  # a short name for long settings (e.g. a head list)
        names.append(label or json.dumps(v))
        cfgs.append(dataclasses.replace(base, **v))
    for g in genres:
        ids = torch.tensor(lm.tokenizer.encode((CORPUS / GENRE_DOCS[g]).read_text(encoding="utf-8"))[:n])
        # Interleaved segment by segment: the variants' tok/s see the same machine.
        for name, (nll, st, sec) in zip(names, run_streams(lm.model, ids, cfgs), strict=True):
            ppl = float(nll.double().mean().exp())
            # token i's NLL predicts token i+1: the first p tokens hold p-1 predictions
            pre = "".join(f", ppl@{p} {float(nll[: p - 1].double().mean().exp()):.3f}" for p in prefixes)
            print(f"{g} {n} {name}: ppl {ppl:.3f}{pre}, {n / sec:.0f} tok/s, retrieval {st.retrieval_seconds:.1f} s")


if __name__ == "__main__":
    main()
