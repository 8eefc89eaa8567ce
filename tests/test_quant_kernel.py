"""quant.c: decoding's products from a GGUF file's Q4_1 / Q8_0 blocks, against a float64
reference and F.linear, the real model's blocks against its float32 weights, and the fallback."""

import pytest
import torch
import torch.nn.functional as F

from memtx_cli.kernels import quant
from memtx_cli.kernels.build import load_portable
from memtx_cli.model.llama import Linear

needs_kernel = pytest.mark.skipif(load_portable() is None, reason="no AVX2 CPU or no C compiler")


def random_blocks(kind: str, o: int, i: int, seed: int = 0) -> quant.Blocks:
    """Random codes with float16 scales (and minima), laid out as a GGUF file stores them."""
    g = torch.Generator().manual_seed(seed)
    nb, size = i // quant.BLOCK, quant.BLOCK_BYTES[kind]
    raw = torch.randint(0, 256, (o, nb, size), dtype=torch.uint8, generator=g)
    scales = (torch.randn(o, nb, 2 if kind == "q4_1" else 1, generator=g) * 0.05).half()  # d (and m)
    raw[..., : scales.shape[-1] * 2] = scales.view(torch.uint8).reshape(o, nb, -1)
    return quant.from_blocks(kind, raw.reshape(o, -1))


def test_blocks_decode_as_gguf_does():
    """dequantize follows GGUF's layouts: Q4_1's low nibbles are a block's first 16 weights."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    for kind, qt in (("q4_1", gguf.GGMLQuantizationType.Q4_1), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        g = torch.Generator().manual_seed(3)
        raw = torch.randint(0, 256, (6, 2, quant.BLOCK_BYTES[kind]), dtype=torch.uint8, generator=g)
        scales = (torch.randn(6, 2, 2 if kind == "q4_1" else 1, generator=g) * 0.05).half()
        raw[..., : scales.shape[-1] * 2] = scales.view(torch.uint8).reshape(6, 2, -1)
        b = quant.from_blocks(kind, raw.reshape(6, -1))
        ref = torch.from_numpy(dequantize(raw.reshape(6, -1).numpy(), qt).reshape(6, 64).astype("float32"))
        assert torch.equal(b.dequantize(), ref)


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3])
def test_quant_linear_equals_float64_reference_as_closely_as_torch(kind, rows):
    b = random_blocks(kind, 1000, 576)
    w = b.dequantize()
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w.double().t()
    ours = quant.linear_unchecked(x, b)
    err, torch_err = (ours.double() - ref).abs().max(), (F.linear(x, w).double() - ref).abs().max()
    assert err <= 2 * torch_err + 1e-6 * ref.abs().max()


@needs_kernel
def test_linear_uses_the_blocks_for_a_few_float32_rows_only(monkeypatch):
    monkeypatch.setenv("MEMTX_KERNEL", "1")
    b = random_blocks("q4_1", 64, 96)
    layer = Linear(96, 64, bias=True)
    with torch.no_grad():
        layer.weight.copy_(b.dequantize())
    layer.blocks = b
    with torch.inference_mode():
        x = torch.randn(1, 1, 96)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        assert quant.linear(x, b) is not None
        assert quant.linear(torch.randn(5, 96), b) is None  # a prompt: torch's GEMM
        assert quant.linear(x.bfloat16(), b) is None  # the blocks hold float32 weights
        assert quant.linear(torch.randn(1, 64), b) is None  # another matrix's width
        monkeypatch.setenv("MEMTX_KERNEL", "0")
        assert quant.linear(x, b) is None
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_real_model_blocks_are_its_float32_weights(real_lm):
    """The loader keeps the GGUF file's Q4_1 matrices (every linear layer) and its Q8_0 embedding
    (the tied head); each dequantizes bit for bit to the float32 weights the model scores with."""
    m = real_lm.model
    layers = [mod for mod in m.modules() if isinstance(mod, Linear) and mod.blocks is not None]
    assert len(layers) == 4 * real_lm.args.n_layers and all(mod.blocks.kind == "q4_1" for mod in layers)
    for mod in layers:
        assert torch.equal(mod.blocks.dequantize(), mod.weight)
    assert m.head_blocks["embed"].kind == "q8_0"
    assert torch.equal(m.head_blocks["embed"].dequantize(), m.embed.weight)


@needs_kernel
def test_real_model_decoding_from_blocks_equals_scoring(real_lm, gpl3_text, monkeypatch):
    """Token-by-token decoding of the real model, every one-row product (and the logits) from
    the file's blocks by quant.c, gives scoring's token losses to float32 rounding."""
    from memtx_cli.config import merge_config
    from memtx_cli.engine.stream import Streamer, run_stream

    monkeypatch.setenv("MEMTX_KERNEL", "1")
    cfg = merge_config(real_lm.card.settings)
    ids = torch.tensor(real_lm.tokenizer.encode(gpl3_text)[:48])
    ref, _ = run_stream(real_lm.model, ids, cfg)
    st = Streamer(real_lm.model, cfg)
    with torch.inference_mode():
        h = torch.cat([st.feed(ids[i : i + 1]) for i in range(len(ids))])
        logits = torch.cat([real_lm.model.logits(h[i : i + 1][None])[0] for i in range(len(ids))])
    got = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")
    torch.testing.assert_close(got, ref.float(), atol=2e-4, rtol=1e-4)
