import sys, torch, json
from memtx_cli.runtime import load_model
from memtx_cli.config import merge_config
from memtx_cli.bank import Bank
from memtx_cli.chat import answer
from memtx_cli.generate import Sampling

lm = load_model(None)
bank = Bank.open(sys.argv[1], verify=False)
ev = int(sys.argv[2])
cfg = merge_config(lm.card.settings, {}, {})
QS = [
    ("When was version 1.8 of the Debian constitution ratified?", "January 28", "debian", 5),
    ("When was Walter Elliot born?", "1760", "persuasion", 29),
    ("When was Anne Elliot born?", "1787", "persuasion", 32),
    ("Whom did Walter Elliot marry in 1784?", "Elizabeth", "persuasion", 29),
    ("What is the date of version 3 of the GNU General Public License?", "2007", "GPL-3", 2),
    ("Who wrote Persuasion?", "Austen", "persuasion", 5),
]
ok = src_ok = 0
for q, a, doc, line in QS:
    r = answer(lm, [{"role": "user", "content": q}], cfg, Sampling(max_tokens=40, temperature=0), bank, 3, evidence=ev)
    good = a.lower() in r.generation.text.lower()
    s = r.sources[0] if r.sources else None
    sgood = bool(s and doc in s.path and s.lines and s.lines[0] - 3 <= line <= s.lines[1] + 3)
    ok += good
    src_ok += sgood
    print(
        f"{q[:45]:45} ans={'Y' if good else 'n'} src1={'Y' if sgood else 'n'} {r.generation.text[:80]!r} {s.label().split('/')[-1] if s else None}",
        flush=True,
    )
print("answers", ok, "of", len(QS), "top source", src_ok)
