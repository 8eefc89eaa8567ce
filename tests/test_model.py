"""Exactness of the model and the streaming engine against naive reference computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

from memtx_cli.engine.stream import full_nll, stream_nll
from memtx_cli.model.llama import apply_rope, grouped_attention, local_bias, rope_cos_sin
from memtx_cli.model.loading import build_model
from memtx_cli.model.weights import _unpermute


def naive_logits(m, ids, allowed):
    """Per-head loops, absolute positions, an explicit (N, N) mask: no code shared with the fast path
    except RMSNorm and the RoPE tables."""
    a = m.args
    n = ids.shape[0]
    x = m.embed(ids)
    cos, sin = rope_cos_sin(m.inv_freq, torch.arange(n))
    g = a.n_heads // a.n_kv_heads
    for layer in m.layers:
        h = layer.attn_norm(x)
        qkv = h @ layer.attn.wqkv.weight.T
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        heads = []
        for hq in range(a.n_heads):
            kv = hq // g
            qh = apply_rope(q[:, hq * a.head_dim : (hq + 1) * a.head_dim], cos, sin)
            kh = apply_rope(k[:, kv * a.head_dim : (kv + 1) * a.head_dim], cos, sin)
            vh = v[:, kv * a.head_dim : (kv + 1) * a.head_dim]
            s = (qh @ kh.T) / math.sqrt(a.head_dim)
            s = s.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(s, -1) @ vh)
        x = x + torch.cat(heads, -1) @ layer.attn.wo.weight.T
        hf = layer.ffn_norm(x)
        gate, up = (hf @ layer.ffn.w13.weight.T).split(a.ffn_dim, -1)
        x = x + (F.silu(gate) * up) @ layer.ffn.w2.weight.T
    return m.norm(x) @ m.output_weight().T


def window_mask(n, segment, xl=True):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    start = (i // segment - (1 if xl else 0)).clamp(min=0) * segment
    return (j <= i) & (j >= start)


def nll_from_logits(logits, ids):
    return F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")


@pytest.mark.parametrize("segment,xl", [(16, True), (16, False), (7, True), (64, True)])
def test_streaming_equals_reference(tiny_model, segment, xl):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (57,))
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, window_mask(57, segment, xl)), ids)
    got = stream_nll(tiny_model, ids, segment, xl_cache=xl)
    assert got.shape == ref.shape == (56,)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_full_equals_causal_reference(tiny_model):
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (40,))
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    with torch.no_grad():
        ref = nll_from_logits(naive_logits(tiny_model, ids, causal), ids)
    torch.testing.assert_close(full_nll(tiny_model, ids, chunk=64).double(), ref, atol=2e-5, rtol=1e-5)
    # One segment holding the whole document is full attention too.
    torch.testing.assert_close(stream_nll(tiny_model, ids, 64).double(), ref, atol=2e-5, rtol=1e-5)


def test_full_with_context_before_chunks(tiny_model):
    """full_nll(before=b): each chunk is one causal pass over the b tokens before it and itself."""
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (57,))
    ref = []
    with torch.no_grad():
        for s in range(0, 57, 16):
            a = max(0, s - 16)
            x = ids[a : s + 17]  # + the next chunk's first token: the target of this chunk's last
            nll = nll_from_logits(naive_logits(tiny_model, x, torch.ones(len(x), len(x), dtype=torch.bool).tril()), x)
            ref.append(nll[s - a : s - a + 16])  # nll[i] is the loss of x[i + 1]
    ref = torch.cat(ref)
    got = full_nll(tiny_model, ids, 16, before=16)
    assert got.shape == ref.shape == (56,)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    # Without context before a chunk it is plain chunked full attention.
    torch.testing.assert_close(full_nll(tiny_model, ids, 16, before=0), full_nll(tiny_model, ids, 16))


def test_grouped_attention_equals_repeated_heads():
    torch.manual_seed(3)
    q = torch.randn(2, 6, 5, 8)
    k = torch.randn(2, 2, 9, 8)
    v = torch.randn(2, 2, 9, 8)
    mask = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4  # query i sits at key 4 + i
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(grouped_attention(q, k, v, local_bias(5, 9, q.dtype, q.device)), ref)
    causal_ref = F.scaled_dot_product_attention(
        q, k[:, :, :5].repeat_interleave(3, 1), v[:, :, :5].repeat_interleave(3, 1), is_causal=True
    )
    torch.testing.assert_close(grouped_attention(q, k[:, :, :5], v[:, :, :5], None), causal_ref)


def test_rope_is_relative():
    inv = build_model(tiny_args()).inv_freq
    torch.manual_seed(4)
    q, k = torch.randn(16), torch.randn(16)

    def dot(a, b):
        cq, sq = rope_cos_sin(inv, torch.tensor([a]))
        ck, sk = rope_cos_sin(inv, torch.tensor([b]))
        return float((apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum())

    assert dot(10, 3) == pytest.approx(dot(110, 103), abs=1e-4)


def test_unpermute_inverts_llamacpp_permute():
    """llama.cpp's convert_hf_to_gguf permute, copied as the reference for the layout."""

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(_unpermute(permute(w, 4), 4), w)
    assert not np.array_equal(permute(w, 4), w)


def test_bf16_close_to_f32(tiny_model):
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (50,))
    f32 = stream_nll(tiny_model, ids, 16).mean()
    bf = stream_nll(tiny_model.to(torch.bfloat16), ids, 16).mean()
    assert abs(float(bf) - float(f32)) / float(f32) < 0.02
