"""Answers of `memtx ask` on sample_docs/: 6 factual questions, greedy; is the expected text in
the answer and is the first source the right document and lines?

    python benchmarks/ask_answers.py BANK EVIDENCE   # EVIDENCE = 0, 1 or 2 (--evidence)
"""

import sys

from memtx_cli.bank.store import Bank
from memtx_cli.config import merge_config
from memtx_cli.engine.generate import Sampling
from memtx_cli.model.loading import load_model
from memtx_cli.tasks.chat import answer

QUESTIONS = [
    ("When was version 1.8 of the Debian constitution ratified?", "January 28", "debian", 4),
    ("When was Walter Elliot born?", "1760", "persuasion", 29),
    ("When was Anne Elliot born?", "1787", "persuasion", 32),
    ("Whom did Walter Elliot marry in 1784?", "Elizabeth", "persuasion", 29),
    ("What is the date of version 3 of the GNU General Public License?", "2007", "GPL-3", 2),
    ("Who wrote Persuasion?", "Austen", "persuasion", 5),
]


def main() -> None:
    lm = load_model(None)
    bank = Bank.open(sys.argv[1], verify=False)
    evidence = int(sys.argv[2])
    cfg = merge_config(lm.card.settings, {}, {})
    ok = src_ok = 0
    for q, expected, doc, line in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        r = answer(lm, msgs, cfg, Sampling(max_tokens=40, temperature=0), bank, 3, evidence=evidence)
        good = expected.lower() in r.generation.text.lower()
        s = r.sources[0] if r.sources else None
        sgood = bool(s and doc in s.path and s.lines and s.lines[0] - 3 <= line <= s.lines[1] + 3)
        ok += good
        src_ok += sgood
        where = s.label().split("/")[-1] if s else None
        print(f"{q[:45]:45} ans={'Y' if good else 'n'} src={'Y' if sgood else 'n'} {r.generation.text[:60]!r} {where}")
    print("answers", ok, "of", len(QUESTIONS), "right first source", src_ok)


if __name__ == "__main__":
    main()
