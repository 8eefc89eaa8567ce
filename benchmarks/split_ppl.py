"""Perplexity of memory settings before and after a split point, against full attention.

    python benchmarks/split_ppl.py 8192 legal-versions auto '{"memory": false}' '{}' \
        '{"memory_layers": "all", "positions": "true", "blocks": 256}'

N tokens of a genre's document; the split is a token index, or `auto` for legal-versions
(where version 1.1 of the Debian constitution starts: from there on the text copies version
1.0). Each variant is a JSON object of Config fields on top of the model card's settings (an
optional "label" names it). README "Attention sinks at their real distance" came from this.
"""

import dataclasses
import json
import sys
import time

import torch

from memtx_cli.config import merge_config
from memtx_cli.engine.stream import full_nll, run_stream
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS, GENRE_DOCS


def main() -> None:
    n, genre, split = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    base = merge_config(lm.card.settings)
    text = (CORPUS / GENRE_DOCS[genre]).read_text(encoding="utf-8")
    cut = len(lm.tokenizer.encode(text[: text.index("===== constitution.1.1")])) if split == "auto" else int(split)
    print(f"split at token {cut}")
    ids = torch.tensor(lm.tokenizer.encode(text)[:n])

    def report(name: str, nll: torch.Tensor, sec: float) -> None:
        nll = nll.double()  # nll[i] is the loss of token i + 1
        a, b = nll[: cut - 1].mean().exp(), nll[cut - 1 :].mean().exp()
        print(f"{name}: all {nll.mean().exp():.3f}  before {a:.3f}  from the split {b:.3f}  ({sec:.0f} s)", flush=True)

    if n <= lm.args.context_length:
        t = time.perf_counter()
        report("full attention", full_nll(lm.model, ids, lm.args.context_length), time.perf_counter() - t)
    for v in sys.argv[4:]:
        v = json.loads(v)
        label = v.pop("label", None) or json.dumps(v)
        t = time.perf_counter()
        nll, _ = run_stream(lm.model, ids, dataclasses.replace(base, **v))
        report(label, nll, time.perf_counter() - t)


if __name__ == "__main__":
    main()
