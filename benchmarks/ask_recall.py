import sys, torch, json, math

torch.set_num_threads(1)
from memtx_cli.runtime import load_model
from memtx_cli.config import merge_config
from memtx_cli.bank import Bank
from memtx_cli.chat import block_mass, sources_from_mass, NEUTRAL_QUESTION

lm = load_model(None, threads=1)
bank = Bank.open(sys.argv[1], verify=False)
over = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
cfg = merge_config(lm.card.settings, {}, over)
QS = [
    ("When was version 1.8 of the Debian constitution ratified?", "debian", 5),
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
base = block_mass(lm, lm.tokenizer.encode(NEUTRAL_QUESTION), cfg, bank)


def hit(srcs, doc, line):
    for i, s in enumerate(srcs):
        if doc in s.path and s.lines and s.lines[0] - 3 <= line <= s.lines[1] + 3:
            return i + 1
    return 0


variants = {
    "raw": lambda m: m,
    "lift": lambda m: {b: v - base.get(b, 0) for b, v in m.items() if v > base.get(b, 0)} or m,
    "ratio": lambda m: (
        {b: v * math.log((v + 1e-3) / (base.get(b, 0) + 1e-3)) for b, v in m.items() if v > base.get(b, 0)} or m
    ),
}
res = {k: [] for k in variants}
for q, doc, line in QS:
    m = block_mass(lm, lm.tokenizer.encode(q), cfg, bank)
    row = []
    for k, f in variants.items():
        srcs = sources_from_mass(bank, f(m), 3)
        h = hit(srcs, doc, line)
        res[k].append(h)
        row.append(f"{k}={h}")
    print(q[:50], row, flush=True)
for k, v in res.items():
    print(k, "top1", sum(1 for x in v if x == 1), "top3", sum(1 for x in v if x >= 1), "of", len(v))
