"""Choose the query heads whose attention picks the answer line (the card's `quote-heads`).

    python benchmarks/quote_heads.py [--workdir DIR] [--max-heads 10] [--out FILE]

The questions benchmark's set (benchmarks/ask_set.yaml) over its bank, asked as `memtx ask`
asks (the recalled excerpts quoted in the chat prompt). For every query head of the model, the
line of the excerpts that the question's tokens attend to most is quoted with the next two
lines (answer-mode quote); a head is right on a question when that passage holds an accepted
answer. Heads are ranked on the tune split only; the chosen set is the best first k (k up to
--max-heads) by tune accuracy, and is reported on the held-out split it never saw. Upper
bound: a passage of the excerpts that holds the answer exists at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from memtx_cli.config import merge_config
from memtx_cli.model.loading import load_model
from memtx_cli.tasks import ask_bench
from memtx_cli.tasks.chat import quoted, recall, template_around, with_evidence
from memtx_cli.tasks.quote import passage, read_lines

sys.path.insert(0, str(Path(__file__).parent))
from _meta import CORPUS, REPO, emit, run_metadata  # noqa: E402

EVIDENCE, CHARS, LINES = 2, 1200, 3  # memtx ask's defaults


def read_question(lm, cfg, bank, q, heads: list[tuple[int, int]]) -> tuple[torch.Tensor, list[bool]]:
    """Per head, the question's attention mass on each line of the quoted excerpts
    (len(heads), lines), as `memtx ask` reads them; and per line, whether its passage holds an
    accepted answer."""
    excerpts = [s for s in recall(lm, q.question, cfg, bank, 3) if s.text][:EVIDENCE]
    texts = quoted(excerpts, CHARS)
    content = with_evidence(q.question, excerpts, CHARS)
    around = template_around(lm, [{"role": "user", "content": content}])
    masses, lines, _ = read_lines(lm, content, texts, around, heads)
    good = [ask_bench.contains_answer(passage(content, lines, i, LINES), q.answers) for i in range(len(lines))]
    return masses, good


def right(masses: list[torch.Tensor], goods: list[list[bool]], chosen: list[int]) -> torch.Tensor:
    """(questions,) whether the heads `chosen`, their line masses summed, pick a right passage."""
    return torch.tensor([g[int(m[chosen].sum(0).argmax())] for m, g in zip(masses, goods, strict=True)]).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/memtx_quote_heads")
    ap.add_argument("--max-heads", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(2)
    lm = load_model(None)
    cfg = merge_config(lm.card.settings, {}, {})
    s = ask_bench.load_set(REPO / "benchmarks/ask_set.yaml")
    bank = ask_bench.prepare_bank(lm, cfg, s, CORPUS, Path(a.workdir), log=print)
    heads = [(layer, h) for layer in range(lm.args.n_layers) for h in range(lm.args.n_heads)]
    masses, goods = [], []
    for n, q in enumerate(s.questions):
        with torch.inference_mode():
            m, g = read_question(lm, cfg, bank, q, heads)
        masses.append(m)
        goods.append(g)
        print(f"{n + 1}/{len(s.questions)} [{q.split}] {q.question[:60]!r}", file=sys.stderr)
    tune = torch.tensor([q.split == "tune" for q in s.questions])
    held = ~tune
    single = torch.stack([right(masses, goods, [i]) for i in range(len(heads))], 1)  # (questions, heads)
    order = sorted(range(len(heads)), key=lambda i: -float(single[tune, i].mean()))  # tune split only
    sets = [order[:k] for k in range(1, a.max_heads + 1)]
    got = torch.stack([right(masses, goods, c) for c in sets], 1)  # (questions, sets)
    best = int(got[tune].mean(0).argmax())  # the first of the best: the fewest heads

    def name(chosen: list[int]) -> str:
        return ",".join(f"{heads[i][0]}.{heads[i][1]}" for i in chosen)

    possible = torch.tensor([any(g) for g in goods]).float()
    res = {
        "meta": {**run_metadata(), "seconds": time.time() - t0, "questions": len(s.questions), "lines": LINES},
        "chosen": name(sets[best]),
        "chosen_tune": float(got[tune, best].mean()),
        "chosen_held_out": float(got[held, best].mean()),
        "possible": {"tune": float(possible[tune].mean()), "held_out": float(possible[held].mean())},
        "sets": [
            {"heads": name(c), "tune": float(got[tune, j].mean()), "held_out": float(got[held, j].mean())}
            for j, c in enumerate(sets)
        ],
        "every_head_summed": {
            "tune": float(right(masses, goods, list(range(len(heads))))[tune].mean()),
            "held_out": float(right(masses, goods, list(range(len(heads))))[held].mean()),
        },
        "best_single_heads": [
            {"head": name([i]), "tune": float(single[tune, i].mean()), "held_out": float(single[held, i].mean())}
            for i in order[:15]
        ],
    }
    emit(res, a.out)


if __name__ == "__main__":
    main()
