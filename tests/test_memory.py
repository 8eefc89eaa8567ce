"""Memorizing attention: exactness against full attention, the memory's bookkeeping, FAISS recall."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from test_model import naive_logits, nll_from_logits, window_mask

from memtx_cli.attention.blocks import clamp_keys, query_runs
from memtx_cli.attention.ops import merge_lse
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.config import Config
from memtx_cli.engine import plan
from memtx_cli.engine.stream import Streamer, run_stream, run_streams, stream_nll
from memtx_cli.errors import MemtxError
from memtx_cli.memory.blocks import spread_forward
from memtx_cli.memory.far import exact_top_k, top_rows
from memtx_cli.memory.index import IndexSpec
from memtx_cli.memory.results import BlockRetrieval
from memtx_cli.memory.store import LayerMemory
from memtx_cli.model.llama import rotate_by


def cfg(**kw):
    base = dict(
        segment=8,
        memory=True,
        memory_layers="all",
        index="flat",
        top_k=1000,
        positions="true",
        sinks=0,
        retrieval="token",
    )
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("positions", ["true", "clamped"])
@pytest.mark.parametrize("xl", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_memory_with_exact_search_equals_full_attention(tiny_model, positions, xl, shared):
    """Flat index, top-k >= memory size, true positions inside the trained context: window +
    memory sees every earlier token at its real distance, so it IS full causal attention."""
    torch.manual_seed(7)
    ids = torch.randint(0, 300, (61,))
    causal = torch.ones(61, 61, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, causal), ids)
    got, streamer = run_stream(tiny_model, ids, cfg(positions=positions, xl_cache=xl, shared_search=shared))
    assert streamer.memory_entries > 0
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("retrieval", ["token", "block"])
@pytest.mark.parametrize("positions", ["true", "clamped"])
def test_sinks_at_their_real_distance_keep_memory_exact(tiny_model, retrieval, positions):
    """With sinks (kept out of the memory, always in the window) at their real distance, window
    + every memory at real positions is still full causal attention; with the sinks at window
    positions (StreamingLLM) it is not."""
    torch.manual_seed(9)
    ids = torch.randint(0, 300, (61,))
    causal = torch.ones(61, 61, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, causal), ids)
    kw = dict(sinks=3, positions=positions, retrieval=retrieval, block_size=4, blocks=1000, block_chunk=4)
    got, _ = run_stream(tiny_model, ids, cfg(sink_positions="real", **kw))
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=1e-5)
    moved, _ = run_stream(tiny_model, ids, cfg(sink_positions="window", **kw))
    assert (moved.double() - ref).abs().max() > 1e-3


def test_window_with_real_sinks_equals_masked_reference(tiny_model):
    """No memory: each token sees the sinks (at their real positions) and its window."""
    torch.manual_seed(10)
    ids = torch.randint(0, 300, (50,))
    allowed = window_mask(50, 8) | (torch.arange(50)[None] < 2) & torch.ones(50, 50, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, allowed), ids)
    got, _ = run_stream(tiny_model, ids, cfg(memory=False, sinks=2, sink_positions="real"))
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def _logits_in_pieces(model, st, ids, pieces):
    """Logits of ids streamed as whole segments of 8 (pieces = 0, `step`) or `pieces` tokens
    at a time (`feed`, as decoding does)."""
    with torch.inference_mode():
        if pieces == 0:
            h = torch.cat([st.step(ids[s : s + 8]) for s in range(0, len(ids), 8)])
        else:
            h = torch.cat([st.feed(ids[s : s + pieces]) for s in range(0, len(ids), pieces)])
        return model.logits(h[None])[0].float()


def test_real_sinks_move_within_the_horizon_and_decoding_agrees(tiny_model):
    """Past the trained context (`horizon`) a sink sits at most `horizon` before the segment's
    last position, the same for segment scoring and token-by-token decoding."""
    torch.manual_seed(12)
    ids = torch.randint(0, 300, (70,))
    c = cfg(
        sinks=2, sink_positions="real", retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped"
    )
    seen = []

    def run(pieces):
        st = Streamer(tiny_model, c)
        st.horizon = 20
        orig = st._key_positions

        def spy(cache, seg_start, t):
            kp = orig(cache, seg_start, t)
            if kp is not None:  # window position of the segment's last position - sink 0's
                window_start = st.cache_pos if st.cache else seg_start
                seen.append(int(seg_start + c.segment - 1 - window_start + c.sinks - kp[0]))
            return kp

        st._key_positions = spy
        return _logits_in_pieces(tiny_model, st, ids, pieces)

    a, b = run(0), run(3)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert seen and max(seen) <= 20 and min(seen) >= 0


def test_memory_off_equals_window_baseline(tiny_model):
    torch.manual_seed(8)
    ids = torch.randint(0, 300, (50,))
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, window_mask(50, 8)), ids)
    got, streamer = run_stream(tiny_model, ids, cfg(memory=False))
    assert streamer.memory_entries == 0
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stream_nll(tiny_model, ids, 8).double(), ref, atol=2e-5, rtol=1e-5)


def test_interleaved_streams_equal_separate_runs(tiny_model):
    """The benchmarks time window and memory interleaved segment by segment: each setting's
    numbers are exactly those of its own run (the streams share nothing but the model)."""
    torch.manual_seed(10)
    ids = torch.randint(0, 300, (61,))
    cfgs = [cfg(memory=False), cfg(), cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4)]
    runs = run_streams(tiny_model, ids, cfgs)
    for c, (nll, st, sec) in zip(cfgs, runs, strict=True):
        ref, ref_st = run_stream(tiny_model, ids, c)
        torch.testing.assert_close(nll, ref, atol=0, rtol=0)
        assert st.memory_entries == ref_st.memory_entries and sec > 0
    with pytest.raises(MemtxError, match="one segment length"):
        run_streams(tiny_model, ids, [cfg(), cfg(segment=16)])


def test_small_top_k_and_fixed_positions_change_the_result(tiny_model):
    torch.manual_seed(9)
    ids = torch.randint(0, 300, (60,))
    full, _ = run_stream(tiny_model, ids, cfg())
    for c in (cfg(top_k=2), cfg(positions="fixed"), cfg(combine="gate")):
        got, _ = run_stream(tiny_model, ids, c)
        assert got.shape == full.shape and torch.isfinite(got).all()
        assert not torch.allclose(got, full)
    # The first two segments have no memory yet (query before add; XL cache holds the last one).
    window, _ = run_stream(tiny_model, ids, cfg(memory=False))
    torch.testing.assert_close(run_stream(tiny_model, ids, cfg(top_k=2))[0][:15], window[:15])


def test_memory_layers_subset_and_entries(tiny_model):
    ids = torch.randint(0, 300, (40,))
    _, s = run_stream(tiny_model, ids, cfg(memory_layers="1"))
    assert list(s.memories) == [1]
    # 5 segments of 8 with an XL cache: segments 0-3 left the cache, the last one is still in it.
    assert s.memory_entries == 32


def test_sinks_stay_out_of_memory(tiny_model):
    ids = torch.randint(0, 300, (40,))
    _, s = run_stream(tiny_model, ids, cfg(memory_layers="0", sinks=3))
    mem = s.memories[0]
    assert len(mem) == 29 and int(mem.positions[: len(mem)].min()) == 3


def test_values_stay_aligned_with_ids():
    torch.manual_seed(10)
    mem = LayerMemory(2, 16, IndexSpec("flat"))
    keys = torch.randn(2, 300, 16)
    vals = torch.randn(2, 300, 16)
    for s in range(0, 300, 50):
        mem.add(keys[:, s : s + 50], vals[:, s : s + 50], torch.arange(s, s + 50))
    q = keys[:, [5, 123, 299]] * 10  # a key's own direction, scaled: it is its own top hit
    got = mem.retrieve(q, 4)
    assert got.valid.all()
    for h in range(2):
        assert got.positions[h, :, 0].tolist() == [5, 123, 299]
        torch.testing.assert_close(got.values[h, :, 0], vals[h, [5, 123, 299]])
        torch.testing.assert_close(got.keys[h, :, 0], keys[h, [5, 123, 299]])


def test_fewer_entries_than_k_are_masked():
    mem = LayerMemory(1, 8, IndexSpec("flat"))
    mem.add(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.arange(3))
    got = mem.retrieve(torch.randn(1, 5, 8), 10)
    assert got.valid.sum(-1).tolist() == [[3] * 5]


def recall_at_k(spec, n=20000, d=64, k=32, seed=0):
    rng = np.random.default_rng(seed)
    keys = torch.from_numpy(rng.standard_normal((1, n, d)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((1, 256, d)).astype(np.float32))
    exact = (q[0] @ keys[0].T).topk(k, -1).indices.numpy()
    mem = LayerMemory(1, d, spec)
    for s in range(0, n, 2000):
        mem.add(keys[:, s : s + 2000], keys[:, s : s + 2000], torch.arange(s, s + 2000))
    got = mem.retrieve(q, k).positions[0].numpy()
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)])


def test_flat_recall_is_exact():
    assert recall_at_k(IndexSpec("flat")) == 1.0


@pytest.mark.parametrize(
    "spec,floor", [(IndexSpec("ivf", nprobe=64, ivf_train_at=4096), 0.6), (IndexSpec("hnsw", hnsw_ef=128), 0.6)]
)
def test_approximate_recall_on_random_keys(spec, floor):
    """Random 64-d Gaussian keys are the worst case for ANN (no clusters); real model keys are
    far easier (benchmarks/recall). This only guards against a broken index."""
    r = recall_at_k(spec)
    print(f"{spec.kind}: recall@32 = {r:.3f}")
    assert r >= floor


def test_unknown_index_kind(tiny_model):
    with pytest.raises(MemtxError, match="unknown index kind"):
        run_stream(tiny_model, torch.randint(0, 300, (20,)), cfg(index="NoSuchIndex"))


# ----------------------------------------------------------------------------------------------
# Block retrieval (InfLLM-style)


@pytest.mark.parametrize("positions", ["true", "clamped"])
@pytest.mark.parametrize("xl", [True, False])
@pytest.mark.parametrize(("chunk", "votes"), [(3, 0), (8, 0), (8, 3)])
def test_block_retrieval_of_every_block_equals_full_attention(tiny_model, xl, chunk, votes, positions):
    """Every block selected (blocks x block size >= memory), true positions: the memory part is
    every earlier token at its real distance, so block mode is full causal attention too. Block
    size 4 with segments of 8 minus nothing leaves partial blocks only at the end; chunk 3 pads
    the last query chunk."""
    torch.manual_seed(11)
    ids = torch.randint(0, 300, (61,))
    causal = torch.ones(61, 61, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, causal), ids)
    c = cfg(
        retrieval="block",
        block_size=4,
        blocks=1000,
        block_chunk=chunk,
        xl_cache=xl,
        positions=positions,
        block_votes=votes,
    )
    got, streamer = run_stream(tiny_model, ids, c)  # 61 tokens: inside the trained context (256)
    assert streamer.memory_entries > 0
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=1e-5)


def _stream_with_horizon(model, ids, c, horizon):
    st = Streamer(model, c)
    st.horizon = horizon  # as if the trained context ended `horizon` tokens back
    with torch.no_grad():
        hs = [st.step(ids[s : s + c.segment]) for s in range(0, len(ids), c.segment)]
    return model.logits(torch.cat(hs)[None])[0]


def test_clamped_blocks_past_the_trained_context_sit_at_the_fixed_distance(tiny_model):
    """Beyond the horizon the clamped scheme is the fixed scheme (same selection, same scores:
    R(a)q . R(a-d)k = R(d)q . k), with one-token chunks so every query is its group's first;
    with an unbounded horizon it is the true scheme."""
    torch.manual_seed(14)
    ids = torch.randint(0, 300, (64,))
    base = cfg(retrieval="block", block_size=4, blocks=3, block_chunk=1, mem_distance=20)
    clamped = dataclasses.replace(base, positions="clamped")
    far = _stream_with_horizon(tiny_model, ids, clamped, -1)
    fixed = _stream_with_horizon(tiny_model, ids, dataclasses.replace(base, positions="fixed"), -1)
    torch.testing.assert_close(far, fixed, atol=1e-4, rtol=1e-4)
    near = _stream_with_horizon(tiny_model, ids, clamped, 10_000)
    true = _stream_with_horizon(tiny_model, ids, dataclasses.replace(base, positions="true"), 10_000)
    torch.testing.assert_close(near, true, atol=1e-4, rtol=1e-4)
    mixed = _stream_with_horizon(tiny_model, ids, clamped, 24)
    assert (mixed - near).abs().max() > 1e-3 and (mixed - far).abs().max() > 1e-3


def test_clamp_keys_scores_each_memory_at_its_clamped_distance(tiny_model):
    """Scored against queries rotated by their absolute positions, a clamped key gives the score
    at its real distance within the horizon, and at distance + (query - group start) beyond."""
    torch.manual_seed(15)
    inv = tiny_model.inv_freq
    d = 16
    keys = torch.randn(2, 10, d)
    pos = torch.tensor([[3, 5, 40, 41, 60, 61, 62, 63, 64, 65]] * 2)
    got = BlockRetrieval(keys, rotate_by(keys, inv[: d // 2], pos), keys, torch.ones(2, 10, dtype=torch.bool), None)
    got.positions = pos
    q_first, q_last = torch.tensor([70, 70]), torch.tensor([73, 73])
    mem = MemoryRead(None, 1, torch.arange(70, 74), scheme="clamped", distance=9, horizon=30, retrieval="block")
    km = clamp_keys(got, q_first, q_last, mem, inv[: d // 2])
    q = torch.randn(d)
    for a in range(70, 74):
        qa = rotate_by(q, inv[: d // 2], torch.tensor(a))
        for j in range(10):
            p = int(pos[0, j])
            dist = a - p if 73 - p <= 30 else 9 + (a - 70)
            want = rotate_by(q, inv[: d // 2], torch.tensor(dist)) @ keys[0, j]
            torch.testing.assert_close(qa @ km[0, j], want, atol=1e-4, rtol=1e-4)


def test_block_retrieval_with_sinks_masks_partial_blocks(tiny_model):
    """Sinks shift the memory off block boundaries: partial blocks must be masked, not zero-scored."""
    torch.manual_seed(12)
    ids = torch.randint(0, 300, (61,))
    c = cfg(sinks=3, segment=8)
    got_token, _ = run_stream(tiny_model, ids, c)  # top-k >= memory: every memory
    got_block, _ = run_stream(tiny_model, ids, dataclasses.replace(c, retrieval="block", block_size=4, blocks=1000))
    torch.testing.assert_close(got_block, got_token, atol=5e-5, rtol=1e-5)


def test_block_selection_matches_brute_force():
    """retrieve_blocks picks, per chunk and head, the blocks whose mean key has the largest inner
    product with the chunk's summed queries, and returns their keys/values in document order."""
    torch.manual_seed(13)
    mem = LayerMemory(2, 16, IndexSpec("flat"), block_size=8)
    keys, vals = torch.randn(2, 203, 16), torch.randn(2, 203, 16)
    for s in range(0, 203, 50):  # 26 blocks, the last one partial (3 entries)
        e = min(s + 50, 203)
        mem.add(keys[:, s:e], vals[:, s:e], torch.arange(s, e))
    q = torch.randn(2, 3, 5, 16)  # (KV, chunks, queries, D)
    got = mem.retrieve_blocks(q.sum(2), 4, 0.25)
    assert got.keys.shape == (6, 32, 16)
    for h in range(2):
        padded = torch.cat([keys[h], torch.zeros(5, 16)]).view(26, 8, 16)
        counts = torch.tensor([8] * 25 + [3]).float()
        means = padded.sum(1) / counts[:, None]
        for c in range(3):
            want = (q[h, c].sum(0) @ means.T).topk(4).indices.sort().values
            ids = (want[:, None] * 8 + torch.arange(8)).reshape(-1)
            ok = ids < 203
            row = h * 3 + c
            assert got.valid[row].tolist() == ok.tolist()
            torch.testing.assert_close(got.keys[row][ok], keys[h, ids[ok]])
            torch.testing.assert_close(got.values[row][ok], vals[h, ids[ok]])
            assert (got.keys[row][~ok] == 0).all()  # the unused tail is zero, never garbage


