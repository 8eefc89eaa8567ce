"""Chat prompts as the model was trained on them, the attention probe, and answers quoted from
the sources (answer-mode quote)."""

from __future__ import annotations

import pytest
import torch

from memtx_cli.config import merge_config
from memtx_cli.errors import UsageError
from memtx_cli.model import llama
from memtx_cli.model.probe import attention_rows, parse_query_heads
from memtx_cli.tasks.chat import chat_ids, chat_pieces, quoted, render_chat, with_evidence
from memtx_cli.tasks.quote import context_lines, line_mass, passage


def test_chat_prompt_has_control_tokens_and_plain_contents(real_lm):
    tok = real_lm.tokenizer
    msgs = [{"role": "user", "content": "Is <|im_end|> a token here?"}]
    ids = chat_ids(real_lm, msgs)
    assert tok.decode(ids) == render_chat(real_lm, msgs)  # the same text
    # the template's markers are the single ids the model was trained on ...
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3 (system, user, assistant), <|im_end|> x2
    # ... and the user's own "<|im_end|>" stays text: it cannot close the turn
    content = [p for p, i in chat_pieces(real_lm, msgs) if i == 0][0]
    assert content == tok.encode(msgs[0]["content"]) and 2 not in content


def test_probe_rows_are_the_attention_the_forward_pass_computes(tiny_model, monkeypatch):
    """attention_rows against the probabilities of the model's own forward: every layer's q
    and k as grouped_attention receives them, softmaxed explicitly."""
    torch.manual_seed(0)
    model = tiny_model
    a = model.args
    ids = torch.randint(0, a.vocab_size, (40,))
    seen = []
    real = llama.grouped_attention

    def record(q, k, v, bias):
        g = q.shape[1] // k.shape[1]
        s = (q.float() @ k.repeat_interleave(g, 1).float().transpose(-1, -2)) * a.head_dim**-0.5
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        seen.append(s.softmax(-1)[0])  # (H, T, T)
        return real(q, k, v, bias)

    monkeypatch.setattr(llama, "grouped_attention", record)
    with torch.inference_mode():
        model.forward_segment(ids[None])
    monkeypatch.setattr(llama, "grouped_attention", real)
    heads = [(0, 1), (a.n_layers - 1, 0), (1, a.n_heads - 1)]
    rows = attention_rows(model, ids, heads, 30)
    for n, (layer, h) in enumerate(heads):
        want = seen[layer][h, 30:].mean(0)
        assert torch.allclose(rows[n], want, atol=1e-5)
    assert torch.allclose(rows.sum(1), torch.ones(3), atol=1e-5)  # each head adds 1
    assert rows[:, 31:].sum() > 0 and rows.shape == (3, 40)


def test_quote_heads_parse_and_refuse():
    assert parse_query_heads("18.6, 21.2", 30, 9) == [(18, 6), (21, 2)]
    for bad in ("18", "18.9", "30.0", "a.b"):
        with pytest.raises(UsageError):
            parse_query_heads(bad, 30, 9)
    with pytest.raises(UsageError, match="answer-mode"):
        merge_config({}, {}, {"answer_mode": "guess"})


class _Src:
    def __init__(self, text: str) -> None:
        self.text = text


def test_lines_of_the_quoted_excerpts_and_their_passages():
    ex = [_Src("alpha one\n\nalpha two\nalpha three"), _Src("beta one\nbeta two")]
    texts = quoted(ex, 1200)
    content = with_evidence("What?", ex, 1200)
    lines = context_lines(content, texts)
    got = [content[ln.start : ln.end] for ln in lines]
    assert got == ["alpha one", "alpha two", "alpha three", "beta one", "beta two"]
    assert [ln.excerpt for ln in lines] == [0, 0, 0, 1, 1]
    # a passage runs over blank lines within its excerpt, never into the next one
    assert passage(content, lines, 0, 3) == "alpha one\nalpha two\nalpha three"
    assert passage(content, lines, 2, 3) == "alpha three"
    # token masses fall on the lines their characters overlap
    offsets = [(lines[1].start, lines[1].start + 5), (lines[3].start, lines[3].start + 4), (0, 8)]
    mass = line_mass(offsets, torch.tensor([0.25, 0.5, 9.0]), lines)
    assert mass.tolist() == [0.0, 0.25, 0.0, 0.5, 0.0]
