"""Perplexity and tokens/s of memory-setting variants on the first N tokens of each genre.

    python benchmarks/run_variants.py 8192 book,code,legal '{"memory": false}' '{"retrieval": "token"}' \
        '{"retrieval": "block", "block_chunk": 32}'

Each variant is a JSON object of Config fields applied on top of the model card's settings
(an optional "label" names it in the output).
One line per (genre, variant) on stdout. The block-retrieval figures in README came from this.
"""

import dataclasses
import json
import sys
import time

import torch

from memtx_cli.bench import CORPUS, GENRE_DOCS
from memtx_cli.config import merge_config
from memtx_cli.engine import run_stream
from memtx_cli.runtime import load_model


def main() -> None:
    n = int(sys.argv[1])
    genres = sys.argv[2].split(",")
    variants = [json.loads(v) for v in sys.argv[3:]] or [{}]
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    base = merge_config(lm.card.settings)
    for g in genres:
        ids = torch.tensor(lm.tokenizer.encode((CORPUS / GENRE_DOCS[g]).read_text(encoding="utf-8"))[:n])
        for v in variants:
            v = dict(v)
            label = v.pop("label", None)  # a short name for long settings (e.g. a head list)
            c = dataclasses.replace(base, **v)
            t = time.perf_counter()
            nll, st = run_stream(lm.model, ids, c)
            sec = time.perf_counter() - t
            ppl = float(nll.double().mean().exp())
            name = label or json.dumps(v)
            print(f"{g} {n} {name}: ppl {ppl:.3f}, {n / sec:.0f} tok/s, retrieval {st.retrieval_seconds:.1f} s")


if __name__ == "__main__":
    main()