def test_block_memory_grows_by_whole_blocks():
    mem = LayerMemory(1, 8, IndexSpec("flat"), block_size=32)
    mem.add(torch.randn(1, 2500, 8), torch.randn(1, 2500, 8), torch.arange(2500))  # > 2x capacity
    mem.add(torch.randn(1, 7, 8), torch.randn(1, 7, 8), torch.arange(2500, 2507))
    assert mem.keys.shape[1] % 32 == 0 and len(mem) == 2507
    torch.testing.assert_close(mem.reps[0, 78], mem.keys[0, 2496:2507].mean(0))


def test_block_memory_room_and_the_partial_blocks_tail():
    """Buffers are not zero-filled: the last partial block's tail (gathered whole, masked) is
    zeroed as entries arrive; a capacity hint makes room at once, growing past it keeps every
    entry."""
    mem = LayerMemory(2, 8, IndexSpec("flat"), block_size=32, rotated=True, capacity=3000)
    assert mem.keys.shape[1] == 3072
    for buf in (mem.keys, mem.values, mem.rkeys):
        buf.fill_(float("nan"))  # garbage, as torch.empty may hold
    k, v = torch.randn(2, 3100, 8), torch.randn(2, 3100, 8)
    mem.add(k[:, :50], v[:, :50], torch.arange(50), rotated_k=k[:, :50])
    for buf in (mem.keys, mem.values, mem.rkeys):
        assert torch.equal(buf[:, 50:64], torch.zeros(2, 14, 8))
    mem.add(k[:, 50:], v[:, 50:], torch.arange(50, 3100), rotated_k=k[:, 50:])  # past the room
    assert mem.keys.shape[1] >= 3100 and torch.equal(mem.keys[:, :3100], k) and torch.equal(mem.values[:, :3100], v)
    assert not mem.keys[:, 3100:3104].any() and not torch.isnan(mem.reps[:, :97]).any()


def test_block_retrieval_bad_settings():
    with pytest.raises(MemtxError, match="retrieval must be"):
        cfg(retrieval="blocks")
    with pytest.raises(MemtxError, match="block-votes must be between 0"):
        cfg(retrieval="block", block_chunk=8, block_votes=9)
    with pytest.raises(MemtxError, match="block-votes"):
        cfg(retrieval="block", block_votes=-1)
    with pytest.raises(MemtxError, match="block-size"):
        cfg(retrieval="block", block_size=48)


