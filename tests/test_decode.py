"""Incremental decoding (Streamer.feed) computes exactly what segment-by-segment scoring does."""

import pytest
import torch
import torch.nn.functional as F

from memtx_cli.config import Config
from memtx_cli.engine.stream import Streamer, run_stream


def cfg(**kw):
    base = dict(segment=8, memory=True, memory_layers="all", index="flat", sinks=2)
    base.update(kw)
    return Config(**base)


CASES = {
    "no memory": cfg(memory=False),
    "token top-2": cfg(retrieval="token", top_k=2, positions="fixed"),
    "token true": cfg(retrieval="token", top_k=3, positions="true"),
    "block": cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="fixed"),
    "block clamped": cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped"),
    "block no xl": cfg(retrieval="block", block_size=4, blocks=2, block_chunk=8, xl_cache=False),
    "block votes": cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", block_votes=3),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("pieces", [1, 3])
def test_cached_decoding_equals_a_fresh_pass(tiny_model, name, pieces):
    c = CASES[name]
    torch.manual_seed(21)
    ids = torch.randint(0, 300, (70,))
    ref, _ = run_stream(tiny_model, ids, c)  # NLL of ids[1:] from segment-by-segment streaming
    st = Streamer(tiny_model, c)
    hidden = []
    with torch.inference_mode():
        for s in range(0, 70, pieces):
            hidden.append(st.feed(ids[s : s + pieces]))
        h = torch.cat(hidden)
        logits = tiny_model.logits(h[None])[0].float()
    got = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=1e-5)


def test_decoded_tokens_of_a_chunk_gather_its_blocks_once(tiny_model, monkeypatch):
    """Past chunk 0 a chunk's tokens share one selector, so decoding gathers a chunk's blocks
    for its first token only (ReadCache) and still equals scoring (the test above)."""
    c = CASES["block clamped"]
    calls = []
    from memtx_cli.memory.store import LayerMemory

    real = LayerMemory.retrieve_blocks
    monkeypatch.setattr(LayerMemory, "retrieve_blocks", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    torch.manual_seed(3)
    ids = torch.randint(0, 300, (40,))
    st = Streamer(tiny_model, c)
    with torch.inference_mode():
        st.feed(ids[:32])
        before = len(calls)
        for i in range(32, 40):  # two whole chunks of 4 (block_chunk), token by token
            st.feed(ids[i : i + 1])
    layers = len(st.memories)
    assert len(calls) - before == 2 * layers
