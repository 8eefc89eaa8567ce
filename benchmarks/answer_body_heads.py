"""Passkey recall when the prompt's body reads its own top-k of every memory (no prior) in some
memory heads only (default: the card's far-heads), and the last TAIL prompt tokens and the
answer read in every memory head (answer-top-k). Does the key come back?

    python benchmarks/answer_body_heads.py LENGTH TAIL DEPTHS [BODY_HEADS]
    python benchmarks/answer_body_heads.py 8192 64 0.7 7.2,5.0,6.1,6.2,5.2,7.1,7.0,5.1,6.0
"""

import dataclasses
import sys
import time

import torch

from memtx_cli.engine.generate import stop_token_ids
from memtx_cli.engine.session import load_for, resolve_settings
from memtx_cli.engine.stream import Streamer
from memtx_cli.tasks import passkey as pk

cfg, _ = resolve_settings({}, [], None)
lm = load_for(cfg)
length, tail = int(sys.argv[1]), int(sys.argv[2])
depths = [float(x) for x in sys.argv[3].split(",")]
body_heads = sys.argv[4] if len(sys.argv) > 4 else cfg.far_heads
keys = [52445, 29772, 61750]
stops = stop_token_ids(lm)
for depth, key in zip(depths, keys, strict=False):  # up to three depths
    ids, _ = pk.build_prompt(lm, length, depth, key)
    body = dataclasses.replace(cfg, far_scope="all", far_bias=0.0, far_heads=body_heads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        st = Streamer(lm.model, body, keep_all=True)
        x = torch.tensor(ids)
        st.feed(x[:-tail])
        st.answering = True
        h = st.feed(x[-tail:])
        out = []
        for _ in range(8):
            tok = int(lm.model.logits(h[-1:][None])[0, -1].argmax())
            if tok in stops:
                break
            out.append(tok)
            h = st.feed(torch.tensor([tok]))
    text = lm.tokenizer.decode(out)
    took = f"{time.perf_counter() - t0:.1f} s"
    print(length, tail, depth, body_heads, repr(text), pk.answer_is(text, key), took, flush=True)
