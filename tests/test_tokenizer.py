import json

import pytest
from conftest import SHARED


def test_gpl3_ids_equal_llamacpp(real_lm, gpl3_text):
    ref_path = SHARED / "reference/gpl3_llamacpp_ids.json"
    if not ref_path.is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    ref = json.loads(ref_path.read_text())["ids"]
    ids = real_lm.tokenizer.encode(gpl3_text)
    assert len(ids) == len(ref) == 7639
    assert ids == ref


def test_digits_split_individually(real_lm):
    tok = real_lm.tokenizer
    ids = tok.encode("In 2007, version 3")
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[pieces.index(" ") + 1 : pieces.index(" ") + 5] == ["2", "0", "0", "7"]
    assert tok.decode(ids) == "In 2007, version 3"


def test_special_tokens_only_when_asked(real_lm):
    tok = real_lm.tokenizer
    text = "<|im_start|>user\nhi<|im_end|>"
    special = tok.encode(text, special=True)
    assert special[0] == 1 and 2 in special  # <|im_start|>, <|im_end|> as single ids
    plain = tok.encode(text)
    assert 1 not in plain and 2 not in plain  # in a document they are just text
    assert tok.decode(plain) == text


def test_offsets_cover_text(real_lm):
    text = "Sir Walter Elliot, of Kellynch Hall — naïve café 123"
    ids, offsets = real_lm.tokenizer.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert offsets[-1][1] == len(text)
