"""Weight loaders: a GGUF file (dequantized with `gguf`) or a Hugging Face directory.

Both produce `ModelArgs`, a state dict in memtx's own names (see `model/llama.py`), a tokenizer and
a weights fingerprint (sha256 of the weight files) that banks record.

GGUF from llama.cpp's converter stores Q/K of the `llama` architecture permuted so RoPE pairs
adjacent dimensions; we permute them back to Hugging Face's rotate-half layout, so the model
has one RoPE. Qwen2 GGUFs are not permuted (llama.cpp uses NEOX RoPE for them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtx_cli.errors import MemtxError
from memtx_cli.model.llama import ModelArgs
from memtx_cli.model.tokenizer import TextTokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_dir

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class RawWeights:
    args: ModelArgs
    state: dict[str, torch.Tensor]  # memtx names, float32
    tokenizer: TextTokenizer
    fingerprint: str  # sha256 (first 16 hex) of the weight files
    source: str  # "gguf" or "hf"
    chat_template: str | None
    name: str  # what the file calls itself


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (adjacent pairs -> rotate-half). w: (n_head*D, C)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fuse(state: dict[str, np.ndarray], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Fuse per-layer q/k/v and gate/up into memtx's wqkv / w13 (HF-like names in, memtx out)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out[p + "attn.wqkv.weight"] = torch.from_numpy(
            np.concatenate([state.pop(p + n) for n in ("q.weight", "k.weight", "v.weight")])
        )
        if args.qkv_bias:
            out[p + "attn.wqkv.bias"] = torch.from_numpy(
                np.concatenate([state.pop(p + n) for n in ("q.bias", "k.bias", "v.bias")])
            )
        out[p + "ffn.w13.weight"] = torch.from_numpy(
            np.concatenate([state.pop(p + "gate.weight"), state.pop(p + "up.weight")])
        )
    for k, v in state.items():
        out[k] = torch.from_numpy(np.array(v))  # a copy: GGUF tensors are read-only memmaps
    return {k: v.float() for k, v in out.items()}


BLOCK_KINDS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}  # GGUF types kept as blocks for decoding (kernels/quant.py)


def _fuse_blocks(blocks: dict[str, tuple[str, np.ndarray]], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The GGUF blocks of the matrices `_fuse` makes (a fused matrix only when its parts are of
    one kind) and of the embedding / head, as uint8 tensors named "<weight>.<kind>"."""
    parts = {"attn.wqkv.weight": ("q.weight", "k.weight", "v.weight"), "ffn.w13.weight": ("gate.weight", "up.weight")}
    parts |= {"attn.wo.weight": ("attn.wo.weight",), "ffn.w2.weight": ("ffn.w2.weight",)}
    out: dict[str, torch.Tensor] = {}
    for name in ("embed.weight", "head.weight"):
        if name in blocks:
            out[f"{name}.{blocks[name][0]}"] = torch.from_numpy(np.array(blocks[name][1]))
    for i in range(args.n_layers):
        p = f"layers.{i}."
        kinds = {n: blocks[p + n][0] for n in sum(parts.values(), ()) if p + n in blocks}
        for name, srcs in parts.items():
            if all(n in kinds for n in srcs) and len({kinds[n] for n in srcs}) == 1:
                raw = np.concatenate([blocks[p + n][1] for n in srcs])
                out[f"{p}{name}.{kinds[srcs[0]]}"] = torch.from_numpy(raw)
    return out


def _check_keys(state: dict[str, torch.Tensor], args: ModelArgs, where: str) -> None:
    want = [
        f"layers.{i}.{n}"
        for i in range(args.n_layers)
        for n in (
            "attn.wqkv.weight",
            "attn.wo.weight",
            "attn_norm.weight",
            "ffn_norm.weight",
            "ffn.w13.weight",
            "ffn.w2.weight",
        )
    ]
    want += ["embed.weight", "norm.weight"] + ([] if args.tie_embeddings else ["head.weight"])
    missing = [k for k in want if k not in state]
    if missing:
        raise MemtxError(f"{where}: weights are missing tensors ({', '.join(missing[:3])} ...)")


# ----------------------------------------------------------------------------------------------
# GGUF


