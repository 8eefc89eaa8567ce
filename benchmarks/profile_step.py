"""Where a memory segment's extra time goes: torch.profiler over the same segments with the
card's defaults and with the window alone (interleaved, one process).

    python benchmarks/profile_step.py [--tokens 24576] [--genre code] [--segments 8] [--top 25]

Both streams read the first N - segments x 512 tokens unprofiled, then each of the last
`segments` segments is profiled in both. Prints ms per segment: the total of the ops' self
time, each op's difference (memory - window), and the memory run's heaviest ops by shape.
The profiler adds its own overhead; compare the two columns, not against tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import profile

from memtx_cli.config import merge_config
from memtx_cli.engine.stream import Streamer
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.bench import CORPUS, GENRE_DOCS


def streams(n: int, genre: str, measured: int) -> tuple[torch.Tensor, dict[str, Streamer], int, int]:
    """The genre's document's first n token ids, a memory stream with the card's defaults and a
    window stream (memory off), both already past all but the last `measured` segments; the
    segment length and the first measured token."""
    lm = load_model("smollm2-135m", device="cpu", dtype="auto")
    cfg = merge_config(lm.card.settings)
    ids = torch.tensor(lm.tokenizer.encode((CORPUS / GENRE_DOCS[genre]).read_text())[:n])
    runs = {
        "memory": Streamer(lm.model, cfg, expected_tokens=n),
        "window": Streamer(lm.model, dataclasses.replace(cfg, memory=False), expected_tokens=n),
    }
    seg = cfg.segment
    first = n - measured * seg
    with torch.inference_mode():
        for s in range(0, first, seg):
            for st in runs.values():
                st.step(ids[s : s + seg])
    return ids, runs, seg, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=24576)
    ap.add_argument("--genre", default="code", choices=sorted(GENRE_DOCS))
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    ids, runs, seg, first = streams(args.tokens, args.genre, args.segments)
    n = args.tokens
    per_op: dict[str, dict[str, float]] = {name: {} for name in runs}
    per_shape: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for s in range(first, n, seg):
            for name, st in runs.items():
                with profile(record_shapes=name == "memory") as p:
                    st.step(ids[s : s + seg])
                for e in p.key_averages(group_by_input_shape=name == "memory"):
                    ms = e.self_cpu_time_total / 1e3 / args.segments
                    per_op[name][e.key] = per_op[name].get(e.key, 0.0) + ms
                    if name == "memory":
                        got = per_shape.setdefault((e.key, str(e.input_shapes)), [0.0, 0.0])
                        got[0] += ms
                        got[1] += e.count / args.segments
    mem, win = per_op["memory"], per_op["window"]
    total = f"memory {sum(mem.values()):.0f}, window {sum(win.values()):.0f}"
    print(f"ms per segment, {args.genre}, tokens {first}-{n}: {total}")
    print("ops by memory - window:")
    for op in sorted(mem, key=lambda o: win.get(o, 0.0) - mem[o])[: args.top]:
        print(f"  {op:52s} {mem[op]:7.1f} {win.get(op, 0.0):7.1f} {mem[op] - win.get(op, 0.0):+7.1f}")
    print("memory run, heaviest ops by input shapes (ms per segment, calls per segment):")
    for (op, shapes), (ms, calls) in sorted(per_shape.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {ms:7.1f} {calls:5.0f}x {op} {shapes[:110]}")


if __name__ == "__main__":
    main()
