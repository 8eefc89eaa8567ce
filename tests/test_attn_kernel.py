"""attn_kernel: the bfloat16 AVX512-BF16 attention kernel against a float64 reference and torch's
flash kernel, its use in the model, and the fallback when it cannot be built."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args
from test_memory import cfg

from memtx_cli.attention.ops import attention_with_lse
from memtx_cli.engine.stream import Streamer, run_stream
from memtx_cli.kernels import attn as attn_kernel
from memtx_cli.kernels import build as kernel_build
from memtx_cli.kernels import linear as linear_kernel
from memtx_cli.model.llama import Linear, grouped_attention, local_bias
from memtx_cli.model.loading import build_model

needs_kernel = pytest.mark.skipif(attn_kernel.load() is None, reason="no AVX512-BF16 CPU or no C compiler")
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@pytest.fixture(autouse=True)
def kernel_everywhere(monkeypatch):
    """The model's paths use the kernel wherever it runs (MEMTX_KERNEL=1), not only where it
    times faster than torch's (on a CPU with AMX, torch's): so these tests reach it on any CPU."""
    monkeypatch.setenv("MEMTX_KERNEL", "1")


def reference(q, k, v, bias, scale, causal_t=0):
    """Float64 softmax attention and log-sum-exp of bfloat16 inputs; rows that see nothing: 0, -inf."""
    s = (q.double() @ k.double().transpose(1, 2)) * scale  # (B, M, S)
    if bias is not None:
        s = s + bias.double()[:, None]
    if causal_t:
        m, n = s.shape[1:]
        row = torch.arange(m)[:, None] % causal_t
        s = s.masked_fill(torch.arange(n)[None] > n - causal_t + row, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return w @ v.double(), lse


def inputs(b, m, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, m, 64, generator=g) * 2).bfloat16()  # sharp enough to not be uniform
    k, v = torch.randn(b, s, 64, generator=g).bfloat16(), torch.randn(b, s, 64, generator=g).bfloat16()
    return q, k, v


@needs_kernel
@pytest.mark.parametrize(
    "b,m,s,causal_t,with_bias",
    [(1, 1, 1, 0, False), (3, 7, 5, 0, False), (2, 70, 333, 0, True), (4, 192, 1000, 0, True), (3, 96, 200, 32, False)]
    + [(2, 3 * 512, 1024, 512, False), (1, 9, 600, 3, False), (2, 64, 17, 64, False)],
)
def test_kernel_equals_float64_reference_as_closely_as_flash(b, m, s, causal_t, with_bias):
    """Output within bfloat16 rounding of the float64 reference and no further from it than
    torch's flash kernel (+0.004); log-sum-exp to float32 rounding; masked keys get weight 0."""
    q, k, v = inputs(b, m, s)
    bias = None
    if with_bias:
        bias = torch.zeros(b, s)
        bias[:, ::7] = float("-inf")  # masked keys
        bias[1, : s // 2] = -2.0  # a prior
    got, lse = attn_kernel.attention(q, k, v, bias, 0.125, causal_t)
    ref, ref_lse = reference(q, k, v, bias, 0.125, causal_t)
    err = (got.double() - ref).abs().max().item()
    assert err < 0.02
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-6)
    mask = None
    if bias is not None:
        mask = bias[:, None].expand(b, m, s).bfloat16()[None]
    if causal_t:
        mask = local_bias(causal_t, s + 1, torch.bfloat16, q.device)[:, 1:].repeat(m // causal_t, 1)
    flash = FLASH(q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=0.125)[0][0]
    assert err <= (flash.double() - ref).abs().max().item() + 0.004


@needs_kernel
def test_rows_that_see_nothing_get_zero_and_minus_inf():
    q, k, v = inputs(2, 40, 50)
    bias = torch.zeros(2, 50)
    bias[0] = float("-inf")  # batch 0 sees no key
    got, lse = attn_kernel.attention(q, k, v, bias, 0.125)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and bool(torch.isneginf(lse[0]).all())
    ref, ref_lse = reference(q[1:], k[1:], v[1:], None, 0.125)
    assert (got[1].double() - ref[0]).abs().max().item() < 0.02


@needs_kernel
def test_no_keys_or_no_rows():
    q, k, v = inputs(2, 5, 0)
    out, lse = attn_kernel.attention(q, k, v, None, 0.125)
    assert torch.equal(out, torch.zeros(2, 5, 64, dtype=torch.bfloat16)) and bool(torch.isneginf(lse).all())
    assert attn_kernel.attention(q[:, :0], k, v, None, 0.125)[0].shape == (2, 0, 64)


@needs_kernel
def test_batch_strides_read_rows_of_a_larger_buffer():
    """Memory attention passes rows cut from a wider gather (km[rows, :span]): batch strides
    wider than the keys. Same result as contiguous copies, bit for bit."""
    q, k, v = inputs(3, 48, 300)
    kb = torch.randn(3, 400, 64).bfloat16()
    vb = torch.randn(3, 400, 64).bfloat16()
    kb[:, :300], vb[:, :300] = k, v
    wide = attn_kernel.attention(q, kb[:, :300], vb[:, :300], None, 0.125)
    tight = attn_kernel.attention(q, k, v, None, 0.125)
    assert torch.equal(wide[0], tight[0]) and torch.equal(wide[1], tight[1])


@needs_kernel
def test_the_kernel_is_preferred_by_timing_unless_told(monkeypatch):
    """MEMTX_KERNEL=1: always the kernel, 0: never; unset: the faster of the two on this CPU,
    timed once per process (the answer kept)."""
    assert attn_kernel.preferred("attention") and attn_kernel.preferred("block_max")
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    assert not attn_kernel.preferred("attention") and not attn_kernel.preferred("block_max")
    assert not attn_kernel.preferred("linear")
    monkeypatch.delenv("MEMTX_KERNEL")
    monkeypatch.setattr(attn_kernel, "_WINS", {})
    calls = []
    monkeypatch.setattr(attn_kernel, "_median_times", lambda fns: calls.append(len(fns)) or [1.0, 2.0])
    assert attn_kernel.preferred("attention") and attn_kernel.preferred("attention")
    monkeypatch.setattr(attn_kernel, "_median_times", lambda fns: calls.append(len(fns)) or [2.0, 1.0])
    assert not attn_kernel.preferred("block_max")
    assert calls == [2, 2] and attn_kernel._WINS == {"attention": True, "block_max": False}


@needs_kernel
def test_block_maxima_in_torch_equal_the_kernels():
    """block_max_torch (what runs where torch's matmul is the faster) gives the kernel's block
    maxima to bfloat16 rounding of the logits, the tail past n_valid -inf in both."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 128, 64, generator=g).bfloat16()
    voters = torch.randn(3, 20, 64, generator=g).bfloat16()
    ours = attn_kernel.block_max(keys, voters, 32, 70)
    theirs = attn_kernel.block_max_torch(keys, voters, 32, 70)
    assert bool(torch.isneginf(ours[:, 3]).all()) and bool(torch.isneginf(theirs[:, 3]).all())
    torch.testing.assert_close(theirs[:, :3], ours[:, :3], atol=0.1, rtol=0.01)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3])
def test_linear_equals_float64_reference_as_closely_as_torch(rows):
    """linear.c (decoding's x . W^T) against float64: as close as torch's bfloat16 product, with
    weights of a layer's shapes (row counts not a multiple of its 4-row tiles included)."""
    g = torch.Generator().manual_seed(5)
    for o, i in ((960, 576), (577, 576), (3, 1536)):
        w = (torch.randn(o, i, generator=g) * 0.05).bfloat16()
        x = torch.randn(1, rows, i, generator=g).bfloat16()
        ref = x.double() @ w.double().t()
        ours = linear_kernel.linear(x, w)
        assert ours is not None and ours.shape == (1, rows, o) and ours.dtype == torch.bfloat16
        err, torch_err = (ours.double() - ref).abs().max(), (F.linear(x, w).double() - ref).abs().max()
        assert err <= torch_err * 1.5 + 1e-6, (o, i, err, torch_err)


def test_linear_leaves_what_it_does_not_cover_to_torch(monkeypatch):
    """More rows than decoding feeds, float32, a row length not a multiple of 32: None (the
    caller's F.linear); the model's Linear gives F.linear's result either way."""
    w = torch.randn(64, 64).bfloat16()
    assert linear_kernel.linear(torch.randn(5, 64).bfloat16(), w) is None
    assert linear_kernel.linear(torch.randn(1, 64), w.float()) is None
    assert linear_kernel.linear(torch.randn(1, 48).bfloat16(), torch.randn(8, 48).bfloat16()) is None
    layer = Linear(64, 64, bias=False).bfloat16()
    x = torch.randn(1, 1, 64).bfloat16()
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    assert torch.equal(layer(x), F.linear(x, layer.weight))


@needs_kernel
def test_decoding_in_bfloat16_with_the_kernels_matches_scoring():
    """Token-by-token decoding of a bfloat16 model (linear.c for every one-row product, the
    rotated windows) gives scoring's NLL to bfloat16 rounding (mean within 0.5%)."""
    torch.manual_seed(0)
    m = build_model(tiny_args(dim=128, n_heads=2, n_kv_heads=1)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 300, (120,))
    c = cfg(retrieval="block", positions="clamped", block_size=4, blocks=3, block_chunk=8, segment=16)
    ref = run_stream(m, ids, c)[0].float()
    st = Streamer(m, c)
    with torch.inference_mode():
        h = torch.cat([st.feed(ids[i : i + 1]) for i in range(len(ids))])
        got = F.cross_entropy(m.logits(h[None])[0, :-1].float(), ids[1:], reduction="none")
    assert abs(got.mean().item() / ref.mean().item() - 1) < 0.005


@needs_kernel
def test_model_paths_agree_with_torchs_kernel(monkeypatch):
    """grouped_attention and attention_with_lse (causal, folded groups; per-row key bias) with the
    kernel and with MEMTX_KERNEL=0 (torch's kernels) agree to bfloat16 rounding."""
    q, k, v = inputs(3, 3 * 40, 100, seed=1)
    bias = torch.zeros(3, 1, 100, dtype=torch.bfloat16)
    bias[:, :, 60:] = float("-inf")
    qh = q.view(1, 9, 40, 64)  # (1, H, T, D), 3 heads per KV head
    fast = (
        grouped_attention(qh, k[None], v[None], local_bias(40, 100, q.dtype, q.device)),
        attention_with_lse(q[None], k[None], v[None], None, 0.125, causal_t=40),
        attention_with_lse(q[None], k[None], v[None], bias, 0.125),
    )
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    assert attn_kernel.attention(q, k, v, None, 0.125) is None
    slow = (
        grouped_attention(qh, k[None], v[None], local_bias(40, 100, q.dtype, q.device)),
        attention_with_lse(q[None], k[None], v[None], None, 0.125, causal_t=40),
        attention_with_lse(q[None], k[None], v[None], bias, 0.125),
    )
    assert (fast[0].float() - slow[0].float()).abs().max().item() < 0.03
    for (o1, l1), (o2, l2) in zip(fast[1:], slow[1:], strict=True):
        assert (o1.float() - o2.float()).abs().max().item() < 0.03
        torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_streaming_with_memory_in_bfloat16_matches_torchs_kernel(monkeypatch):
    """A bfloat16 model with head dim 64 streams with block memory: mean NLL with the kernel and
    with torch's kernel within 0.3% of each other, and both within 2% of float32."""
    torch.manual_seed(0)
    m = build_model(tiny_args(dim=128, n_heads=2, n_kv_heads=1)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    ids = torch.randint(0, 300, (200,))
    c = cfg(retrieval="block", positions="clamped", block_size=4, blocks=3, block_chunk=8, segment=16)
    f32 = run_stream(m, ids, c)[0].mean().item()
    m16 = m.to(torch.bfloat16)
    fast = run_stream(m16, ids, c)[0].mean().item()
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    slow = run_stream(m16, ids, c)[0].mean().item()
    assert abs(fast / slow - 1) < 0.003
    assert abs(fast / f32 - 1) < 0.02 and abs(slow / f32 - 1) < 0.02


@needs_kernel
@pytest.mark.parametrize("causal_t", [0, 40])
def test_attention_continues_from_an_initial_state(monkeypatch, causal_t):
    """init = the attention over other keys (output, lse): the kernel's result is the attention
    over both key sets (the lse merge inside its online softmax), within bfloat16 rounding of
    float64; rows with init lse -inf are plain attention. torch's path (merge_lse) agrees."""
    q, k, v = inputs(3, 120, 100, seed=5)
    k1, v1 = inputs(3, 1, 70, seed=6)[1:]  # the other keys
    o1, l1 = reference(q, k1, v1, None, 0.125)
    l1[:, :7] = float("-inf")  # rows without other keys
    o1[:, :7] = 0
    got, lse = attn_kernel.attention(q, k, v, None, 0.125, causal_t, init=(o1.bfloat16(), l1.float()))
    o2, l2 = reference(q, k, v, None, 0.125, causal_t)
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    want = (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None]
    assert (got.double() - want).abs().max().item() < 0.02
    torch.testing.assert_close(lse.double(), top + torch.log(w1 + w2), atol=2e-5, rtol=1e-6)
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    slow, slow_lse = attention_with_lse(q[None], k[None], v[None], None, 0.125, causal_t, (o1.bfloat16(), l1.float()))
    assert (slow.double() - want).abs().max().item() < 0.03
    torch.testing.assert_close(slow_lse.double(), lse.double(), atol=1e-4, rtol=1e-5)


def test_an_initial_state_that_needs_a_gradient_gets_one():
    """The kernel has no backward: an init that requires grad (a trained joint bias on the
    memory's lse) goes through torch's path, and the gradient reaches it."""
    q, k, v = inputs(2, 16, 30, seed=7)
    lse0 = torch.zeros(2, 16, requires_grad=True)
    out, _ = attention_with_lse(q[None], k[None], v[None], None, 0.125, 0, (torch.ones(2, 16, 64).bfloat16(), lse0))
    out.float().sum().backward()
    assert lse0.grad is not None and lse0.grad.abs().sum() > 0


@needs_kernel
def test_block_attention_reads_blocks_in_place():
    """attn_kernel.block_attention over blocks of a (KV, cap, 64) buffer equals float64 attention
    over the gathered blocks: the last block's tail past n_valid and blocks not ok are masked; a
    row with nothing valid gets 0 and -inf. Block sizes other than multiples of 32: None."""
    g = torch.Generator().manual_seed(41)
    kb, vb = torch.randn(3, 2048, 64, generator=g).bfloat16(), torch.randn(3, 2048, 64, generator=g).bfloat16()
    heads, blocks = torch.tensor([0, 0, 1, 2, 2]), torch.randint(0, 50, (5, 4), generator=g)
    blocks[0, 1], n_valid = 49, 49 * 32 + 10  # a partly written last block
    ok = torch.rand(5, 4, generator=g) > 0.3
    ok[4] = False
    q = (torch.randn(5, 70, 64, generator=g) * 2).bfloat16()
    out, lse = attn_kernel.block_attention(q, kb, vb, heads, blocks, ok, 32, n_valid, 0.125)
    ids = (blocks[..., None] * 32 + torch.arange(32)).reshape(5, -1)
    bias = torch.zeros(ids.shape).masked_fill(~((ids < n_valid) & ok.repeat_interleave(32, -1)), float("-inf"))
    ref, ref_lse = reference(q, kb[heads[:, None], ids], vb[heads[:, None], ids], bias, 0.125)
    assert (out[:4].double() - ref[:4]).abs().max().item() < 0.02
    torch.testing.assert_close(lse[:4].double(), ref_lse[:4], atol=2e-5, rtol=1e-6)
    assert not out[4].any() and torch.isneginf(lse[4]).all()
    assert attn_kernel.block_attention(q, kb, vb, heads, blocks, ok, 16, n_valid, 0.125) is None


@needs_kernel
def test_block_attention_reads_a_ring():
    """ring > 0: block id i reads slot i % (ring / block) of the buffers, while validity (n_valid)
    goes by the id: the same as reading a buffer that keeps every block."""
    g = torch.Generator().manual_seed(44)
    kb, vb = torch.randn(2, 2048, 64, generator=g).bfloat16(), torch.randn(2, 2048, 64, generator=g).bfloat16()
    blocks = torch.randint(64, 130, (4, 5), generator=g)  # ids past the ring's 64 blocks
    blocks[0, 0], n_valid = 129, 129 * 32 + 5
    heads, q = torch.tensor([0, 1, 1, 0]), (torch.randn(4, 50, 64, generator=g) * 2).bfloat16()
    got = attn_kernel.block_attention(q, kb, vb, heads, blocks, None, 32, n_valid, 0.125, ring=2048)
    ids = (blocks[..., None] * 32 + torch.arange(32)).reshape(4, -1)
    bias = torch.zeros(ids.shape).masked_fill(ids >= n_valid, float("-inf"))
    ref, ref_lse = reference(q, kb[heads[:, None], ids % 2048], vb[heads[:, None], ids % 2048], bias, 0.125)
    assert (got[0].double() - ref).abs().max().item() < 0.02
    torch.testing.assert_close(got[1].double(), ref_lse, atol=2e-5, rtol=1e-6)


@needs_kernel
def test_streaming_with_block_budgets_and_far_reads_matches_torchs_kernel(monkeypatch):
    """The card's kind of settings (near-only clamped blocks of 32 with per-head budgets, far reads
    token by token) on a bfloat16 model with head dim 64: blocks read in place and the fused far
    reads give the NLL torch's kernels give (gathered blocks, retrieve_far), within 0.3%."""
    from test_memory import _stream_with_horizon

    torch.manual_seed(1)
    m = build_model(tiny_args(dim=128, n_heads=2, n_kv_heads=1, context_length=4096)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    m = m.to(torch.bfloat16)
    ids = torch.randint(0, 300, (640,))
    c = cfg(retrieval="block", positions="clamped", block_size=32, blocks=4, block_chunk=32, segment=64)
    c = dataclasses.replace(c, memory_heads="0.0:4,1.0:2,2.0:3", far_blocks=0, far_top_k=8, far_heads="1.0,2.0")
    calls = {"block_attention": 0, "far_attention": 0}
    for name in calls:
        real = getattr(attn_kernel, name)

        def counted(*a, name=name, real=real, **k):
            calls[name] += 1
            return real(*a, **k)

        monkeypatch.setattr(attn_kernel, name, counted)
    with torch.no_grad():
        fast = torch.log_softmax(_stream_with_horizon(m, ids, c, 200).float(), -1)
    assert calls["block_attention"] > 0 and calls["far_attention"] > 0
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    with torch.no_grad():
        slow = torch.log_softmax(_stream_with_horizon(m, ids, c, 200).float(), -1)
    nll = [-x[:-1].gather(1, ids[1:, None]).mean().item() for x in (fast, slow)]
    assert abs(nll[0] / nll[1] - 1) < 0.003


def test_without_a_compiler_torchs_kernel_runs(monkeypatch, tmp_path):
    """No C compiler: load() gives None once, attention() None, and the model still attends."""
    monkeypatch.setattr(kernel_build, "_lib", None)
    monkeypatch.setattr(kernel_build, "_tried", False)
    monkeypatch.setenv("MEMTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert attn_kernel.load() is None
    q, k, v = inputs(1, 24, 30)
    assert attn_kernel.attention(q, k, v, None, 0.125) is None
    out = grouped_attention(q.view(1, 3, 8, 64), k[None], v[None], local_bias(8, 30, q.dtype, q.device))
    ref, _ = reference(q, k, v, None, 1 / math.sqrt(64), causal_t=8)
    assert (out.reshape(1, 24, 64).double() - ref).abs().max().item() < 0.03
    assert not any(tmp_path.rglob("*.so"))  # nothing half-written left in the cache


@needs_kernel
@pytest.mark.parametrize("no_cache", [False, True])
def test_compiled_once_into_the_cache_or_a_temporary_directory(monkeypatch, tmp_path, no_cache):
    """A fresh cache gets one library named by the source's hash, reused by the next process;
    MEMTX_NO_CACHE=1 writes nothing there. Either library computes the same attention."""
    monkeypatch.setenv("MEMTX_CACHE_DIR", str(tmp_path))
    if no_cache:
        monkeypatch.setenv("MEMTX_NO_CACHE", "1")
    q, k, v = inputs(2, 40, 70)
    want = attn_kernel.attention(q, k, v, None, 0.125)
    monkeypatch.setattr(kernel_build, "_lib", None)
    monkeypatch.setattr(kernel_build, "_tried", False)
    got = attn_kernel.attention(q, k, v, None, 0.125)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    built = sorted(p.name for p in tmp_path.rglob("*.so"))
    assert built == ([] if no_cache else [built[0]]) and all(n.startswith("attn_kernel-") for n in built)


@needs_kernel
def test_block_max_equals_float64_reference():
    """Each block's best logit per voter, float32 products of bfloat16 inputs: to 1e-5 of float64;
    keys from n_valid on are not scored (a partial block, and a block with none: -inf)."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 160, 64, generator=g).bfloat16()
    voters = (torch.randn(2, 37, 64, generator=g) * 0.3).bfloat16()
    wide = torch.zeros(2, 200, 64, dtype=torch.bfloat16)  # heads further apart than their keys
    wide[:, :160] = keys
    got = attn_kernel.block_max(wide[:, :128], voters, 32, 70)  # blocks 0-1 whole, 2 partial, 3 empty
    logits = keys[:, :128].double() @ voters.double().transpose(1, 2)  # (KV, 128, Qn)
    logits[:, 70:] = float("-inf")
    want = logits.view(2, 4, 32, 37).amax(2)
    assert got.shape == (2, 4, 37) and bool(torch.isneginf(got[:, 3]).all())
    torch.testing.assert_close(got[:, :3].double(), want[:, :3], atol=1e-5, rtol=1e-5)


@needs_kernel
def test_exact_block_relevance_in_bfloat16_uses_float32_logits(monkeypatch):
    """A bfloat16 memory's exact block selection with the kernel: the reference relevance of its
    bfloat16 keys and voters to 1e-4; torch's path (bfloat16 logits) is within 0.05 of it."""
    from memtx_cli.memory.index import IndexSpec
    from memtx_cli.memory.store import LayerMemory

    torch.manual_seed(52)
    kv, n, d, b = 3, 300, 64, 32  # a partial last block
    keys = torch.randn(kv, n, d).bfloat16()
    mem = LayerMemory(kv, d, IndexSpec("flat"), dtype=torch.bfloat16, rotated=True, block_size=b)
    mem.add(keys, torch.randn(kv, n, d).bfloat16(), torch.arange(n), rotated_k=keys)
    nb = mem.n_blocks
    sel = torch.randn(kv, 2, 4, 2 * d)  # (KV, C, Q, [fixed | true])
    near = torch.ones(2, nb, dtype=torch.bool)
    near[1, :3] = False
    scale = 0.125
    got = mem.block_relevance(sel, "clamped", near, scale, 0, exact=True)
    v = sel[..., d:].mul(scale).bfloat16().double()  # the voters as the kernel reads them
    logit = torch.einsum("hnd,hcqd->hcqn", keys.double(), v)
    logit = torch.nn.functional.pad(logit, (0, nb * b - n), value=float("-inf"))
    best = logit.view(kv, 2, 4, nb, b).amax(-1).masked_fill(~near[None, :, None], float("-inf"))
    want = torch.softmax(best, -1).sum(2).clamp_min(1e-30).log()  # (KV, C, nb)
    on = near.expand(kv, -1, -1)
    torch.testing.assert_close(got[on].double(), want[on], atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("MEMTX_KERNEL", "0")
    slow = mem.block_relevance(sel, "clamped", near, scale, 0, exact=True)
    assert (slow[on].double() - want[on]).abs().max().item() < 0.05


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 32), (40, 32), (64, 32), (65, 32), (3001, 32), (3001, 7)])
def test_far_attention_equals_float64_reference(n, k):
    """Each query's own top k rows below its own bound (0; under k; under 2k, where the search is
    exact; beyond, where a bfloat16 shortlist of 2k is rescored) are the float64 top k of its
    float32 search vector, and the G heads' attention over them (scale, bias) matches float64;
    a query with no rows gets out 0, lse -inf and ids -1. 45 queries: not a multiple of 32."""
    g = torch.Generator().manual_seed(n + k)
    keys, values = torch.randn(n, 64, generator=g).bfloat16(), torch.randn(n, 64, generator=g).bfloat16()
    t = 45
    qs, qa = torch.randn(t, 64, generator=g), (torch.randn(3, t, 64, generator=g) * 2).bfloat16()
    bound = torch.randint(0, n + 1, (t,), generator=g)
    bound[:3] = torch.tensor([0, min(n, k - 1), min(n, 2 * k - 1)])
    out, lse, ids = attn_kernel.far_attention(keys, values, qs, qa, bound, k, 0.125, 1.5, with_ids=True)
    assert out.shape == (3, t, 64) and lse.shape == (3, t) and ids.shape == (t, k)
    for i in range(t):
        b = int(bound[i])
        want = (keys[:b].double() @ qs[i].double()).topk(min(k, b)).indices
        assert ids[i, : len(want)].tolist() == want.tolist()  # best first
        assert (ids[i, len(want) :] == -1).all()
        if b == 0:
            assert not out[:, i].any() and torch.isneginf(lse[:, i]).all()
            continue
        s = qa[:, i].double() @ keys[want].double().t() * 0.125 - 1.5  # (G, k)
        torch.testing.assert_close(lse[:, i].double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-6)
        ref = torch.softmax(s, -1) @ values[want].double()
        torch.testing.assert_close(out[:, i].double(), ref, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("n,pages", [(1, 4), (200, 4), (200, 64), (3001, 8)])
def test_far_attention_over_pages_equals_float64_reference(n, pages):
    """Pages: each run of 32 queries searches the union of its queries' `pages` best blocks of
    32 by the Quest bound sum_c max(q_c min_c, q_c max_c) (all of a query's blocks when it has
    no more); each query's top k keys within that union (below its own bound) by float64
    score, best first, and the G heads' attention over them."""
    g = torch.Generator().manual_seed(n + pages)
    keys, values = torch.randn(n, 64, generator=g).bfloat16(), torch.randn(n, 64, generator=g).bfloat16()
    nb, bs, k, t = -(-n // 32), 32, 8, 45
    kf = torch.cat([keys.float(), torch.full((nb * bs - n, 64), float("nan"))]).view(nb, bs, 64)
    kmin, kmax = kf.nan_to_num(float("inf")).amin(1), kf.nan_to_num(float("-inf")).amax(1)
    qs, qa = torch.randn(t, 64, generator=g), (torch.randn(3, t, 64, generator=g) * 2).bfloat16()
    bound = torch.randint(n // 2, n + 1, (t,), generator=g)
    bound[1] = 0
    paged = (kmin, kmax, bs, pages)
    out, lse, ids = attn_kernel.far_attention(keys, values, qs, qa, bound, k, 0.125, 1.5, True, pages=paged)
    for i in range(t):
        b = int(bound[i])
        if b == 0:
            assert (ids[i] == -1).all() and torch.isneginf(lse[:, i]).all()
            continue
        union = set()
        for j in range(i // 32 * 32, min(t, i // 32 * 32 + 32)):
            nbj = -(-int(bound[j]) // bs)
            q = qs[j].double()
            ub = (q.clamp(min=0) * kmax[:nbj].double() + q.clamp(max=0) * kmin[:nbj].double()).sum(-1)
            union |= set(ub.topk(min(pages, nbj)).indices.tolist())
        cand = torch.tensor(sorted(union))
        cand = (cand[:, None] * bs + torch.arange(bs)).reshape(-1)
        cand = cand[cand < b]
        want = cand[(keys[cand].double() @ qs[i].double()).topk(min(k, len(cand))).indices]
        assert ids[i, : len(want)].tolist() == want.tolist()
        s = qa[:, i].double() @ keys[want].double().t() * 0.125 - 1.5
        torch.testing.assert_close(lse[:, i].double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-6)
        ref = torch.softmax(s, -1) @ values[want].double()
        torch.testing.assert_close(out[:, i].double(), ref, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_far_attention_with_many_equal_scores():
    """A document that repeats itself gives many keys one score: the scan's cheap cut (bisection
    on the values) cannot bring its candidates near 2k and falls back to an exact selection.
    Half the keys are one row repeated (every other key), half random; the first 16 queries
    point at the repeated row, the others anywhere (a query's overflow would land in the next
    one's candidates). The k keys each query reads carry its k best scores, and the attention
    matches float64."""
    g = torch.Generator().manual_seed(7)
    n, t, k = 2000, 32, 32
    keys = torch.randn(n, 64, generator=g)
    row = torch.randn(64, generator=g)
    keys[::2] = row
    keys = keys.bfloat16()
    values = torch.randn(n, 64, generator=g).bfloat16()
    qs = torch.randn(t, 64, generator=g)
    qs[:16] += 3 * row
    qa = torch.randn(3, t, 64, generator=g).bfloat16()
    bound = torch.full((t,), n)
    out, lse, ids = attn_kernel.far_attention(keys, values, qs, qa, bound, k, 0.125, 0.0, with_ids=True)
    for i in range(t):
        s = keys.double() @ qs[i].double()
        assert (ids[i] >= 0).all() and len(set(ids[i].tolist())) == k
        torch.testing.assert_close(s[ids[i]].sort().values, s.topk(k).values.sort().values)
        sa = qa[:, i].double() @ keys[ids[i]].double().t() * 0.125
        torch.testing.assert_close(lse[:, i].double(), torch.logsumexp(sa, -1), atol=1e-5, rtol=1e-6)
        ref = torch.softmax(sa, -1) @ values[ids[i]].double()
        torch.testing.assert_close(out[:, i].double(), ref, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_far_attention_agrees_with_the_torch_path():
    """LayerMemory.far_attention (the kernel, one call per head, a bound per token) and
    model.far_reads (retrieve_far per chunk, then attention in torch) agree to bfloat16
    rounding on a bfloat16 memory, for the heads asked for."""
    from types import SimpleNamespace

    from memtx_cli.attention.far import far_reads
    from memtx_cli.memory.index import IndexSpec
    from memtx_cli.memory.store import LayerMemory

    torch.manual_seed(40)
    mem = LayerMemory(3, 64, IndexSpec("flat"), dtype=torch.bfloat16, block_size=32)
    n = 5000
    mem.add(torch.randn(3, n, 64), torch.randn(3, n, 64), torch.arange(n))
    t, rows = 128, [2, 0]
    qs = torch.randn(2, t, 64).bfloat16().float()
    qa = (torch.randn(2, 3, t, 64) * 2).bfloat16()
    chunk_of = torch.arange(t) // 32
    bound = torch.tensor([0, 40, 2000, 4960])[chunk_of]  # a bound per chunk, as the model draws them
    fast = mem.far_attention(qs, qa, bound, 32, 0.125, 2.0, rows)
    read = SimpleNamespace(memory=mem, far_top_k=32, far_bias=2.0, far_row_bias=None, far_bank=False, far_pages=0)
    slow = far_reads(qs, qa, bound, chunk_of, read, 0.125, rows)
    assert fast[0].dtype == torch.bfloat16
    assert (fast[0].float() - slow[0].float()).abs().max().item() < 0.03
    torch.testing.assert_close(fast[1], slow[1], atol=0.05, rtol=0.01)
    assert torch.isneginf(fast[1][:, :, :32]).all() and not fast[0][:, :, :32].any()


@needs_kernel
@pytest.mark.parametrize("ring", [0, 2048])
def test_near_picks_equal_the_torch_path(ring, monkeypatch):
    """Clamped near-only exact selection with budgets (the default path): block_max + block_pick
    pick what the torch path's relevance ranks best (softmax per voter over the chunk's near
    blocks, summed, log, spread, top m), in its order up to float rounding, with zero voter
    rows, a chunk without voters (every near block at the floor: ties, to the later block),
    chunks that see fewer near blocks, a wrapped ring (two pieces of keys) and a budget larger
    than the near blocks (-inf picks, not ok)."""
    from memtx_cli.memory.blocks import spread_forward
    from memtx_cli.memory.index import IndexSpec
    from memtx_cli.memory.store import LayerMemory

    g = torch.Generator().manual_seed(ring + 5)
    n = 3000
    kw = {"near_only": True, "ring": ring} if ring else {}
    mem = LayerMemory(3, 64, IndexSpec("flat"), dtype=torch.bfloat16, block_size=32, rotated=True, **kw)
    keys = torch.randn(3, n, 64, generator=g)
    for a in range(0, n, 500):  # in steps, so a ring wraps
        mem.add(keys[:, a : a + 500], keys[:, a : a + 500], torch.arange(a, a + 500), rotated_k=keys[:, a : a + 500])
    nb = mem.n_blocks
    sel = torch.randn(3, 4, 6, 128, generator=g)  # (KV, C, Q, [fixed | true])
    sel[0, 1, 2] = 0.0  # not a voter
    sel[1, 2] = 0.0  # a chunk without voters in head 1
    near = torch.zeros(4, nb, dtype=torch.bool)
    for c, first_near in enumerate([nb - 40, nb - 40, nb - 39, nb - 3]):
        near[c, first_near:] = True
    first = nb - 40
    for spread, m in [(0, 48), (2, 48), (2, 20)]:  # m: the layer's largest budget
        budgets = torch.tensor([8, m // 2, m])
        fast = mem.retrieve_blocks(sel, m, 0.125, "clamped", near, spread, 0, exact=True, budgets=budgets, gather=False)
        with monkeypatch.context() as mp:
            mp.setattr(attn_kernel, "enabled", lambda: False)
            mem._pick_cache = None  # not the kernel's picks from the cache
            slow = mem.retrieve_blocks(
                sel, m, 0.125, "clamped", near, spread, 0, exact=True, budgets=budgets, gather=False
            )
        # the torch path's relevance from the kernel's block maxima (torch alone rounds logits to bfloat16)
        mem._exact_cache = None
        rel = mem.block_relevance(sel, "clamped", near[:, first:], 0.125, first, exact=True, far_means=False)
        rel = spread_forward(rel.masked_fill(~near[None, :, first:], float("-inf")), spread)  # (KV, C, 40)
        mm = min(m, 40)  # of the 40 blocks scored
        assert fast.pick.shape == slow.pick.shape == (3, 4, mm)
        assert torch.equal(fast.ok, slow.ok) and fast.ok[0, 3].sum() == 3 and fast.ok[1, 2].sum() == mm - (m > 40)
        assert torch.equal(fast.pick[1, 2], slow.pick[1, 2])  # all at the floor: the latest first
        got = rel.gather(-1, fast.pick - first)
        want = rel.sort(-1, descending=True).values[..., :mm]
        finite = want > float("-inf")
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)
        assert (got[~finite] == float("-inf")).all()
        # decoding asks again per token with the same voters: the same picks, from the cache,
        # until the memory grows
        again = [
            mem.retrieve_blocks(sel, m, 0.125, "clamped", near, spread, 0, exact=True, budgets=budgets, gather=False)
            for _ in range(2)
        ]
        assert torch.equal(again[0].pick, fast.pick) and again[1].pick is again[0].pick
    mem.add(keys[:, :32], keys[:, :32], torch.arange(n, n + 32), rotated_k=keys[:, :32])
    assert mem._pick_cache is None


@needs_kernel
@pytest.mark.parametrize("ring", [0, 4096])
def test_packed_blocks_read_as_the_rows(ring):
    """LayerMemory(packed=...) keeps the last blocks packed in the kernel's layout (updated as
    entries arrive, partial blocks included, wrapping a ring); block_attention reading them gives
    exactly what packing the rows per call gives, and picks older than the packed copies fall
    back to the rows."""
    from memtx_cli.memory.index import IndexSpec
    from memtx_cli.memory.store import LayerMemory

    g = torch.Generator().manual_seed(ring + 11)
    kw = {"near_only": True, "ring": ring} if ring else {}
    args = (3, 64, IndexSpec("flat"), torch.bfloat16, "cpu", True, 32, 1024)
    packed, plain = LayerMemory(*args, packed=2048, **kw), LayerMemory(*args, **kw)
    n = 0
    for t in [100, 412, 37, 600, 1500, 3000, 250]:  # partial blocks; the packed ring (64 blocks) wraps
        k, v = torch.randn(3, t, 64, generator=g), torch.randn(3, t, 64, generator=g)
        for mem in (packed, plain):
            mem.add(k, v, torch.arange(n, n + t), rotated_k=k * 0.5)
        n += t
        nb = packed.n_blocks
        q = torch.randn(6, 96, 64, generator=g).bfloat16()
        pick = torch.randint(nb - min(nb, 60), nb, (3, 2, 8), generator=g)  # the last 60 blocks
        ok = torch.rand(3, 2, 8, generator=g) > 0.2
        a = packed.block_attention(q, pick, ok, 0, True, 0.125)
        b = plain.block_attention(q, pick, ok, 0, True, 0.125)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        ref = plain.gather_blocks(pick, False, ok=ok)  # the rows, gathered: torch's attention
        s = (q.double() @ ref.rkeys.double().transpose(1, 2)) * 0.125
        s = s.masked_fill(~ref.valid[:, None], float("-inf"))
        torch.testing.assert_close(a[1].double(), torch.logsumexp(s, -1), atol=2e-3, rtol=1e-3)
    old = torch.zeros(3, 2, 8, dtype=torch.long)  # block 0: long out of the packed copies
    if not ring:
        a = packed.block_attention(q, old, None, 0, True, 0.125)
        b = plain.block_attention(q, old, None, 0, True, 0.125)
        assert torch.equal(a[0], b[0])


@needs_kernel
def test_block_pick_leaves_many_voters_to_torch():
    """More than 16 voters per chunk (e.g. --block-votes 8 with 3 query heads) do not fit the
    kernel's vector: block_pick returns None (no error) and retrieve_blocks takes torch's path."""
    from memtx_cli.memory.index import IndexSpec
    from memtx_cli.memory.store import LayerMemory

    g = torch.Generator().manual_seed(3)
    mem = LayerMemory(2, 64, IndexSpec("flat"), dtype=torch.bfloat16, block_size=32, rotated=True, near_only=True)
    k = torch.randn(2, 640, 64, generator=g)
    mem.add(k, k, torch.arange(640), rotated_k=k)
    sel = torch.randn(2, 2, 24, 128, generator=g)  # 24 voters per chunk
    near = torch.ones(2, mem.n_blocks, dtype=torch.bool)
    best = torch.zeros(2, mem.n_blocks, 48)
    assert attn_kernel.block_pick(best, near, torch.ones(2, 48, 64, dtype=torch.bfloat16), 0, 2, 4, 0) is None
    got = mem.retrieve_blocks(
        sel, 4, 0.125, "clamped", near, 2, 0, exact=True, budgets=torch.tensor([4, 2]), gather=False
    )
    assert got.pick.shape == (2, 2, 4) and got.ok.all()
