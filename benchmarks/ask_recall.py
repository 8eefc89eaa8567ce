"""Recall quality of `memtx ask`'s sources: 10 questions about sample_docs/ with a known answer
line; is the right document and line range first / in the top 3, by raw attention mass, by
lift over a neutral question, and by lift with 64 bank blocks and no bank prior?

    python benchmarks/ask_recall.py BANK      # BANK = memtx ingest sample_docs --out BANK
"""

import json
import math
import sys

from memtx_cli.bank.store import Bank
from memtx_cli.config import merge_config
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.chat import NEUTRAL_QUESTION, block_mass, sources_from_mass

QUESTIONS = [
    ("When was version 1.8 of the Debian constitution ratified?", "debian", 4),
    ("When was Walter Elliot born?", "persuasion", 29),
    ("When was Anne Elliot born?", "persuasion", 32),
    ("Whom did Walter Elliot marry in 1784?", "persuasion", 29),
    ("What is the date of version 3 of the GNU General Public License?", "GPL-3", 2),
    ("What does the GPL say in its Disclaimer of Warranty?", "GPL-3", 590),
    ("What does the function luaS_resize do?", "lstring", 85),
    ("Who wrote Persuasion?", "persuasion", 5),
    ("Who can hold several posts in the Debian project?", "debian", 49),
    ("What is MAXSTRTB in Lua's string table?", "lstring", 28),
]


def rank_of(srcs, doc, line):
    for i, s in enumerate(srcs):
        if doc in s.path and s.lines and s.lines[0] - 3 <= line <= s.lines[1] + 3:
            return i + 1
    return 0


def main() -> None:
    lm = load_model(None)
    bank = Bank.open(sys.argv[1], verify=False)
    cfg = merge_config(lm.card.settings, {}, json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    base = block_mass(lm, lm.tokenizer.encode(NEUTRAL_QUESTION), cfg, bank)

    def lift(m):
        return {b: v - base.get(b, 0) for b, v in m.items() if v > base.get(b, 0)} or m

    def ratio(m):
        return {b: v * math.log((v + 1e-3) / (base.get(b, 0) + 1e-3)) for b, v in m.items() if v > base.get(b, 0)} or m

    variants = {"raw": lambda m: m, "lift": lift, "ratio": ratio}
    res = {k: [] for k in variants}
    for q, doc, line in QUESTIONS:
        m = block_mass(lm, lm.tokenizer.encode(q), cfg, bank)
        for k, f in variants.items():
            res[k].append(rank_of(sources_from_mass(bank, f(m), 3), doc, line))
        print(q[:50], {k: v[-1] for k, v in res.items()}, flush=True)
    for k, v in res.items():
        print(k, "first", sum(1 for x in v if x == 1), "top3", sum(1 for x in v if x >= 1), "of", len(v))


if __name__ == "__main__":
    main()
