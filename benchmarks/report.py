"""Render benchmark result files as the markdown tables of docs/benchmarks.md.

python benchmarks/report.py throughput benchmarks/results/throughput.json
python benchmarks/report.py memory benchmarks/results/memory_block.json
python benchmarks/report.py recall benchmarks/results/recall_code_32k.json
python benchmarks/report.py bank benchmarks/results/bank_usefulness.json
"""

from __future__ import annotations

import json
import math
import sys

from memtx_cli.config import blocks_read


def throughput(r: dict) -> None:
    p = r["peak_gflops"]
    print(f"matmul peak measured in the same run: float32 {p['float32']:.0f}, bfloat16 {p['bfloat16']:.0f} GFLOP/s\n")
    print(
        "| dtype | tokens | memtx window (no memory) | memtx full | transformers | full / transformers | full, % of peak | ppl full (memtx / transformers) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        tf = x.get("transformers_tokens_per_s")
        ratio = f"{x['full_tokens_per_s'] / tf:.2f}x" if tf else "-"
        print(
            f"| {x['dtype']} | {x['tokens']} | {x['window_tokens_per_s']:,.0f} | {x['full_tokens_per_s']:,.0f} | "
            f"{tf:,.0f} | {ratio} | {100 * x['full_fraction_of_peak']:.0f}% | {x['ppl_full']:.4f} / {x.get('ppl_transformers', 0):.4f} |"
        )


def memory(r: dict) -> None:
    s = r["settings"]
    if s.get("retrieval", "token") == "block":
        blocks = blocks_read(s.get("memory_heads", ""), s["blocks"])  # per-head budgets or `blocks`
        how = f"block retrieval: {blocks} blocks of {s['block_size']} per {s['block_chunk']} queries"
    else:
        how = f"token retrieval: top-{s['top_k']}, index {s['index']} (nprobe {s['nprobe']}), shared search {s.get('shared_search', True)}"
    print(
        f"settings: layers {s['memory_layers']}, {how}, {s['positions']} positions, sinks {s['sinks']}, dtype {r['dtype']}\n"
    )
    print(
        "| genre | tokens | ppl window (+sinks) | ppl memory | ppl full | gap recovered | log(window/memory) | tok/s window | tok/s memory | memory cost | retrieval s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        full = f"{x['ppl_full']:.3f}" if "ppl_full" in x else "-"
        gap = f"{100 * x['gap_recovered']:.0f}%" if "gap_recovered" in x else "-"
        print(
            f"| {x['genre']} | {x['tokens']:,} | {x['ppl_window']:.3f} | {x['ppl_memory']:.3f} | {full} | {gap} | "
            f"{math.log(x['ppl_window'] / x['ppl_memory']):.3f} | "
            f"{x['tokens_per_s_window']:,.0f} | {x['tokens_per_s_memory']:,.0f} | {100 * x['memory_cost']:.0f}% | {x['retrieval_seconds']:.1f} |"
        )


def bank(r: dict) -> None:
    print(
        "| case | bank precision | bank docs / tokens | bytes per token | scored | tokens | ppl window | "
        "ppl own memory | ppl own memory + bank | bank vs own |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        d = 100 * (x["ppl_with_bank"] / x["ppl_own_memory"] - 1)
        print(
            f"| {x['case']} | {x['precision']} | {x['bank_documents']} / {x['bank_tokens']:,} | "
            f"{x['bank_bytes_per_token']:,.0f} | {x['target']} | {x['tokens']:,} | {x['ppl_window']:.3f} | "
            f"{x['ppl_own_memory']:.3f} | {x['ppl_with_bank']:.3f} | {d:+.2f}% |"
        )


def recall(r: dict) -> None:
    print(
        f"{r['entries_per_head']:,} real keys per head ({r['genre']}), queries of the next segment, layers "
        f"{r['layers'][0]}-{r['layers'][-1]}, {r['positions']} positions, recall@{r['k']} against exact search\n"
    )
    print("| index | recall | queries/s | build s |")
    print("|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['index']} | {x['recall']:.3f} | {x['queries_per_s']:,.0f} | {x['build_seconds']:.1f} |")


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    data = json.load(open(path))
    {"throughput": throughput, "memory": memory, "recall": recall, "bank": bank}[kind](data)
