"""memtx bank: inspect and manage memory banks."""

from __future__ import annotations

from typing import Annotated

import typer

from memtx_cli.cli.display import handle_errors, print_json, print_table
from memtx_cli.cli.options import BankArg, JsonOpt, QuietOpt

bank_app = typer.Typer(help="Inspect and manage memory banks.", no_args_is_help=True)


@bank_app.command("info")
@handle_errors
def bank_info(bank: BankArg, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Documents, entries, bytes on disk, bytes per token, model and settings of a bank."""
    from memtx_cli.bank.shards import ShardedBank, is_shard_set, shard_set_info
    from memtx_cli.bank.store import Bank

    if is_shard_set(bank):
        with ShardedBank.open(bank) as sb:
            _print_shard_set(bank, shard_set_info(sb), as_json)
        return
    with Bank.open(bank, verify=False) as b:
        info = b.info()
        docs = [
            {"id": d.id, "path": d.path, "tokens": d.tokens, "entries": d.entries, "aliases": d.aliases}
            for d in b.docs.values()
        ]
    if as_json:
        print_json({**info, "docs": docs})
        return
    bpt = info["bytes_per_token"]
    print_table(
        f"memtx bank: {bank}",
        [
            ("documents", f"{info['documents']}"),
            ("entries (tokens in memory)", f"{info['entries']:,}"),
            ("blocks", f"{info['blocks']:,} of {info['block_size']}"),
            ("bytes on disk", f"{info['bytes_on_disk']:,}"),
            ("bytes per token", f"{bpt:,.0f}" if bpt else "-"),
            ("model", f"{info['model']['name']} ({info['model']['weights_fingerprint'][:12]})"),
            ("memory layers", f"{info['layers'][0]}-{info['layers'][-1]}" if info["layers"] else "-"),
            (
                "heads stored x head dim",
                f"{info['stored_heads']} of {len(info['layers']) * info['kv_heads']} x {info['head_dim']}",
            ),
            ("key/value codec", info["dtype"]),
            ("words (lexical index)", "yes" if info["words"] else "no (made before it: recall by attention alone)"),
            ("eviction", f"{info['eviction']}"),
            ("readable by (it holds its text)", f"{info['readable_by']} ({info['mode']})"),
        ],
    )


@bank_app.command("verify")
@handle_errors
def bank_verify(bank: BankArg, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Check a bank: manifest, state checksums, id alignment, every block's crc32."""
    from memtx_cli.bank.ops import verify_bank

    problems = verify_bank(bank)
    if as_json:
        print_json({"bank": bank, "ok": not problems, "problems": problems})
    elif not problems:
        print(f"{bank}: ok")
    else:
        for p in problems:
            print(f"{bank}: {p}")
    if problems:
        raise typer.Exit(1)


@bank_app.command("rm")
@handle_errors
def bank_rm(
    bank: BankArg,
    docs: Annotated[list[str], typer.Argument(help="Documents to remove: path (as ingested), alias or id.")],
) -> None:
    """Remove documents (and their memories) from a bank, and give their space back."""
    from memtx_cli.bank.ops import remove_documents
    from memtx_cli.bank.store import Bank

    with Bank.open(bank, writer=True, verify=False) as b:
        done = remove_documents(b, docs)
    for line in done:
        print(f"removed {line}")
    print(f"removed {len(done)} name(s) from {bank}")


@bank_app.command("compact")
@handle_errors
def bank_compact(bank: BankArg, as_json: JsonOpt = False) -> None:
    """Give space back: move memories into free blocks and shorten the files (blocks a running
    reader may still see are kept until it closes)."""
    from memtx_cli.bank.ops import compact
    from memtx_cli.bank.store import Bank

    with Bank.open(bank, writer=True, verify=False) as b:
        rep = compact(b)
    if as_json:
        print_json({"bank": bank, **rep})
        return
    print(
        f"{bank}: {rep['bytes_before']:,} -> {rep['bytes_after']:,} bytes on disk "
        f"({rep['moved_blocks']} blocks moved, {rep['released_blocks']} free blocks given back)"
    )


@bank_app.command("merge")
@handle_errors
def bank_merge(
    banks: Annotated[list[str], typer.Argument(help="Banks to merge (same model and geometry).")],
    out: Annotated[str, typer.Option("--out", "-o", help="The new bank.")],
) -> None:
    """Merge banks into a new one; identical documents are kept once."""
    from pathlib import Path

    from memtx_cli.bank.ops import merge_banks

    rep = merge_banks([Path(b) for b in banks], Path(out))
    print(f"merged {len(banks)} banks into {out}: {rep['documents']} documents, {rep['entries']:,} entries")


def _print_shard_set(name: str, info: dict, as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    rows = [
        ("documents", f"{info['documents']}"),
        ("entries (tokens in memory)", f"{info['entries']:,}"),
        ("blocks", f"{info['blocks']:,} of {info['block_size']}"),
        ("model", f"{info['model']['name']} ({info['model']['weights_fingerprint'][:12]})"),
        ("key/value codec", info["dtype"]),
    ]
    rows += [(f"shard {i}", f"{s['path']}: {s['documents']} documents") for i, s in enumerate(info["shards"])]
    print_table(f"memtx shard set: {name}", rows)


@bank_app.command("shards")
@handle_errors
def bank_shards(
    shards: Annotated[
        list[str] | None, typer.Argument(help="Shard banks on the local disk (same model and geometry).")
    ] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="The shard set (a new directory).")] = "",
    remote: Annotated[
        list[str] | None,
        typer.Option("--remote", help="NODE=PATH: a shard bank at PATH on the Ray node NODE, served there."),
    ] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="The Ray cluster remote shards run on: auto, local or an address.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Join banks into a shard set that --memory reads as one bank."""
    from pathlib import Path

    from memtx_cli.bank.shards import make_shard_set
    from memtx_cli.errors import UsageError

    if not out:
        raise UsageError("give the shard set's directory with --out")
    info = make_shard_set(Path(out), shards or [], remote or [], ray)
    if as_json:
        print_json(info)
        return
    print(f"shard set {out}: {len(info['shards'])} shards, {info['documents']} documents, {info['entries']:,} entries")
