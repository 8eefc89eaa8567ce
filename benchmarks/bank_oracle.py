"""How much could any bank help a held-out file of the same codebase? A bound set by the model.

    python benchmarks/bank_oracle.py --out benchmarks/results/bank_oracle.json
    python benchmarks/bank_oracle.py --past lua-5.4/lauxlib.c --held lua-5.4/lstrlib.c --out ...

Held-out Lua files (lstrlib.c, as in bank_usefulness.py, and two smaller libraries) are scored
chunk by chunk (from token `--own` on) with full attention after their own preceding `--own`
tokens (what the document's own memory gives), then again with sibling text placed directly before that, inside
the trained context where exact attention reads every token of it: more than a retrieval memory
delivers of the same text. The siblings are fixed before any scoring, the text a reader would
expect a library file to lean on: the C API headers (lua.h, lauxlib.h, luaconf.h), the
auxiliary library and the API implementation (lauxlib.c, lapi.c), and another standard library
(lmathlib.c), each its first `--cross` tokens. Reported per held-out file: perplexity with its
own context only, with each sibling in front, and with the best sibling of each chunk chosen
after the fact (an optimistic selection no reader can make). If even that stays far below the
bank target, the limit is what this model does with another file's text, not retrieval.

--past SIBLING: instead, memtx's own memory with the defaults: each held-out file streamed
alone and with the whole SIBLING before it as its past; its perplexity from several token
positions on (past the first window, the sibling is read through memory only).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._meta import CORPUS, emit, run_metadata  # noqa: E402

HELD = ["lua-5.4/lstrlib.c", "lua-5.4/ltablib.c", "lua-5.4/lbaselib.c"]
SIBLINGS = [
    "lua-5.4/lua.h",
    "lua-5.4/lauxlib.h",
    "lua-5.4/luaconf.h",
    "lua-5.4/lauxlib.c",
    "lua-5.4/lapi.c",
    "lua-5.4/lmathlib.c",
]


def lua_files() -> dict[str, str]:
    text = (CORPUS / "code" / "lua54_interpreter_repo.c.txt").read_text(encoding="utf-8")
    parts = re.split(r"^/\* ===== FILE: (.+?) ===== \*/\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=2048, help="tokens scored per forward")
    ap.add_argument("--own", type=int, default=2048, help="tokens of the file's own text before each chunk")
    ap.add_argument("--cross", type=int, default=4096, help="tokens of sibling text before that")
    ap.add_argument("--held", default=",".join(HELD))
    ap.add_argument("--past", help="a sibling file read as the held-out files' own past by memtx's memory")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.past:
        return own_past(a)

    import torch

    from memtx_cli.model.llama import token_nll
    from memtx_cli.model.loading import load_model

    lm = load_model(None, device="cpu")
    files = lua_files()
    sib = {name: lm.tokenizer.encode(files[name])[: a.cross] for name in SIBLINGS}

    @torch.inference_mode()
    def chunk_nll(prefix: list[int], chunk: list[int]) -> float:
        """Summed NLL of chunk's tokens after prefix (non-empty), full attention."""
        ids = torch.tensor(prefix + chunk)
        hidden = lm.model.forward_segment(ids[None]).hidden[0]
        p = len(prefix)
        return float(token_nll(lm.model, hidden[p - 1 : -1], ids[p:]).double().sum())

    rows = []
    for held in a.held.split(","):
        ids = lm.tokenizer.encode(files[held])
        own_sum, n = 0.0, 0
        with_sib = {name: 0.0 for name in SIBLINGS}
        best_sum = 0.0
        t0 = time.perf_counter()
        for s in range(a.own, len(ids), a.chunk):  # every chunk after a full `own` of its file
            chunk, ctx = ids[s : s + a.chunk], ids[s - a.own : s]
            own = chunk_nll(ctx, chunk)
            got = {name: chunk_nll(sib[name] + ctx, chunk) for name in SIBLINGS if name != held}
            own_sum += own
            n += len(chunk)
            for k, v in got.items():
                with_sib[k] += v
            best_sum += min([own, *got.values()])
        ppl_own = math.exp(own_sum / n)
        row = {
            "held_out": held,
            "tokens": n,
            "ppl_own_context": ppl_own,
            "ppl_with_sibling": {k: math.exp(v / n) for k, v in with_sib.items() if k != held},
            "ppl_best_sibling_per_chunk": math.exp(best_sum / n),
            "seconds": time.perf_counter() - t0,
        }
        row["best_gain"] = 1 - row["ppl_best_sibling_per_chunk"] / ppl_own
        row["fixed_sibling_gain"] = {k: 1 - v / ppl_own for k, v in row["ppl_with_sibling"].items()}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    settings = {"chunk": a.chunk, "own": a.own, "cross": a.cross, "siblings": SIBLINGS, "dtype": str(lm.dtype)}
    emit({"meta": run_metadata(), "settings": settings, "rows": rows}, a.out)


def own_past(a: argparse.Namespace) -> None:
    import torch

    from memtx_cli.engine.session import load_for, resolve_settings
    from memtx_cli.engine.stream import run_stream

    cfg, _ = resolve_settings({}, None, None)
    lm = load_for(cfg)
    files = lua_files()
    past = lm.tokenizer.encode(files[a.past])
    rows = []
    for held in a.held.split(","):
        ids = lm.tokenizer.encode(files[held])
        alone = run_stream(lm.model, torch.tensor(ids), cfg)[0].double()  # [i] predicts ids[i + 1]
        after = run_stream(lm.model, torch.tensor(past + ids), cfg)[0].double()[len(past) :]
        for start in (0, 1024, 2048, 4096):
            p0, p1 = math.exp(float(alone[start:].mean())), math.exp(float(after[start:].mean()))
            row = {"held_out": held, "past": a.past, "past_tokens": len(past), "from_token": start}
            row |= {"ppl_alone": p0, "ppl_after_past": p1, "gain": 1 - p1 / p0}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    emit({"meta": run_metadata(), "settings": {"defaults": True, "dtype": str(lm.dtype)}, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
