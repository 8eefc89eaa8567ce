"""Which FAISS codec could store a bank's keys and values: bytes per vector against what bank
reads lose, on real keys, values and queries of the default model.

Per (layer, KV head), keys and values come from one document (what a bank holds: the first
half trains each codec, as a bank's first document would, the second half is encoded), and
queries from another document (what reads the bank). For every codec: the relative error of
the attention output softmax(q K^T / sqrt(d)) V over the encoded memories against float32,
and how many of each query's exact top-32 keys stay in its top-32. Scores use raw (unrotated)
queries and keys: a bank is read at one fixed distance, a rotation both sides share.

    python benchmarks/bank_codecs.py --out benchmarks/results/bank_codecs.json
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch
from _meta import CORPUS, run_metadata

from memtx_cli.model.loading import load_model

# "np": no polysemous training (it only reorders codes for Hamming search, and took 30x longer)
CODECS = ["SQfp16", "SQ8", "SQ6", "SQ4", "PQ32np", "PQ16np", "PQ8np"]
PAIRS = {  # (memories, queries): one book, one code case
    "book": ("books/austen_northangerabbey.txt", "books/austen_persuasion.txt"),
    "code": ("code/cpython311_pydecimal.py", "code/lodash.js"),
}


def capture(lm, text: str, n: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Raw q, k, v of every layer for the first n tokens of `text` (one full-attention pass)."""
    ids = torch.tensor(lm.tokenizer.encode(text)[:n])[None]
    got: dict[int, tuple[torch.Tensor, ...]] = {}
    for i, blk in enumerate(lm.model.layers):
        orig = blk.attn.project

        def hook(x, i=i, orig=orig):
            q, k, v = orig(x)
            got[i] = (q[0].float(), k[0].float(), v[0].float())
            return q, k, v

        blk.attn.project = hook
    with torch.inference_mode():
        lm.model(ids)
    for blk in lm.model.layers:
        del blk.attn.project
    return got


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = torch.from_numpy(q) @ torch.from_numpy(k).T / np.sqrt(q.shape[1])
    out = torch.softmax(s, -1) @ torch.from_numpy(v)
    return out.numpy(), s.topk(32, -1).indices.numpy()


def codec_row(spec: str, d: int, train: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, int]:
    index = faiss.index_factory(d, spec)
    index.train(np.ascontiguousarray(train))
    codes = index.sa_encode(np.ascontiguousarray(data))
    return index.sa_decode(codes), codes.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="memories per document (half train, half encoded)")
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--layer-step", type=int, default=1, help="every n-th layer (3: layers 0, 3, 6, ...)")
    ap.add_argument("--out")
    a = ap.parse_args()
    lm = load_model(None, device="cpu", dtype="float32")
    n_layers, n_kv, d = lm.args.n_layers, lm.args.n_kv_heads, lm.args.head_dim
    g = lm.args.n_heads // n_kv
    res = {"meta": run_metadata(), "codecs": CODECS, "layer_step": a.layer_step, "cases": {}}
    for case, (mem_doc, q_doc) in PAIRS.items():
        t0 = time.time()
        mem = capture(lm, (CORPUS / mem_doc).read_text(encoding="utf-8"), a.tokens)
        qs = capture(lm, (CORPUS / q_doc).read_text(encoding="utf-8"), a.queries)
        half = a.tokens // 2
        rows = {c: {"err": [], "top32": [], "bytes": 0} for c in CODECS}
        print(f"{case}: captured ({time.time() - t0:.0f} s)", flush=True)
        for layer in range(0, n_layers, a.layer_step):
            for h in range(n_kv):
                k = mem[layer][1][h].numpy()
                v = mem[layer][2][h].numpy()
                q = qs[layer][0][h * g : (h + 1) * g].reshape(-1, d).numpy()  # the group's queries
                ref, top_ref = attend(q, k[half:], v[half:])
                for c in CODECS:
                    kd, kb = codec_row(c, d, k[:half], k[half:])
                    vd, vb = codec_row(c, d, v[:half], v[half:])
                    out, top = attend(q, kd, vd)
                    rows[c]["err"].append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
                    kept = [len(np.intersect1d(a_, b_)) / 32 for a_, b_ in zip(top, top_ref, strict=True)]
                    rows[c]["top32"].append(float(np.mean(kept)))
                    rows[c]["bytes"] = kb + vb
        res["cases"][case] = {
            c: {
                "bytes_per_head_token": r["bytes"],
                "mean_rel_error": float(np.mean(r["err"])),
                "p90_rel_error": float(np.percentile(r["err"], 90)),
                "top32_kept": float(np.mean(r["top32"])),
            }
            for c, r in rows.items()
        }
        print(f"{case} ({time.time() - t0:.0f} s)", flush=True)
        for c, r in res["cases"][case].items():
            print(
                f"  {c:12} {r['bytes_per_head_token']:4d} B/head/token  error mean {r['mean_rel_error']:.4f} "
                f"p90 {r['p90_rel_error']:.4f}  top-32 kept {r['top32_kept']:.3f}"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
