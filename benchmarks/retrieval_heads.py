"""Find the heads that retrieve and copy: the `recall-heads` of a model card.

    python benchmarks/retrieval_heads.py [--model smollm2-135m] [--tokens 3072] [--out FILE]

The retrieval score of Wu et al. 2024 (*Retrieval Head Mechanistically Explains Long-Context
Factuality*): while the model reproduces a span it has seen earlier in its context, a head
"retrieves" at a step when its strongest attention falls on the earlier token that is being
produced now. Full causal attention runs over prompts of `--tokens` tokens (within the trained
context, so no memory is involved) that end by reproducing something stated once, far back:

- passkey prompts (the needle of `memtx bench passkey`, key at 5 depths), answered with the key;
- real text (the tuning documents below), with a 32-token passage from its first half repeated
  at the end (the model copies it once it has recognised it).

For every query head and every reproduced token (the query is the token before it), the hit is
argmax over keys == the source position. Scores are hits / steps per task, averaged over the
two tasks; a KV head's score is the best of its query heads (one copying query head is enough
for a KV head's memory to hold the key). Prints the KV heads best first with their scores.

Documents: the tuning split of the memory benchmark's held-out set (Northanger Abbey,
pydecimal.py, the GPL); the recall and perplexity benchmarks report on the others.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from memtx_cli.model.llama import Attention, grouped_attention
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.passkey import build_prompt

sys.path.insert(0, str(Path(__file__).parent))
from _meta import CORPUS, REPO, run_metadata  # noqa: E402

TUNING = ["books/austen_northangerabbey.txt", "code/cpython311_pydecimal.py", "legal/GPL-3.txt"]


class ProbeAttention(Attention):
    """Plain attention that records, for the query rows in `rows`, each head's argmax key."""

    rows: torch.Tensor | None = None
    found: list[torch.Tensor] = []

    def attend(self, q, q_raw, k, v, bias, mem=None, inv_freq=None):  # noqa: ANN001, ANN201
        if ProbeAttention.rows is not None:
            g = self.n_heads // self.n_kv
            kk = k.repeat_interleave(g, 1)  # (1, H, S, D)
            s = q[:, :, ProbeAttention.rows] @ kk.transpose(-1, -2)  # (1, H, R, S)
            if bias is not None:
                s = s + bias[ProbeAttention.rows]
            ProbeAttention.found.append(s[0].argmax(-1))  # (H, R)
        return grouped_attention(q, k, v, bias)


def hits(model, ids: list[int], copies: list[tuple[int, int]]) -> torch.Tensor:
    """(layers, H) hits over `copies` [(query position, source position)] in one forward."""
    ProbeAttention.rows = torch.tensor([q for q, _ in copies])
    ProbeAttention.found = []
    model.forward_segment(torch.tensor([ids]))
    src = torch.tensor([s for _, s in copies])
    return torch.stack([(f == src).sum(-1) for f in ProbeAttention.found]).float()  # (L, H)


def passkey_samples(lm, tokens: int, rng: random.Random) -> list[tuple[list[int], list[tuple[int, int]]]]:
    out = []
    for depth in (0.1, 0.3, 0.5, 0.7, 0.9):
        key = rng.randint(10000, 99999)
        ids, at = build_prompt(lm, tokens, depth, key)
        ans = lm.tokenizer.encode(f" {key}")
        # where the key's tokens were stated: the first run of them after the needle starts
        needle = next(j for j in range(at, len(ids)) if ids[j : j + len(ans) - 1] == ans[1:])
        full = ids + ans
        # the token before each answer token is the query; its source is the key's token in the needle
        copies = [(len(ids) - 1 + j, needle + j - 1) for j in range(1, len(ans))]
        out.append((full, copies))
    return out


def text_samples(lm, tokens: int, rng: random.Random) -> list[tuple[list[int], list[tuple[int, int]]]]:
    out = []
    for rel in TUNING:
        ids = lm.tokenizer.encode((CORPUS / rel).read_text(encoding="utf-8"))
        for _ in range(2):
            start = rng.randrange(0, len(ids) - tokens)
            body = ids[start : start + tokens - 40]
            src = rng.randrange(64, len(body) // 2)
            span = body[src : src + 32]
            full = body + span
            n = len(body)
            # reproducing span[j] (j >= 2: the first tokens are the model recognising the passage)
            out.append((full, [(n + j - 1, src + j) for j in range(2, 32)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=3072)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "retrieval_heads.json")
    a = ap.parse_args()
    lm = load_model(a.model, dtype="float32")
    model = lm.model
    for layer in model.layers:
        layer.attn.__class__ = ProbeAttention
    rng = random.Random(a.seed)
    args = model.args
    scores = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        tasks = (("passkey", passkey_samples(lm, a.tokens, rng)), ("text", text_samples(lm, a.tokens, rng)))
        for name, samples in tasks:
            total, steps = torch.zeros(args.n_layers, args.n_heads), 0
            for ids, copies in samples:
                total += hits(model, ids, copies)
                steps += len(copies)
            scores[name] = total / steps
            print(f"{name}: {len(samples)} prompts, {steps} copy steps", file=sys.stderr)
    q_score = (scores["passkey"] + scores["text"]) / 2  # (L, H)
    g = args.n_heads // args.n_kv_heads
    kv_score = q_score.view(args.n_layers, args.n_kv_heads, g).amax(-1)  # (L, KV)
    order = sorted(((l_, h) for l_ in range(args.n_layers) for h in range(args.n_kv_heads)), key=lambda x: -kv_score[x])
    ranking = [f"{l_}.{h}" for l_, h in order]
    print(",".join(ranking))
    for l_, h in order[:16]:
        print(
            f"{l_}.{h}: {kv_score[l_, h]:.3f} (passkey {scores['passkey'][l_, h * g : (h + 1) * g].max():.3f}, "
            f"text {scores['text'][l_, h * g : (h + 1) * g].max():.3f})",
            file=sys.stderr,
        )
    a.out.write_text(
        json.dumps(
            {
                "meta": {**run_metadata(), "seconds": time.perf_counter() - t0, "documents": TUNING},
                "ranking": ranking,
                "kv_scores": {f"{l_}.{h}": round(float(kv_score[l_, h]), 4) for l_, h in order},
                "query_scores_passkey": [[round(float(x), 4) for x in r] for r in scores["passkey"]],
                "query_scores_text": [[round(float(x), 4) for x in r] for r in scores["text"]],
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
