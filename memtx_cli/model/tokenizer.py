"""Tokenizers: from GGUF metadata or from a Hugging Face `tokenizer.json`.

Both give a `tokenizers.Tokenizer`. For GGUF we rebuild the byte-level BPE from
`tokenizer.ggml.tokens` / `tokenizer.ggml.merges` and the pre-tokenizer that llama.cpp uses for
`tokenizer.ggml.pre` (for `smollm`: digits split one by one, then GPT-2's byte-level regex);
that reproduces llama.cpp's ids exactly (tests/test_tokenizer.py checks all of GPL-3).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtx_cli.errors import MemtxError

# llama.cpp pre-tokenizer names whose regexes are "split digits individually, then GPT-2".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Pre-tokenizer names that are plain GPT-2 byte-level (no digit split).
_GPT2_PRE = {"gpt2", "default", "gpt-2", "olmo", "jais", "phi-2", "poro-chat", "viking"}


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens memtx needs."""

    tok: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    fingerprint: str  # sha256 of the vocabulary + merges: banks record it

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`. `special=True` parses `<|im_start|>`-style tokens as one id."""
        if special:
            return self.tok.encode(text, add_special_tokens=False).ids
        # Plain text: special-token strings in a document are text, not control tokens.
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def __post_init__(self) -> None:
        # A copy without added tokens, so "<|im_end|>" inside a document is split like text.
        from tokenizers import Tokenizer

        spec = json.loads(self.tok.to_str())
        spec["added_tokens"] = []
        self._plain = Tokenizer.from_str(json.dumps(spec))


def _fingerprint(tokens: list[str], merges: list[str]) -> str:
    h = hashlib.sha256()
    for t in tokens:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    h.update(b"\1")
    for m in merges:
        h.update(m.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def tokenizer_from_gguf_fields(fields: dict[str, Any]) -> TextTokenizer:
    """Build the tokenizer from GGUF metadata (`fields`: key -> python value)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MemtxError(
            f"GGUF tokenizer model {kind!r} is not supported (memtx reads byte-level BPE, "
            "'gpt2'); use a Hugging Face directory with tokenizer.json instead"
        )
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    merges: list[str] = list(fields.get("tokenizer.ggml.merges", []))
    types: list[int] = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = str(fields.get("tokenizer.ggml.pre", "default"))

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in {"llama3", "llama-bpe", "qwen2", "smaug-bpe"}:
        # Llama 3 / Qwen2 regex: digits in groups of up to 3.
        pattern = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise MemtxError(
            f"GGUF pre-tokenizer {pre!r} is not supported; use a Hugging Face directory with "
            "tokenizer.json for this model"
        )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special: "<|im_start|>" in a chat prompt is one id.
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens(specials)

    def _id(key: str) -> int | None:
        v = fields.get(key)
        return int(v) if v is not None else None

    return TextTokenizer(
        tok=tok,
        bos_id=_id("tokenizer.ggml.bos_token_id"),
        eos_id=_id("tokenizer.ggml.eos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        fingerprint=_fingerprint(tokens, merges),
    )


def tokenizer_from_hf_dir(path: Path, config: dict[str, Any]) -> TextTokenizer:
    """Load `tokenizer.json` (and `tokenizer_config.json` for BOS/EOS) from a HF directory."""
    from tokenizers import Tokenizer

    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise MemtxError(f"{path} has no tokenizer.json; memtx needs the fast-tokenizer file")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise MemtxError(f"cannot read {tj}: {e}") from None
    tcfg: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        tcfg = json.loads((path / "tokenizer_config.json").read_text())

    def _tok_id(name: str, cfg_key: str) -> int | None:
        v = tcfg.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            i = tok.token_to_id(v)
            if i is not None:
                return i
        v2 = config.get(cfg_key)
        if isinstance(v2, list):
            v2 = v2[0] if v2 else None
        return int(v2) if v2 is not None else None

    spec = json.loads(tok.to_str())
    vocab = spec.get("model", {}).get("vocab", {})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] if isinstance(vocab, dict) else []
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec.get("model", {}).get("merges", [])]
    return TextTokenizer(
        tok=tok,
        bos_id=_tok_id("bos_token", "bos_token_id"),
        eos_id=_tok_id("eos_token", "eos_token_id"),
        add_bos=bool(tcfg.get("add_bos_token", False)),
        fingerprint=_fingerprint(tokens, merges),
    )
