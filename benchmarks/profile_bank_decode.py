"""Where decoding time goes with a bank: cProfile around 32 greedy tokens.

python benchmarks/profile_bank_decode.py BANK
"""

import cProfile
import pstats
import sys
import time

from memtx_cli.bank.store import Bank
from memtx_cli.config import merge_config
from memtx_cli.engine.generate import Sampling, generate
from memtx_cli.model.loading import load_model


def main() -> None:
    lm = load_model(None)
    t = time.perf_counter()
    bank = Bank.open(sys.argv[1], verify=False)
    print(f"open (no crc check): {time.perf_counter() - t:.1f} s")
    cfg = merge_config(lm.card.settings)
    ids = lm.tokenizer.encode("It was a dark and stormy night; the hacker opened the terminal and")
    generate(lm, ids, cfg, Sampling(max_tokens=4, temperature=0), bank)  # warm up
    prof = cProfile.Profile()
    prof.enable()
    g = generate(lm, ids, cfg, Sampling(max_tokens=32, temperature=0), bank)
    prof.disable()
    print(f"{g.tokens_per_s:.1f} tokens/s, retrieval {g.retrieval_seconds:.2f} s of {g.decode_seconds:.2f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