@pytest.mark.parametrize(("chunk", "votes"), [(4, 0), (8, 0), (8, 4)])
def test_block_retrieval_is_causal(tiny_model, chunk, votes):
    """A token's memories never depend on later tokens: change the tail of the document and
    every earlier prediction stays bit-identical (selectors come from earlier chunks only)."""
    torch.manual_seed(14)
    ids = torch.randint(0, 300, (80,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=chunk, positions="fixed", sinks=2)
    c = dataclasses.replace(c, block_votes=votes)
    a, st = run_stream(tiny_model, ids, c)
    assert st.memory_entries > 0
    changed = ids.clone()
    changed[50:] = torch.randint(0, 300, (30,))
    b, _ = run_stream(tiny_model, changed, c)
    assert torch.equal(a[:49], b[:49])
    assert not torch.equal(a[49:], b[49:])


# ----------------------------------------------------------------------------------------------
# Memory heads (--memory-heads) and block spread (--block-spread)


@pytest.mark.parametrize("retrieval", ["token", "block"])
def test_memory_heads_equal_masking_the_other_heads_memory(tiny_model, retrieval):
    """Memory in KV head 1 of layer 0 and KV head 0 of layer 2 only: the same numbers as memory
    in every head with the others' memories weighted e^-inf (joint bias c_h = -inf on their
    query heads). Selection is per KV head, so the heads with memory see exactly what they did."""
    torch.manual_seed(21)
    ids = torch.randint(0, 300, (64,))
    kw = dict(retrieval=retrieval, block_size=4, blocks=3, block_chunk=4, top_k=5, positions="fixed", sinks=2)
    got, st = run_stream(tiny_model, ids, cfg(memory_heads="0.1,2.0", **kw))
    assert st.layers == [0, 2] and st.heads == {0: [1], 2: [0]}
    assert st.memories[0].n_kv == 1 and st.memory_entries == 2 * (64 - 8 - 2)  # one head's entries per layer
    ref_model = copy.deepcopy(tiny_model)
    ref_model.add_memory_params([0, 1, 2], 0.0)
    g = 2  # query heads per KV head (4 / 2)
    off = {0: [0], 1: [0, 1], 2: [1]}  # KV heads without memory, per layer
    with torch.no_grad():
        for layer, kvs in off.items():
            for h in kvs:
                ref_model.layers[layer].attn.mem_bias[h * g : (h + 1) * g] = -1e9
    ref, _ = run_stream(ref_model, ids, cfg(**kw))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    window, _ = run_stream(tiny_model, ids, cfg(memory=False, **kw))
    full_mem, _ = run_stream(tiny_model, ids, cfg(**kw))
    assert not torch.allclose(got, window) and not torch.allclose(got, full_mem)


# Query heads (tiny model: 4 query heads, 2 KV heads, G = 2): layer 0 reads memory in query
# heads 1 (KV head 0) and 2, 3 (KV head 1), layer 1 in query head 3, layer 2 in query head 0.
Q_RANKING = "0.1,0.2,0.3,1.3,2.0"


@pytest.mark.parametrize("retrieval", ["token", "block"])
def test_query_heads_equal_masking_the_other_query_heads_memory(tiny_model, retrieval):
    """--memory-heads topqN: the KV heads of the chosen query heads keep memories; only those
    query heads read them (block retrieval skips the others' work, in runs of KV heads with as
    many query heads). Selection is per KV head, so the numbers equal memory in every head with
    the other query heads' memories weighted e^-inf (joint bias)."""
    torch.manual_seed(31)
    ids = torch.randint(0, 300, (64,))
    kw = dict(retrieval=retrieval, block_size=4, blocks=3, block_chunk=4, top_k=5, positions="clamped", sinks=2)
    got, st = run_stream(tiny_model, ids, cfg(memory_heads="topq5", query_head_ranking=Q_RANKING, **kw))
    assert st.heads == {0: None, 1: [1], 2: [0]}
    assert st.qmasks[0].tolist() == [[False, True], [True, True]]
    assert st.qmasks[1].tolist() == [[False, True]] and st.qmasks[2].tolist() == [[True, False]]
    ref_model = copy.deepcopy(tiny_model)
    ref_model.add_memory_params([0, 1, 2], 0.0)
    off = {0: [0], 1: [0, 1, 2], 2: [1, 2, 3]}  # query heads without memory, per layer
    with torch.no_grad():
        for layer, qs in off.items():
            ref_model.layers[layer].attn.mem_bias[qs] = -1e9
    ref, _ = run_stream(ref_model, ids, cfg(**kw))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    window, _ = run_stream(tiny_model, ids, cfg(memory=False, **kw))
    assert not torch.allclose(got, window)


def test_query_runs_group_kv_heads_by_their_query_head_count():
    t, f = True, False
    mask = torch.tensor([[t, t, t], [f, t, f], [t, f, f], [t, t, f]])
    runs = query_runs(mask, 4)
    assert [(a, b) for a, b, _ in runs] == [(0, 1), (1, 3), (3, 4)]
    assert runs[0][2] is None and runs[1][2].tolist() == [[1], [0]] and runs[2][2].tolist() == [[0, 1]]
    assert query_runs(None, 3) == [(0, 3, None)]


def test_query_heads_covering_whole_groups_equal_kv_heads(tiny_model):
    """Every query head of a KV head chosen = that KV head chosen (same blocks, same numbers)."""
    torch.manual_seed(32)
    ids = torch.randint(0, 300, (64,))
    kw = dict(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2, block_votes=2)
    a, st = run_stream(tiny_model, ids, cfg(memory_heads="topq4", query_head_ranking="0.2,2.0,0.3,2.1", **kw))
    assert st.heads == {0: [1], 2: [0]} and all(m is None for m in st.qmasks.values())
    b, _ = run_stream(tiny_model, ids, cfg(memory_heads="0.1,2.0", **kw))
    assert torch.equal(a, b)


@pytest.mark.parametrize("votes", [0, 2])
def test_query_heads_stay_causal_and_decoding_agrees(tiny_model, votes):
    """Query heads without memory skip it: still causal, and token-by-token decoding equals
    segment scoring."""
    torch.manual_seed(33)
    ids = torch.randint(0, 300, (80,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, block_votes=votes, memory_heads="topq5", query_head_ranking=Q_RANKING)
    _assert_causal_and_decoding_agrees(tiny_model, ids, c)


def _assert_causal_and_decoding_agrees(model, ids, c, at=50, pieces=3, n_dec=64):
    """Changing tokens from `at` on leaves every earlier prediction bit-identical, and decoding
    the first n_dec tokens in pieces equals scoring them as segments."""
    a, _ = run_stream(model, ids, c)
    changed = ids.clone()
    changed[at:] = torch.randint(0, 300, (len(ids) - at,))
    b, _ = run_stream(model, changed, c)
    assert torch.equal(a[: at - 1], b[: at - 1])
    seg = _logits_in_pieces(model, Streamer(model, c), ids[:n_dec], 0)
    dec = _logits_in_pieces(model, Streamer(model, c), ids[:n_dec], pieces)
    torch.testing.assert_close(seg, dec, atol=1e-3, rtol=1e-4)


def test_memory_heads_listing_every_head_is_all(tiny_model):
    torch.manual_seed(22)
    ids = torch.randint(0, 300, (48,))
    kw = dict(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    a, _ = run_stream(tiny_model, ids, cfg(**kw))
    b, st = run_stream(tiny_model, ids, cfg(memory_heads="0.0,0.1,1.0,1.1,2.0,2.1", **kw))
    assert all(h is None for h in st.heads.values())
    assert torch.equal(a, b)
    c, st = run_stream(tiny_model, ids, cfg(memory_heads="top3", head_ranking="2.1,0.0,1.1,1.0", **kw))
    assert st.heads == {0: [0], 1: [1], 2: [1]}


def test_memory_heads_bad_settings(tiny_model):
    ids = torch.randint(0, 300, (20,))
    for spec, msg in (
        ("3.0", "out of range"),
        ("0.2", "out of range"),
        ("0-1", "layer.head pairs"),
        ("top2", "needs a head-ranking"),
        ("topq2", "needs a query-head-ranking"),
        ("topx", "topN"),
        ("topq0", "topqN"),
    ):
        with pytest.raises(MemtxError, match=msg):
            run_stream(tiny_model, ids, cfg(memory_heads=spec))
    with pytest.raises(MemtxError, match="select no head"):
        run_stream(tiny_model, ids, cfg(memory_layers="1", memory_heads="0.0"))
    with pytest.raises(MemtxError, match="4 query heads per layer"):
        run_stream(tiny_model, ids, cfg(memory_heads="topq1", query_head_ranking="0.4"))
    with pytest.raises(MemtxError, match="block-spread"):
        cfg(block_spread=-1)


# Block budgets per KV head (--memory-heads 18.2:224,8.0:32): tiny model, 3 layers x 2 KV heads.
BUDGET_KW = dict(retrieval="block", block_size=4, block_chunk=4, positions="clamped", sinks=2, block_votes=2)


def _layer0_memory_attention(model, ids, c):
    """The memory attention (out, lse) of layer 0 for every segment. Layer 0's inputs do not
    depend on memory, so two settings can be compared head by head."""
    model.use_memory([0])  # layer 0 a memorizing layer now, so its read can be wrapped
    attn, got = model.layers[0].attn, []
    orig = attn.block_memory_attention

    def record(*a):
        out = orig(*a)
        got.append(out[:2])
        return out

    attn.block_memory_attention = record
    try:
        run_stream(model, ids, c)
    finally:
        del attn.block_memory_attention
    return got


def test_head_budgets_read_each_heads_best_blocks(tiny_model):
    """Head 0.0 with a budget of 1 block and 0.1 with 3 read what they read with those budgets
    for every head: each KV head selects alone, and a budget keeps its best blocks."""
    torch.manual_seed(61)
    ids = torch.randint(0, 300, (96,))
    mixed = _layer0_memory_attention(tiny_model, ids, cfg(memory_heads="0.0:1,0.1:3", blocks=2, **BUDGET_KW))
    one = _layer0_memory_attention(tiny_model, ids, cfg(memory_heads="0.0,0.1", blocks=1, **BUDGET_KW))
    three = _layer0_memory_attention(tiny_model, ids, cfg(memory_heads="0.0,0.1", blocks=3, **BUDGET_KW))
    assert len(mixed) == len(one) > 5
    for (o, lse), (o1, l1), (o3, l3) in zip(mixed, one, three, strict=True):
        torch.testing.assert_close(o[0], o1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[0], l1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o[1], o3[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[1], l3[1], atol=1e-5, rtol=1e-5)


def test_equal_head_budgets_equal_one_budget_and_masking_equals_cutting(tiny_model):
    """Every head with the same budget = `blocks` for all (best-first order, same numbers); a
    (here empty) far budget keeps the rows whole and masks past each head's budget instead of
    cutting them: the same numbers."""
    torch.manual_seed(62)
    ids = torch.randint(0, 300, (96,))
    every = ",".join(f"{i}.{h}:2" for i in range(3) for h in range(2))
    a, st = run_stream(tiny_model, ids, cfg(memory_heads=every, blocks=5, **BUDGET_KW))
    assert all(b is not None and b.tolist() == [2, 2] for b in st.head_blocks.values())
    b, st = run_stream(tiny_model, ids, cfg(blocks=2, **BUDGET_KW))
    assert all(v is None for v in st.head_blocks.values())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    spec = "0.0:1,0.1:3,1.1,2.0:4"
    cut, st = run_stream(tiny_model, ids, cfg(memory_heads=spec, blocks=2, far_blocks=0, **BUDGET_KW))
    assert st.head_blocks[0].tolist() == [1, 3] and st.head_blocks[1] is None and st.head_blocks[2].tolist() == [4]
    masked, _ = run_stream(tiny_model, ids, cfg(memory_heads=spec, blocks=2, far_blocks=1, **BUDGET_KW))
    torch.testing.assert_close(cut, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cut, b)


@pytest.mark.parametrize("far_blocks", [0, -1])
def test_head_budgets_gathered_apart_equal_gathered_whole_and_cut(tiny_model, monkeypatch, far_blocks):
    """Each run of heads gathering only its own budget's blocks (LayerMemory.gathers_by_head)
    gives the numbers of gathering every row to the layer's largest budget and cutting, near
    blocks only (0) or near and far blocks in one budget (-1, far keys rotated per row)."""
    from memtx_cli.memory.store import LayerMemory

    torch.manual_seed(64)
    ids = torch.randint(0, 300, (96,))
    c = cfg(memory_heads="0.0:1,0.1:3,1.1,2.0:4", blocks=2, far_blocks=far_blocks, **BUDGET_KW)
    apart = _stream_with_horizon(tiny_model, ids, c, 40)  # blocks older than 40 tokens are far
    monkeypatch.setattr(LayerMemory, "gathers_by_head", False)
    whole = _stream_with_horizon(tiny_model, ids, c, 40)
    torch.testing.assert_close(apart, whole, atol=1e-6, rtol=1e-6)


def test_head_budgets_stay_causal_and_decoding_agrees(tiny_model):
    torch.manual_seed(63)
    ids = torch.randint(0, 300, (80,))
    c = cfg(memory_heads="0.0:1,0.1:3,2.1:2", blocks=2, **BUDGET_KW)
    _assert_causal_and_decoding_agrees(tiny_model, ids, c)


def test_query_runs_split_where_the_budget_changes():
    runs = query_runs(None, 4, torch.tensor([2, 2, 5, 2]))
    assert [(a, b) for a, b, _ in runs] == [(0, 2), (2, 3), (3, 4)]


def test_blocks_set_later_override_head_budgets():
    """--blocks on the command line beats the card's per-head budgets (same heads, `blocks`
    each); budgets set later than `blocks` stand."""
    from memtx_cli.config import merge_config

    card = {"memory_heads": "0.0:2, 1.1:3", "blocks": 5, "retrieval": "block", "memory_layers": "all"}
    assert merge_config(card).memory_heads == "0.0:2, 1.1:3"
    flags = merge_config(card, {"blocks": 7})
    assert flags.memory_heads == "0.0,1.1" and flags.blocks == 7
    assert plan.blocks_for(flags, 3, 2) == {0: None, 1: None}
    assert plan.blocks_for(merge_config({"blocks": 7}, card), 3, 2) == {0: [2], 1: [3]}


def test_head_budgets_bad_settings(tiny_model):
    ids = torch.randint(0, 300, (20,))
    for spec in ("0.0:0", "0.0:x", "0.0:-1"):
        with pytest.raises(MemtxError, match="block budget"):
            run_stream(tiny_model, ids, cfg(memory_heads=spec, retrieval="block"))
    # Token retrieval reads top-k in the same heads, budgets aside (the card's budgets must not
    # stop --retrieval token).
    a, _ = run_stream(tiny_model, ids, cfg(memory_heads="0.0:2,2.1:5", retrieval="token", top_k=3))
    b, _ = run_stream(tiny_model, ids, cfg(memory_heads="0.0,2.1", retrieval="token", top_k=3))
    assert torch.equal(a, b)


def test_spread_forward_gives_each_block_its_predecessors_relevance():
    rel = torch.tensor([[5.0, 0.0, 1.0, -2.0, 3.0, -1.0]])
    torch.testing.assert_close(spread_forward(rel, 0), rel)
    torch.testing.assert_close(spread_forward(rel, 1), torch.tensor([[5.0, 5.0, 1.0, 1.0, 3.0, 3.0]]))
    torch.testing.assert_close(spread_forward(rel, 2), torch.tensor([[5.0, 5.0, 5.0, 1.0, 3.0, 3.0]]))
    torch.testing.assert_close(spread_forward(rel, 9), torch.tensor([[5.0] * 6]))


def test_block_spread_picks_the_blocks_after_a_match():
    """The best-scoring block and the `spread` blocks after it are picked, in document order."""
    mem = LayerMemory(1, 4, IndexSpec(), block_size=2)
    keys = torch.zeros(1, 12, 4)
    keys[0, 4:6, 0] = 10.0  # block 2 matches the selector
    keys[0, 10:12, 1] = 3.0  # block 5 matches a little
    mem.add(keys, keys.clone(), torch.arange(12))
    sel = torch.tensor([[[1.0, 0.5, 0.0, 0.0]]])  # (KV, C, D)

    def picked(spread: int, m: int) -> list[int]:
        rel = spread_forward(mem.block_relevance(sel), spread)
        return rel.topk(m, -1).indices.sort(-1).values[0, 0].tolist()

    assert picked(0, 2) == [2, 5]
    assert picked(2, 3) == [2, 3, 4]
    got = mem.retrieve_blocks(sel, 3, 1.0, spread=2)
    torch.testing.assert_close(got.keys[0], keys[0, 4:10])


@pytest.mark.parametrize("chunk", [3, 8])
def test_block_spread_with_every_block_is_still_full_attention(tiny_model, chunk):
    torch.manual_seed(23)
    ids = torch.randint(0, 300, (61,))
    causal = torch.ones(61, 61, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, causal), ids)
    c = cfg(retrieval="block", block_size=4, blocks=1000, block_chunk=chunk, positions="clamped", block_spread=3)
    got, _ = run_stream(tiny_model, ids, c)
    torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=1e-5)


def test_block_spread_and_memory_heads_stay_causal(tiny_model):
    torch.manual_seed(24)
    ids = torch.randint(0, 300, (80,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, block_spread=2, memory_heads="0.1,1.0,2.1")
    a, _ = run_stream(tiny_model, ids, c)
    changed = ids.clone()
    changed[50:] = torch.randint(0, 300, (30,))
    b, _ = run_stream(tiny_model, changed, c)
    assert torch.equal(a[:49], b[:49])


# ----------------------------------------------------------------------------------------------
# Far memories under clamped positions (--far-layers / --far-blocks / --far-bias)


def _with_joint_bias(model, c):
    """A copy of the model whose every layer adds c to every memory logit (joint mem_bias)."""
    ref = copy.deepcopy(model)
    ref.add_memory_params(list(range(len(ref.layers))), 0.0)
    with torch.no_grad():
        for layer in ref.layers:
            layer.attn.mem_bias.fill_(c)
    return ref


def test_far_budget_past_the_horizon_is_fixed_with_that_budget(tiny_model):
    """Everything past the horizon: the near budget finds nothing (masked), the far budget picks
    exactly what the fixed scheme picks with that many blocks, and far-bias b is the joint
    memory bias c_h = -b on every head. far-blocks 0 reads no memory at all: the window."""
    torch.manual_seed(31)
    ids = torch.randint(0, 300, (64,))
    base = cfg(
        retrieval="block", block_size=4, blocks=5, block_chunk=1, mem_distance=20, sinks=2, sink_positions="window"
    )
    clamped = dataclasses.replace(base, positions="clamped", far_blocks=2)
    fixed2 = dataclasses.replace(base, positions="fixed", blocks=2)
    got = _stream_with_horizon(tiny_model, ids, clamped, -1)
    torch.testing.assert_close(got, _stream_with_horizon(tiny_model, ids, fixed2, -1), atol=1e-4, rtol=1e-4)
    biased = _stream_with_horizon(tiny_model, ids, dataclasses.replace(clamped, far_bias=2.0), -1)
    want = _stream_with_horizon(_with_joint_bias(tiny_model, -2.0), ids, fixed2, -1)
    torch.testing.assert_close(biased, want, atol=1e-4, rtol=1e-4)
    none = _stream_with_horizon(tiny_model, ids, dataclasses.replace(clamped, far_blocks=0), -1)
    window = _stream_with_horizon(tiny_model, ids, dataclasses.replace(base, memory=False), -1)
    torch.testing.assert_close(none, window, atol=1e-5, rtol=1e-5)
    only_top = _stream_with_horizon(tiny_model, ids, dataclasses.replace(clamped, far_layers="2"), -1)
    assert not torch.allclose(only_top, got) and not torch.allclose(only_top, window)


def test_near_budget_within_the_horizon_is_the_shared_budget(tiny_model):
    """Within the trained context every block is near: separate budgets change nothing."""
    torch.manual_seed(32)
    ids = torch.randint(0, 300, (64,))
    base = cfg(retrieval="block", block_size=4, blocks=3, block_chunk=4, positions="clamped", sinks=2)
    a, _ = run_stream(tiny_model, ids, base)
    b, _ = run_stream(tiny_model, ids, dataclasses.replace(base, far_blocks=2, far_bias=1.0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # (the far picks are masked out)
    with pytest.raises(MemtxError, match="far-blocks"):
        dataclasses.replace(base, far_blocks=-2)


@pytest.mark.parametrize("k", [3, 1000])
def test_far_top_k_past_the_horizon_is_fixed_token_retrieval(tiny_model, k):
    """Everything past the horizon, no far blocks: each query attends to its own top-k memories
    at the fixed distance, searched with its group's summed query: exactly the fixed scheme's
    shared token retrieval with that k (k >= the memory: every memory). far-bias b is the
    joint memory bias c_h = -b."""
    torch.manual_seed(33)
    ids = torch.randint(0, 300, (64,))
    base = cfg(block_size=4, block_chunk=4, mem_distance=20, sinks=2, sink_positions="window", shared_search=True)
    far = dataclasses.replace(base, retrieval="block", blocks=3, positions="clamped", far_blocks=0, far_top_k=k)
    token = dataclasses.replace(base, retrieval="token", positions="fixed", top_k=k)
    got = _stream_with_horizon(tiny_model, ids, far, -1)
    torch.testing.assert_close(got, _stream_with_horizon(tiny_model, ids, token, -1), atol=1e-4, rtol=1e-4)
    biased = _stream_with_horizon(tiny_model, ids, dataclasses.replace(far, far_bias=1.5), -1)
    want = _stream_with_horizon(_with_joint_bias(tiny_model, -1.5), ids, token, -1)
    torch.testing.assert_close(biased, want, atol=1e-4, rtol=1e-4)


def test_far_top_k_reads_only_past_the_horizon_and_stays_causal(tiny_model):
    """Within the trained context far-top-k reads nothing (the near blocks alone); with a short
    horizon it changes the result, and a token's memories never depend on later tokens."""
    torch.manual_seed(34)
    ids = torch.randint(0, 300, (80,))
    base = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2, far_blocks=0)
    near = _stream_with_horizon(tiny_model, ids, base, 10_000)
    withk = dataclasses.replace(base, far_top_k=4, far_bias=1.0)
    torch.testing.assert_close(_stream_with_horizon(tiny_model, ids, withk, 10_000), near, atol=1e-6, rtol=1e-6)
    a = _stream_with_horizon(tiny_model, ids, withk, 20)
    assert (a - _stream_with_horizon(tiny_model, ids, base, 20)).abs().max() > 1e-3
    changed = ids.clone()
    changed[50:] = torch.randint(0, 300, (30,))
    b = _stream_with_horizon(tiny_model, changed, withk, 20)
    assert torch.equal(a[:49], b[:49])
    with pytest.raises(MemtxError, match="far-top-k"):
        dataclasses.replace(base, far_top_k=-1)
    with pytest.raises(MemtxError, match="positions clamped"):
        dataclasses.replace(base, far_top_k=4, positions="fixed")


def test_far_top_k_decoding_token_by_token_equals_segments(tiny_model):
    """feed() a few tokens at a time draws the same near/far line and finds the same far
    memories as whole segments (the bound is per chunk, not per call)."""
    torch.manual_seed(36)
    ids = torch.randint(0, 300, (70,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, far_blocks=0, far_top_k=3, far_bias=0.5, block_votes=2)

    def run(pieces):
        st = Streamer(tiny_model, c)
        st.horizon = 20
        return _logits_in_pieces(tiny_model, st, ids, pieces)

    torch.testing.assert_close(run(0), run(3), atol=1e-3, rtol=1e-4)


def _far_attention_by_layer(model, ids, c, horizon, layer=0):
    """far_token_attention's (out, lse) in `layer` for every segment, with the trained context
    ending `horizon` tokens back. Layer 0's inputs do not depend on memory."""
    model.use_memory([layer])  # a memorizing layer now, so its read can be wrapped
    attn, got = model.layers[layer].attn, []
    orig = attn.far_token_attention

    def record(*a):
        out = orig(*a)
        got.append(out)
        return out

    attn.far_token_attention = record
    try:
        logits = _stream_with_horizon(model, ids, c, horizon)
    finally:
        del attn.far_token_attention
    return logits, got


def test_far_heads_read_the_far_past_alone(tiny_model):
    """--far-heads: the listed memory heads read the far past exactly as they do when every head
    reads it (each searches its own keys); the others read none of it (lse -inf: weight 0).
    Listing every head is "all"; a subset differs from both all and none."""
    torch.manual_seed(38)
    ids = torch.randint(0, 300, (80,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, far_blocks=0, far_top_k=3, far_bias=0.5)
    every, want = _far_attention_by_layer(tiny_model, ids, c, 20)
    some, got = _far_attention_by_layer(tiny_model, ids, dataclasses.replace(c, far_heads="0.1,2.0"), 20)
    assert len(got) == len(want) and any(torch.isfinite(lse).any() for _, lse in want)
    for (o, lse), (o_all, lse_all) in zip(got, want, strict=True):
        torch.testing.assert_close(o[1], o_all[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[1], lse_all[1], atol=1e-6, rtol=1e-6)
        assert not o[0].any() and torch.isneginf(lse[0]).all()
    listed = _stream_with_horizon(tiny_model, ids, dataclasses.replace(c, far_heads="0.0,0.1,1.0,1.1,2.0,2.1"), 20)
    assert torch.equal(listed, every)
    none = _stream_with_horizon(tiny_model, ids, dataclasses.replace(c, far_top_k=0), 20)
    assert (some - every).abs().max() > 1e-3 and (some - none).abs().max() > 1e-3


def test_far_heads_outside_the_memory_heads_read_nothing_far(tiny_model):
    """far-heads lists candidates: a listed head that is not a memory head of a far layer reads
    no far past (the card's list stays valid under other --memory-heads); bad pairs are refused."""
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", far_top_k=2)
    rows = dataclasses.replace(c, memory_heads="0.0,1.1,2.0", far_heads="0.1,1.1,2.0", far_layers="0-1")
    assert plan.far_rows_for(rows, 3, 2, 4) == {0: [], 1: [0], 2: []}
    assert plan.far_rows_for(dataclasses.replace(c, far_layers="1-2"), 3, 2, 4) == {0: [], 1: None, 2: None}
    for bad in ("0.5", "zero"):
        with pytest.raises(MemtxError, match=f"far heads '{bad}': use all or layer.head pairs"):
            run_stream(tiny_model, torch.randint(0, 300, (20,)), dataclasses.replace(c, far_heads=bad))


def test_far_scope_all_reads_every_memory_and_stays_causal(tiny_model):
    """far-scope all: with the whole memory near (nothing past the horizon) each query still
    reads its own top-k of every memory at the fixed distance, on top of the near blocks;
    with k >= the memory and no near blocks that is the fixed scheme's token retrieval of
    everything. Causal, and feeding token by token equals whole segments."""
    torch.manual_seed(41)
    ids = torch.randint(0, 300, (72,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2, far_blocks=0)
    c = dataclasses.replace(c, far_top_k=3, far_bias=0.5, mem_distance=20, sink_positions="window")
    beyond = _stream_with_horizon(tiny_model, ids, c, 10_000)
    every = dataclasses.replace(c, far_scope="all")
    a = _stream_with_horizon(tiny_model, ids, every, 10_000)
    assert (a - beyond).abs().max() > 1e-3
    changed = ids.clone()
    changed[50:] = torch.randint(0, 300, (22,))
    assert torch.equal(a[:49], _stream_with_horizon(tiny_model, changed, every, 10_000)[:49])

    def run(pieces):
        st = Streamer(tiny_model, every)
        return _logits_in_pieces(tiny_model, st, ids, pieces)

    torch.testing.assert_close(run(0), run(3), atol=1e-3, rtol=1e-4)
    # horizon -1: no near block at all; far-scope all with k >= memory = fixed token retrieval
    allk = dataclasses.replace(every, far_top_k=1000, far_bias=0.0, shared_search=True)
    token = cfg(retrieval="token", positions="fixed", top_k=1000, mem_distance=20, sinks=2, shared_search=True)
    token = dataclasses.replace(token, block_size=4, block_chunk=4, sink_positions="window")
    torch.testing.assert_close(
        _stream_with_horizon(tiny_model, ids, allk, -1),
        _stream_with_horizon(tiny_model, ids, token, -1),
        atol=1e-4,
        rtol=1e-4,
    )
    with pytest.raises(MemtxError, match="far-scope"):
        dataclasses.replace(c, far_scope="near")


def test_recall_heads_read_without_the_prior(tiny_model):
    """recall-heads: the listed far-reading heads read with no far-bias, the others with it:
    every head listed equals far-bias 0, none listed equals the plain far-bias."""
    torch.manual_seed(42)
    ids = torch.randint(0, 300, (80,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, far_blocks=0, far_top_k=3, far_bias=1.5)
    every = "0.0,0.1,1.0,1.1,2.0,2.1"
    zero = _stream_with_horizon(tiny_model, ids, dataclasses.replace(c, far_bias=0.0), 20)
    torch.testing.assert_close(
        _stream_with_horizon(tiny_model, ids, dataclasses.replace(c, recall_heads=every), 20),
        zero,
        atol=1e-5,
        rtol=1e-5,
    )
    plain = _stream_with_horizon(tiny_model, ids, c, 20)
    some = _stream_with_horizon(tiny_model, ids, dataclasses.replace(c, recall_heads="1.0"), 20)
    assert (some - plain).abs().max() > 1e-4 and (some - zero).abs().max() > 1e-4
    assert plan.far_bias_for(dataclasses.replace(c, recall_heads="1.0", far_heads="1.0,1.1"), 3, 2, 4) == {
        0: [],
        1: [0.0, 1.5],
        2: [],
    }
    with pytest.raises(MemtxError, match="recall heads '1.7'"):
        run_stream(tiny_model, ids, dataclasses.replace(c, recall_heads="1.7"))


def test_answering_tokens_read_every_memory_in_every_memory_head(tiny_model):
    """answer-top-k: a streamer answering (generation's prompt and new tokens) reads as
    far-top-k would with far-scope all, every memory head and no prior; scoring is unchanged,
    and generation keeps the raw keys those reads need."""
    torch.manual_seed(43)
    ids = torch.randint(0, 300, (72,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2, far_blocks=0)
    c = dataclasses.replace(c, far_top_k=2, far_heads="1.0", far_bias=1.5, mem_distance=20, memory_heads="all")
    asked = dataclasses.replace(c, answer_top_k=3)
    every = dataclasses.replace(c, far_top_k=3, far_heads="all", far_scope="all", far_bias=0.0)

    def stream(conf, answering, pieces=0):
        st = Streamer(tiny_model, conf, keep_all=True)
        st.horizon = 20
        st.answering = answering
        return _logits_in_pieces(tiny_model, st, ids, pieces)

    torch.testing.assert_close(stream(asked, True), stream(every, False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stream(asked, False), stream(c, False), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stream(asked, True, 3), stream(asked, True), atol=1e-3, rtol=1e-4)
    token = dataclasses.replace(asked, retrieval="token", positions="fixed", far_top_k=0)
    torch.testing.assert_close(stream(token, True), stream(token, False), atol=0, rtol=0)
    with pytest.raises(MemtxError, match="answer-top-k"):
        dataclasses.replace(c, answer_top_k=-1)
    # answer-pages: the answering reads search pages (blocks' key bounds kept); with more pages
    # than blocks they read what the exact search reads, and scoring never pages
    paged = dataclasses.replace(asked, answer_pages=64)
    torch.testing.assert_close(stream(paged, True), stream(asked, True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stream(paged, False), stream(c, False), atol=1e-6, rtol=1e-6)
    few = stream(dataclasses.replace(asked, answer_pages=2), True)
    assert few.isfinite().all() and (few - stream(asked, True)).abs().max() > 1e-4
    with pytest.raises(MemtxError, match="answer-pages"):
        dataclasses.replace(c, answer_pages=-1)


def test_far_top_k_from_an_earlier_layer_yields_to_other_positions():
    """The card's far-top-k is dropped when a later layer (YAML, flags) asks for positions or a
    retrieval it cannot work with; set in the same layer as them it is an error."""
    from memtx_cli.config import merge_config

    card = {"positions": "clamped", "retrieval": "block", "far_top_k": 32, "far_heads": "18.2"}
    assert merge_config(card, {"positions": "fixed"}).far_top_k == 0
    assert merge_config(card, {"retrieval": "token"}).far_top_k == 0
    assert merge_config(card, {"blocks": 8}).far_top_k == 32
    with pytest.raises(MemtxError, match="positions clamped"):
        merge_config(card, {"positions": "fixed", "far_top_k": 8})


def test_far_search_in_bfloat16_finds_the_exact_top_k():
    """Keys kept in bfloat16: the 16-bit matmul shortlists 2k candidates and float32 rescoring
    picks the top k; the same entries as exact float32 search over the same keys, for the heads
    asked for."""
    torch.manual_seed(39)
    mem = LayerMemory(3, 64, IndexSpec("flat"), dtype=torch.bfloat16, block_size=32)
    keys, n = torch.randn(3, 5000, 64), 5000
    mem.add(keys, torch.randn(3, n, 64), torch.arange(n))
    q = torch.randn(2, 16, 64).bfloat16().float()  # a bfloat16 model's search vectors
    got = mem.retrieve_far(q, 32, 4800, rows=[2, 0])
    exact = torch.einsum("rqd,rnd->rqn", q, mem.keys[[2, 0], :4800].float()).topk(32, dim=-1).indices
    assert torch.equal(got.positions.sort(-1).values, exact.sort(-1).values)
    values = mem.values[[2, 0]].float()[torch.arange(2)[:, None, None], exact.sort(-1).values]
    order = got.positions.sort(-1).indices
    torch.testing.assert_close(got.values.float().gather(2, order[..., None].expand(-1, -1, -1, 64)), values)


def test_paged_far_search_keeps_the_best_keys():
    """far-pages: the search runs within the blocks a query's score bound (per-channel key
    min/max) ranks best. A bound is never below a block's best score, so a query's single best
    key is always found; on clustered keys (blocks of one topic, as text's are) most of the
    exact top-k is; with every block a page it is the exact search."""
    torch.manual_seed(44)
    b, nb = 32, 160
    topics = torch.randn(nb, 1, 64) * 2.0
    keys = (topics + torch.randn(nb, b, 64)).reshape(1, nb * b, 64)
    n = nb * b
    mem = LayerMemory(1, 64, IndexSpec("flat"), block_size=b, bounds=True)
    mem.add(keys, torch.randn(1, n, 64), torch.arange(n))
    q = torch.randn(1, 24, 64) + keys[:, torch.randint(0, n, (24,))]  # near some stored keys
    bound = n - 7  # a partial last block
    exact = (q[0] @ keys[0, :bound].t()).topk(32, dim=-1).indices
    got = mem.retrieve_far(q, 32, bound, pages=16).positions[0]
    assert bool((got < bound).all())
    assert bool((got == exact[:, :1]).any(-1).all())  # each query's best key
    recall = sum(len(set(g.tolist()) & set(e.tolist())) for g, e in zip(got, exact, strict=True)) / exact.numel()
    assert recall > 0.9
    whole = mem.retrieve_far(q, 32, bound, pages=nb).positions[0]  # no block skipped: exact
    assert torch.equal(whole.sort(-1).values, exact.sort(-1).values)


@pytest.mark.parametrize(("n", "k"), [(1000, 7), (1003, 32), (40, 32), (5, 5)])
def test_exact_top_k_equals_topk(n, k):
    """The two-pass top-k (groups by their maxima, then candidates) finds the same entries."""
    torch.manual_seed(37)
    scores = torch.randn(2, 9, n)
    got = exact_top_k(scores, k).sort(-1).values
    torch.testing.assert_close(got, scores.topk(k, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize(("n", "m"), [(1000, 7), (1003, 32), (40, 32), (5, 5)])
def test_top_rows_equals_topk(n, m):
    """The transposed two-pass top-k finds the rows topk finds on the same (float32) scores."""
    torch.manual_seed(38)
    keys, q = torch.randn(n, 16), torch.randn(9, 16)
    got = top_rows(keys, q, m).sort(-1).values
    torch.testing.assert_close(got, (q @ keys.t()).topk(m, dim=-1).indices.sort(-1).values)


def test_merge_lse_is_attention_over_the_union():
    """Two partial attentions merged by log-sum-exp equal one softmax over both key sets; a side
    with no keys (lse -inf) leaves the other unchanged."""
    torch.manual_seed(35)
    s1, s2, v1, v2 = torch.randn(5, 7), torch.randn(5, 3), torch.randn(7, 4), torch.randn(3, 4)
    o, lse = merge_lse(s1.softmax(-1) @ v1, s1.logsumexp(-1), s2.softmax(-1) @ v2, s2.logsumexp(-1))
    s = torch.cat([s1, s2], -1)
    torch.testing.assert_close(o, s.softmax(-1) @ torch.cat([v1, v2]))
    torch.testing.assert_close(lse, s.logsumexp(-1))
    empty = torch.full((5,), float("-inf"))
    o2, lse2 = merge_lse(s1.softmax(-1) @ v1, s1.logsumexp(-1), torch.zeros(5, 4), empty)
    torch.testing.assert_close(o2, s1.softmax(-1) @ v1)
    torch.testing.assert_close(lse2, s1.logsumexp(-1))


# ----------------------------------------------------------------------------------------------
# Block selection by vote (--block-votes)


def test_block_votes_relevance_matches_brute_force():
    """Each voter attends over the block means (softmax of scale * q . mean key); a block's
    relevance is the log of the largest share any voter gives it; zero rows do not vote."""
    torch.manual_seed(31)
    mem = LayerMemory(2, 8, IndexSpec("flat"), block_size=4)
    keys = torch.randn(2, 30, 8)  # 8 blocks, the last one partial (2 entries)
    mem.add(keys, keys.clone(), torch.arange(30))
    sel = torch.randn(2, 3, 5, 8)  # (KV, C, Q, D)
    sel[:, 1, :2] = 0.0  # two padding rows in chunk 1
    got = mem.block_relevance(sel, scale=0.5)
    assert got.shape == (2, 3, 8)
    for h in range(2):
        means = torch.stack([keys[h, b : b + 4].mean(0) for b in range(0, 30, 4)])  # (8, D)
        for c in range(3):
            rows = [q for q in sel[h, c] if q.abs().sum() > 0]
            share = torch.stack([torch.softmax(0.5 * (means @ q), -1) for q in rows])  # (Q', 8)
            torch.testing.assert_close(got[h, c], share.max(0).values.log(), atol=1e-5, rtol=1e-5)


def test_block_votes_keep_the_passage_one_query_reads():
    """One query reads block 3 sharply, seven others lean mildly to block 5: their sum picks
    block 5, the vote picks block 3 (the copy a chunk is reading)."""
    mem = LayerMemory(1, 4, IndexSpec("flat"), block_size=2)
    keys = torch.zeros(1, 16, 4)
    keys[0, 6:8, 0] = 3.0  # block 3
    keys[0, 10:12, 1] = 1.0  # block 5
    mem.add(keys, keys.clone(), torch.arange(16))
    voters = torch.zeros(1, 1, 8, 4)
    voters[0, 0, 0, 0] = 2.0
    voters[0, 0, 1:, 1] = 1.0
    summed = mem.retrieve_blocks(voters.sum(2), 1, 1.0)
    voted = mem.retrieve_blocks(voters, 1, 1.0)
    torch.testing.assert_close(summed.keys[0], keys[0, 10:12])
    torch.testing.assert_close(voted.keys[0], keys[0, 6:8])


def test_clamped_near_only_scores_the_near_suffix_alone():
    """Clamped, near blocks only (far_blocks 0): only the blocks within the trained context (the
    memory's last ones) are scored, so voters share their attention among those alone; the
    picks are the top near blocks by that relevance, read through their rotated keys (the raw
    keys are not gathered)."""
    torch.manual_seed(33)
    mem = LayerMemory(2, 8, IndexSpec("flat"), block_size=4, rotated=True)
    keys = torch.randn(2, 40, 8)  # 10 blocks
    mem.add(keys, keys.clone(), torch.arange(40), rotated_k=keys.flip(-1))
    sel = torch.randn(2, 2, 6, 16)  # (KV, C, Q, [fixed | true])
    near = torch.zeros(2, 10, dtype=torch.bool)
    near[0, 4:], near[1, 5:] = True, True  # chunk 1 sees one block less (it is later)
    got = mem.retrieve_blocks(sel, 3, 0.5, "clamped", near, far_blocks=0)
    assert got.keys is None and got.rkeys.shape == (4, 12, 8)
    rreps = keys.flip(-1).view(2, 10, 4, 8).mean(2)  # (KV, nb, D): means of the rotated keys
    reps = keys.view(2, 10, 4, 8).mean(2)  # of the raw keys: the fixed-distance score of a far block
    for h in range(2):
        for c in range(2):
            # blocks 4-9 (the suffix any chunk can read); chunk 1's block 4 is far: fixed-distance score
            logits = [torch.where(near[c, 4:], rreps[h, 4:] @ q[8:], reps[h, 4:] @ q[:8]) for q in sel[h, c]]
            share = torch.stack([torch.softmax(0.5 * x, -1) for x in logits])
            rel = share.max(0).values.log().masked_fill(~near[c, 4:], float("-inf"))
            want = (rel.topk(3).indices + 4).sort().values
            picked = torch.cat([keys.flip(-1)[h, 4 * b : 4 * b + 4] for b in want.tolist()])
            torch.testing.assert_close(got.rkeys[h * 2 + c], picked)
    full = mem.retrieve_blocks(sel, 3, 0.5, "clamped", near, far_blocks=-1)  # one budget: every block
    assert full.keys is not None


def test_vote_selectors_token_by_token_equal_one_call():
    """block_selectors with voters: chunk 0 (each token its own last n vectors, zero-padded) and
    later chunks (the previous chunk's last n) come out the same whether the tokens arrive in one
    call or one at a time (decoding)."""
    from memtx_cli.attention.blocks import block_selectors

    torch.manual_seed(32)
    qs = torch.randn(2, 3, 13, 4)  # (KV, Gs, T, D)
    whole = block_selectors(qs, torch.arange(13), 5, {}, votes=3)
    per_token = []
    for a, b, sel in whole:
        per_token += [sel[:, i : i + 1] if sel.shape[1] > 1 else sel for i in range(b - a)]
    state: dict = {}
    for t in range(13):
        ((a, b, sel),) = block_selectors(qs[:, :, t : t + 1], torch.tensor([t]), 5, state, votes=3)
        torch.testing.assert_close(sel, per_token[t])
    # chunk 0, token 1: its own and token 0's vectors, one zero row in front, per head
    want = torch.cat([torch.zeros(2, 3, 1, 4), qs[:, :, :2]], 2).reshape(2, 1, 9, 4)
    torch.testing.assert_close(per_token[1], want)
    # chunk 1 (tokens 5-9): the last 3 vectors of chunk 0 (tokens 2-4)
    torch.testing.assert_close(per_token[7], qs[:, :, 2:5].reshape(2, 1, 9, 4))


@pytest.mark.parametrize("positions", ["fixed", "clamped"])
def test_block_recall_of_every_block_is_one(tiny_model, positions):
    """bench recall's block row: reading every block holds every exact top-k memory and all of
    the memory's attention mass; a budget of one block per chunk holds less."""
    from types import SimpleNamespace

    from memtx_cli.tasks.recall import block_recall as _block_recall

    torch.manual_seed(41)
    ids = torch.randint(0, 300, (64,))
    lm = SimpleNamespace(model=tiny_model)
    kw = dict(retrieval="block", block_size=4, block_chunk=4, positions=positions, sinks=2, far_blocks=0)
    every, _ = _block_recall(lm, ids, cfg(blocks=1000, **kw), 5, lambda m: None)
    assert every["recall"] == pytest.approx(1.0) and every["attention_mass_read"] == pytest.approx(1.0, abs=1e-5)
    one, _ = _block_recall(lm, ids, cfg(blocks=1, **kw), 5, lambda m: None)
    assert one["recall"] < 0.9 and one["attention_mass_read"] < 0.99
    assert one["memories_read"] == 4 < one["memories_readable"] == every["memories_readable"] <= 64
    # Per-head budgets: a head counts only its own best blocks; every head at 1000 = every block.
    heads = ",".join(f"{i}.{h}:{n}" for i in range(3) for h, n in ((0, 1000), (1, 1)))
    both, _ = _block_recall(lm, ids, cfg(blocks=1, memory_heads=heads, **kw), 5, lambda m: None)
    assert one["recall"] < both["recall"] < every["recall"] and both["memories_read"] == 4 * (1000 + 1) / 2
    heads = ",".join(f"{i}.{h}:1000" for i in range(3) for h in range(2))
    all_of, _ = _block_recall(lm, ids, cfg(blocks=1, memory_heads=heads, **kw), 5, lambda m: None)
    assert all_of["recall"] == pytest.approx(1.0) and all_of["attention_mass_read"] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Exact block selection (--block-select)


def _voter_memory(keys: torch.Tensor, block: int = 4) -> LayerMemory:
    """A clamped block memory whose rotated keys are `keys` (KV, N, D) as given."""
    kv, n, d = keys.shape
    mem = LayerMemory(kv, d, IndexSpec("flat"), rotated=True, block_size=block)
    mem.add(keys, torch.randn(kv, n, d), torch.arange(n), rotated_k=keys)
    return mem


def test_exact_block_relevance_equals_a_reference():
    """log of the voters' summed softmax over the near blocks, each block scored by its best
    key's logit (exact, at the real distance); zero rows vote for nothing."""
    torch.manual_seed(51)
    kv, n, d, b = 2, 22, 8, 4  # a partial last block
    keys = torch.randn(kv, n, d) * 2
    mem = _voter_memory(keys, b)
    nb = mem.n_blocks
    sel = torch.randn(kv, 2, 3, 2 * d)  # (KV, C, Q, [fixed | true])
    sel[:, 1, 2] = 0  # chunk 1's third voter: none
    near = torch.ones(2, nb, dtype=torch.bool)
    near[1, :2] = False  # chunk 1 may not read blocks 0-1
    scale = 0.35
    got = mem.block_relevance(sel, "clamped", near, scale, 0, exact=True)
    want = torch.zeros(kv, 2, nb, dtype=torch.float64)
    for h in range(kv):
        for c in range(2):
            share = torch.zeros(nb, dtype=torch.float64)
            for q in range(3):
                v = sel[h, c, q, d:].double()
                if not v.any():
                    continue
                logit = keys[h].double() @ v * scale  # (n,)
                best = torch.stack([logit[j * b : (j + 1) * b].max() for j in range(nb)])
                share += torch.softmax(best.masked_fill(~near[c], float("-inf")), 0)
            want[h, c] = share.clamp_min(1e-30).log()
    on = near.expand(kv, -1, -1)
    torch.testing.assert_close(got[on].double(), want[on], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_exact_selection_finds_the_block_with_one_matching_key():
    """A block holding one key that matches the voter (and three opposed ones) has a low mean
    key; a block of middling keys has a higher one. The voter's attention is on the first:
    exact selection picks it, means selection does not."""
    d = 8
    e = torch.zeros(d)
    e[0] = 1.0
    keys = torch.zeros(1, 12, d)
    keys[0, 0] = 8 * e  # block 0: one strong match ...
    keys[0, 1:4] = -4 * e  # ... and three opposed keys: mean 1 * e
    keys[0, 4:8] = 2 * e  # block 1: middling keys, mean 2 * e
    keys[0, 8:12] = torch.randn(4, d) * 0.1  # block 2: noise
    mem = _voter_memory(keys)
    sel = torch.cat([torch.zeros(d), e]).view(1, 1, 1, 2 * d)
    near = torch.ones(1, 3, dtype=torch.bool)
    means = mem.block_relevance(sel, "clamped", near, 1.0, 0)
    exact = mem.block_relevance(sel, "clamped", near, 1.0, 0, exact=True)
    assert int(means[0, 0].argmax()) == 1 and int(exact[0, 0].argmax()) == 0


@pytest.mark.parametrize("far_blocks", [0, 1])
def test_exact_selection_stays_causal_and_decoding_agrees(tiny_model, far_blocks):
    """auto = exact with clamped voters and near blocks in their own budget; past the trained
    context (256) far blocks keep the means' score. Causal, and decoding equals scoring."""
    torch.manual_seed(52)
    ids = torch.randint(0, 300, (300,))
    kw = dict(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", sinks=2)
    c = cfg(block_votes=2, far_blocks=far_blocks, **kw)
    a, st = run_stream(tiny_model, ids, c)
    assert st.exact_select
    means, _ = run_stream(tiny_model, ids, dataclasses.replace(c, block_select="means"))
    assert not torch.equal(a, means)  # the selection differs somewhere
    changed = ids.clone()
    changed[280:] = torch.randint(0, 300, (20,))
    b, _ = run_stream(tiny_model, changed, c)
    assert torch.equal(a[:279], b[:279])
    seg = _logits_in_pieces(tiny_model, Streamer(tiny_model, c), ids, 0)
    dec = _logits_in_pieces(tiny_model, Streamer(tiny_model, c), ids, 5)
    torch.testing.assert_close(seg, dec, atol=1e-3, rtol=1e-4)


def test_exact_selection_reading_every_block_equals_means(tiny_model):
    """With a budget of every block the selection cannot matter."""
    torch.manual_seed(53)
    ids = torch.randint(0, 300, (96,))
    c = cfg(retrieval="block", block_size=4, blocks=1000, block_chunk=4, positions="clamped", sinks=2)
    c = dataclasses.replace(c, block_votes=2, far_blocks=0)
    a, _ = run_stream(tiny_model, ids, c)
    b, _ = run_stream(tiny_model, ids, dataclasses.replace(c, block_select="means"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_select="best"),
        dict(block_select="exact", positions="fixed", block_votes=2, far_blocks=0),
        dict(block_select="exact", positions="clamped", block_votes=0, far_blocks=0),
        dict(block_select="exact", positions="clamped", block_votes=2, far_blocks=-1),
    ],
)
def test_block_select_bad_settings(kw):
    with pytest.raises(MemtxError, match="block-select"):
        Config(retrieval="block", **kw)


def test_exact_relevance_is_reused_until_the_memory_changes():
    """Decoding asks for a chunk's blocks once per token with the same voters: the relevance
    is computed once, and again after new memories arrive."""
    torch.manual_seed(54)
    mem = _voter_memory(torch.randn(1, 14, 8))  # 4 blocks, the last partial
    calls = []
    real = mem._exact_relevance
    mem._exact_relevance = lambda *a: calls.append(1) or real(*a)
    sel = torch.randn(1, 1, 2, 16)
    near = torch.ones(1, mem.n_blocks, dtype=torch.bool)
    a = mem.block_relevance(sel, "clamped", near, 0.3, 0, exact=True)
    b = mem.block_relevance(sel.clone(), "clamped", near.clone(), 0.3, 0, exact=True)
    assert len(calls) == 1 and torch.equal(a, b)
    mem.block_relevance(sel + 1, "clamped", near, 0.3, 0, exact=True)
    assert len(calls) == 2
    k = torch.randn(1, 2, 8)
    mem.add(k, k, torch.arange(14, 16), rotated_k=k)  # fills the last block: same shapes
    mem.block_relevance(sel + 1, "clamped", near, 0.3, 0, exact=True)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cols", [64, 2048, 6])
def test_select_rows_equals_index_select(dtype, cols):
    from memtx_cli.memory.entries import select_rows

    x = torch.randn(50, cols).to(dtype)
    idx = torch.tensor([3, 0, 49, 3, 17])
    got = select_rows(x, idx)
    assert got.dtype == dtype and torch.equal(got, x.index_select(0, idx))
    odd = x[1:, 1:]  # an offset and a row width no whole 64-bit words fit: torch's own path
    few = torch.tensor([3, 0, 17])
    assert torch.equal(select_rows(odd, few), odd.index_select(0, few))


def test_near_only_memories_keep_no_raw_keys_and_read_the_same(tiny_model, monkeypatch):
    """Clamped near-only blocks with exact selection: layers without far reads keep no raw keys
    and no block means (LayerMemory near_only), the far layers keep them; the stream's logits
    equal those of memories that keep everything."""
    torch.manual_seed(42)
    ids = torch.randint(0, 300, (96,))
    c = cfg(retrieval="block", block_size=4, blocks=2, block_chunk=4, positions="clamped", block_votes=2)
    c = dataclasses.replace(c, far_blocks=0, far_top_k=3, far_bias=0.5, far_heads="1.0,1.1", block_select="exact")
    st = Streamer(tiny_model, c, expected_tokens=96)
    assert [m.keys is None for m in st.memories.values()] == [True, False, True]
    assert st.memories[0].reps is None and st.memories[0].rreps is None
    lean = _stream_with_horizon(tiny_model, ids, c, 20)
    monkeypatch.setattr(Streamer, "_near_only", lambda self, i: False)
    assert all(m.keys is not None for m in Streamer(tiny_model, c).memories.values())
    torch.testing.assert_close(lean, _stream_with_horizon(tiny_model, ids, c, 20), atol=0, rtol=0)


def test_ring_of_near_only_memories_reads_the_same(tiny_model):
    """A document longer than the ring: near-only memories keep only their last entries (a ring
    of ~context_length + a segment, ids wrapping around it) and the stream's logits equal those
    of memories that keep every entry (keep_all); the far layer keeps everything."""
    torch.manual_seed(43)
    ids = torch.randint(0, 300, (1600,))
    c = cfg(retrieval="block", block_size=32, blocks=3, block_chunk=32, positions="clamped", block_votes=2)
    c = dataclasses.replace(c, segment=64, far_blocks=0, far_top_k=4, far_heads="1.0", block_select="exact")

    def run(keep_all):
        st = Streamer(tiny_model, c, expected_tokens=len(ids), keep_all=keep_all)
        with torch.no_grad():
            hs = [st.step(ids[s : s + c.segment]) for s in range(0, len(ids), c.segment)]
        return st, tiny_model.logits(torch.cat(hs)[None])[0]

    st, ring = run(False)
    assert [m.ring for m in st.memories.values()] == [1024, 0, 1024] and st.memories[0].n > 1024
    assert st.memories[0].values.shape[1] == 1024 and st.memories[1].values.shape[1] >= 1600
    _, every = run(True)
    torch.testing.assert_close(ring, every, atol=0, rtol=0)


def test_ring_rows_wrap_around():
    """LayerMemory with a ring: entry i sits in slot i % capacity, _rows gives the wrapped span
    in two pieces in order, positions are kept for every entry, a write longer than the ring
    keeps its last entries."""
    mem = LayerMemory(1, 4, IndexSpec("flat"), rotated=True, block_size=4, capacity=4096, near_only=True, ring=1000)
    assert mem.capacity == 1024
    x = torch.arange(1500.0)[None, :, None].expand(1, 1500, 4)
    mem.add(x[:, :900], x[:, :900], torch.arange(900), x[:, :900])
    mem.add(x[:, 900:], x[:, 900:], torch.arange(900, 1500), x[:, 900:])
    assert mem.n == 1500 and torch.equal(mem.positions[:1500], torch.arange(1500))
    pieces = mem._rows(mem.rkeys, 1000, 1100)
    assert [i for i, _ in pieces] == [1000, 1024]
    assert torch.equal(torch.cat([p for _, p in pieces], 1)[0, :, 0], torch.arange(1000.0, 1100.0))
    mem.add(x[:, :1200], x[:, :1200], torch.arange(1500, 2700), x[:, :1200])  # longer than the ring
    assert mem.n == 2700 and mem.values[0, mem._slot(2699), 0] == 1199 and mem.values[0, mem._slot(1676), 0] == 176
