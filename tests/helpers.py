"""Test helpers: tiny models written as real GGUF files."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_args

from memtx_cli.model.loading import build_model


def byte_tokenizer():
    """A 256-symbol byte-level vocabulary plus specials, as GGUF metadata lists."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["Ġt", "he"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["Ġ t", "h e"]


def write_gguf(path: Path, args, state, arch="llama"):
    """A float32 GGUF laid out as llama.cpp's converter writes one (Q/K permuted for llama)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.context_length)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    tokens, types, merges = byte_tokenizer()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    h, kv, hd = args.n_heads, args.n_kv_heads, args.head_dim
    w.add_tensor("token_embd.weight", state["embed.weight"].numpy())
    w.add_tensor("output_norm.weight", state["norm.weight"].numpy())
    for i in range(args.n_layers):
        p = f"layers.{i}."
        q, k, v = np.split(state[p + "attn.wqkv.weight"].numpy(), [h * hd, (h + kv) * hd])
        if arch == "llama":
            q, k = permute(q, h), permute(k, kv)
        gate, up = np.split(state[p + "ffn.w13.weight"].numpy(), 2)
        for name, t in [
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", v),
            ("attn_output", state[p + "attn.wo.weight"].numpy()),
            ("ffn_gate", gate),
            ("ffn_up", up),
            ("ffn_down", state[p + "ffn.w2.weight"].numpy()),
            ("attn_norm", state[p + "attn_norm.weight"].numpy()),
            ("ffn_norm", state[p + "ffn_norm.weight"].numpy()),
        ]:
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_tiny():
    args = tiny_args(vocab_size=len(byte_tokenizer()[0]))
    torch.manual_seed(0)
    m = build_model(args)
    return args, {k: v.detach().clone() for k, v in m.state_dict().items() if k != "inv_freq"}


def logits_of(args, state, ids):
    m = build_model(args, state).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)[None])


def signal_after_documents(proc, bank: Path, docs: int, sig: int, timeout: float = 120) -> bool:
    """Send `sig` to a running `memtx ingest` once its bank has committed `docs` documents (a
    moment into the next one); False if it finished first."""
    import time

    import yaml

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = bank / "manifest.yaml"
        if m.is_file():
            try:
                done = (yaml.safe_load(m.read_text()) or {}).get("documents", 0)
            except yaml.YAMLError:
                done = 0
            if done >= docs:
                time.sleep(0.05)
                if proc.poll() is not None:  # it finished in the meantime: too fast to interrupt
                    return False
                proc.send_signal(sig)
                return True
        time.sleep(0.005)
    return False


REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MEMTX = [sys.executable, "-m", "memtx_cli"]


def memtx(*args, stdin=None, env=None):
    """`memtx ARGS` as a real subprocess, with this checkout on its path."""
    return subprocess.run([*MEMTX, *args], input=stdin, capture_output=True, text=True, env=env or ENV)
