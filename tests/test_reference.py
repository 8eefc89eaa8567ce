"""The real default model against independent numbers: llama.cpp / transformers perplexities and
`transformers`' own forward of the same GGUF on the same ids."""

import pytest
import torch

from memtx_cli.config import Config
from memtx_cli.engine.score import score_ids
from memtx_cli.model.loading import load_model


def test_gpl3_perplexity_1024_full_float32(real_lm, gpl3_text):
    ids = real_lm.tokenizer.encode(gpl3_text)[:1024]
    res = score_ids(real_lm, ids, 1, Config(context="full", dtype="float32"))
    assert res.scored == 1023
    # Independent figures (../shared/reference/README.md): transformers 19.2787, llama.cpp 19.2530.
    assert abs(res.ppl / 19.2787 - 1) < 0.005
    assert abs(res.ppl / 19.2530 - 1) < 0.005
    assert res.ppl == pytest.approx(19.2787, abs=2e-3)


def test_bfloat16_within_half_percent(real_lm, gpl3_text):
    ids = real_lm.tokenizer.encode(gpl3_text)[:512]
    f32 = score_ids(real_lm, ids, 1, Config(context="full")).ppl
    lm16 = load_model("smollm2-135m", device="cpu", dtype="bfloat16")  # a copy: casting back loses bits
    bf16 = score_ids(lm16, ids, 1, Config(context="full")).ppl
    assert abs(bf16 / f32 - 1) < 0.005


@pytest.mark.reference
def test_logits_match_transformers(real_lm, gpl3_text):
    transformers = pytest.importorskip("transformers", reason="dev extra: pip install -e '.[dev]'")
    path = real_lm.card.weights_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    ids = torch.tensor(real_lm.tokenizer.encode(gpl3_text)[:512])[None]
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = real_lm.model(ids)
    diff = (got - ref).abs().max().item()
    print(f"max abs logit diff vs transformers (512 GPL-3 tokens, float32): {diff:.2e}")
    assert diff < 1e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
