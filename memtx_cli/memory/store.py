"""kNN memory of one layer: per KV head, the entries of every token read and a way to find the
ones a query needs. The model only calls the reads (`retrieve`, `retrieve_blocks`,
`gather_blocks`, `block_attention`, `retrieve_far`, `far_attention`); it never sees FAISS.

A LayerMemory is its parts, one module each: entry storage (`entries.py`), token retrieval
through FAISS (`index.py`), block selection (`blocks.py`) and far reads (`far.py`). A bank's
memory (`bank.py`) offers the block reads of the same protocol.
"""

from __future__ import annotations

from memtx_cli.memory.blocks import BlockSelection
from memtx_cli.memory.entries import EntryStore
from memtx_cli.memory.far import FarSearch
from memtx_cli.memory.index import TokenSearch


class LayerMemory(EntryStore, TokenSearch, BlockSelection, FarSearch):
    """Memory of one layer: all KV heads, raw keys + values + positions, one index per head
    (token retrieval) or block means (block retrieval)."""

    # retrieve_blocks(gather=False) + gather_blocks(head0=...): each head's budget gathered apart
    gathers_by_head = True