def read_gguf_fields(path: Path) -> tuple[Any, dict[str, Any]]:
    """Open a GGUF file; return the reader and its metadata as plain python values."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a bad file
        raise MemtxError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields: dict[str, Any] = {}
    for key, f in reader.fields.items():
        try:
            fields[key] = f.contents()
        except Exception:  # an exotic field type we don't need
            continue
    return reader, fields


GGUF_NAMES = {  # GGUF tensor name -> memtx's
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "head.weight",
}
GGUF_LAYER_NAMES = {  # blk.<i>.<name> -> layers.<i>.<memtx name>
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "q.weight",
    "attn_k.weight": "k.weight",
    "attn_v.weight": "v.weight",
    "attn_q.bias": "q.bias",
    "attn_k.bias": "k.bias",
    "attn_v.bias": "v.bias",
    "attn_output.weight": "attn.wo.weight",
    "ffn_gate.weight": "gate.weight",
    "ffn_up.weight": "up.weight",
    "ffn_down.weight": "ffn.w2.weight",
}


def load_gguf(path: Path) -> RawWeights:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader, fields = read_gguf_fields(path)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise MemtxError(
            f"{path.name}: architecture {arch!r} is not supported (memtx runs "
            f"{', '.join(SUPPORTED_GGUF_ARCHS)} GGUF files)"
        )

    def meta(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    n_heads = int(meta("attention.head_count"))
    dim = int(meta("embedding_length"))
    tokens = fields.get("tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    args = ModelArgs(
        vocab_size=int(meta("vocab_size", len(tokens))),
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        ffn_dim=int(meta("feed_forward_length")),
        head_dim=int(meta("attention.key_length", meta("rope.dimension_count", dim // n_heads))),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        context_length=int(meta("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )
    state: dict[str, np.ndarray] = {}
    blocks: dict[str, tuple[str, np.ndarray]] = {}  # quantized matrices as stored (bytes per row)
    for t in reader.tensors:
        if t.name in GGUF_NAMES:
            name = GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in GGUF_LAYER_NAMES:
                continue  # e.g. rope_freqs: we compute RoPE ourselves
            name = f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
        qt = GGMLQuantizationType(t.tensor_type)
        try:
            w = dequantize(t.data, qt)
        except NotImplementedError:
            raise MemtxError(f"{path.name}: tensor type {qt.name} cannot be dequantized by gguf") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (columns) first
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        raw = None
        if qt.name in BLOCK_KINDS and len(shape) == 2 and name.endswith("weight"):
            raw = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1)
        if arch == "llama" and name.endswith(("q.weight", "q.bias")):
            w, raw = _unpermute(w, args.n_heads), None if raw is None else _unpermute(raw, args.n_heads)
        elif arch == "llama" and name.endswith(("k.weight", "k.bias")):
            w, raw = _unpermute(w, args.n_kv_heads), None if raw is None else _unpermute(raw, args.n_kv_heads)
        state[name] = w
        if raw is not None:
            blocks[name] = (BLOCK_KINDS[qt.name], raw)
    fused = _fuse(state, args)
    _check_keys(fused, args, path.name)
    fused.update(_fuse_blocks(blocks, args))
    return RawWeights(
        args=args,
        state=fused,
        tokenizer=tokenizer_from_gguf_fields(fields),
        fingerprint=file_sha256([path]),
        source="gguf",
        chat_template=fields.get("tokenizer.chat_template"),
        name=str(fields.get("general.name", path.stem)),
    )


# ----------------------------------------------------------------------------------------------
# Hugging Face directory


def hf_args(config: dict[str, Any], where: str) -> ModelArgs:
    mtype = config.get("model_type")
    if mtype not in SUPPORTED_HF_TYPES:
        raise MemtxError(f"{where}: model_type {mtype!r} is not supported (memtx runs {', '.join(SUPPORTED_HF_TYPES)})")
    try:
        n_heads = int(config["num_attention_heads"])
        dim = int(config["hidden_size"])
        return ModelArgs(
            vocab_size=int(config["vocab_size"]),
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            ffn_dim=int(config["intermediate_size"]),
            head_dim=int(config.get("head_dim") or dim // n_heads),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            context_length=int(config.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", mtype != "llama")),
            qkv_bias=bool(config.get("attention_bias", mtype == "qwen2")),
        )
    except KeyError as e:
        raise MemtxError(f"{where}: config.json lacks {e.args[0]!r}") from None


def load_hf_dir(path: Path) -> RawWeights:
    from safetensors.numpy import load_file

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise MemtxError(f"{path} has no config.json; a Hugging Face model directory needs one")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemtxError(f"{cfg_path} is not valid JSON: {e}") from None
    args = hf_args(config, str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MemtxError(f"{path} has no *.safetensors files (memtx never loads pickled .bin weights)")
    hf: dict[str, np.ndarray] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))
        except Exception as e:
            raise MemtxError(f"cannot read {f}: {e}") from None
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "q.weight",
        "self_attn.k_proj.weight": "k.weight",
        "self_attn.v_proj.weight": "v.weight",
        "self_attn.q_proj.bias": "q.bias",
        "self_attn.k_proj.bias": "k.bias",
        "self_attn.v_proj.bias": "v.bias",
        "self_attn.o_proj.weight": "attn.wo.weight",
        "mlp.gate_proj.weight": "gate.weight",
        "mlp.up_proj.weight": "up.weight",
        "mlp.down_proj.weight": "ffn.w2.weight",
        # memtx's per-head memory parameters (a memtx train checkpoint; other tools ignore them)
        "self_attn.mem_gate": "attn.mem_gate",
        "self_attn.mem_bias": "attn.mem_bias",
    }
    state: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        w = np.asarray(w, dtype=np.float32)
        if name == "model.embed_tokens.weight":
            state["embed.weight"] = w
        elif name == "model.norm.weight":
            state["norm.weight"] = w
        elif name == "lm_head.weight" and not args.tie_embeddings:
            state["head.weight"] = w
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest in per_layer:
                state[f"layers.{i}.{per_layer[rest]}"] = w
    fused = _fuse(state, args)
    _check_keys(fused, args, str(path))
    tcfg = path / "tokenizer_config.json"
    template = json.loads(tcfg.read_text()).get("chat_template") if tcfg.is_file() else None
    return RawWeights(
        args=args,
        state=fused,
        tokenizer=tokenizer_from_hf_dir(path, config),
        fingerprint=file_sha256(files),
        source="hf",
        chat_template=template if isinstance(template, str) else None,
        name=path.name,
    )


def load_weights(path: Path) -> RawWeights:
    """GGUF file or Hugging Face directory, by what `path` is."""
    if path.is_dir():
        return load_hf_dir(path)
    if path.is_file():
        return load_gguf(path)
    raise MemtxError(f"model path {path} does not exist")


def save_hf_dir(path: Path, args: ModelArgs, state: dict[str, torch.Tensor], tokenizer: TextTokenizer) -> None:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer.json).

    The inverse of `load_hf_dir`: un-fuses wqkv / w13 into HF's per-projection tensors.
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hd, h, kv = args.head_dim, args.n_heads, args.n_kv_heads
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not args.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[p + "attn.wqkv.weight"].split([h * hd, kv * hd, kv * hd])
        out |= {q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk, q + "self_attn.v_proj.weight": wv}
        if args.qkv_bias:
            bq, bk, bv = state[p + "attn.wqkv.bias"].split([h * hd, kv * hd, kv * hd])
            out |= {q + "self_attn.q_proj.bias": bq, q + "self_attn.k_proj.bias": bk, q + "self_attn.v_proj.bias": bv}
        gate, up = state[p + "ffn.w13.weight"].split(args.ffn_dim)
        out |= {
            q + "mlp.gate_proj.weight": gate,
            q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": state[p + "ffn.w2.weight"],
            q + "self_attn.o_proj.weight": state[p + "attn.wo.weight"],
            q + "input_layernorm.weight": state[p + "attn_norm.weight"],
            q + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
        }
        for name in ("mem_gate", "mem_bias"):  # memory parameters, where the layer has them
            if p + "attn." + name in state:
                out[q + "self_attn." + name] = state[p + "attn." + name]
    save_file({k: v.detach().float().contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    config = {
        "model_type": "qwen2" if args.qkv_bias else "llama",
        "architectures": ["Qwen2ForCausalLM" if args.qkv_bias else "LlamaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "intermediate_size": args.ffn_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.context_length,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": args.qkv_bias,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.tok.save(str(path / "tokenizer.json"))
