"""memtx train: gradients through memorizing attention, loss going down, checkpoints that round-trip
exactly, resume after a kill reproducing the uninterrupted loss curve, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SAMPLE, tiny_args

from memtx_cli.config import Config
from memtx_cli.engine import plan
from memtx_cli.engine.stream import Streamer
from memtx_cli.errors import MemtxError
from memtx_cli.model.llama import token_nll
from memtx_cli.model.loading import build_model, load_model
from memtx_cli.tasks.train import lr_at, train
from memtx_cli.tasks.train_setup import InitConfig, TrainConfig

MEMTX = [sys.executable, "-m", "memtx_cli"]
CODE = SAMPLE / "code"

TINY_INIT = """
name: tiny-test
architecture: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128, context_length: 256}
tokenizer: {vocab_size: 400}
settings: {segment: 64, memory-layers: "1", combine: gate, retrieval: token, index: flat, top-k: 8, sinks: 0}
"""


@pytest.fixture
def init_yaml(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_INIT)
    return p


def sh(args, **kw):
    return subprocess.run(MEMTX + args, capture_output=True, text=True, cwd=REPO, **kw)


# ----------------------------------------------------------------------------------------------
# Gradients


def _stream_loss(model, ids, cfg, exact=False):
    """Summed NLL of a document streamed as scoring streams it; exact=True: logits and loss in
    the model's dtype (float64 for gradient checks) instead of token_nll's float32."""
    st = Streamer(model, cfg)
    total = 0.0
    for s in range(0, len(ids), cfg.segment):
        h = st.step(ids[s : s + cfg.segment])
        tg = ids[s + 1 : s + cfg.segment + 1]
        if exact:
            nll = torch.nn.functional.cross_entropy(model.logits(h[: len(tg)]), tg, reduction="sum")
        else:
            nll = token_nll(model, h[: len(tg)], tg).sum()
        total = total + nll
    return total


@pytest.mark.parametrize(
    "kind",
    [
        dict(retrieval="block", combine="joint", block_size=8, blocks=3, block_chunk=16),
        dict(retrieval="token", combine="joint", index="flat", top_k=8),
        dict(retrieval="token", combine="gate", index="flat", top_k=8),
    ],
)
def test_memory_parameter_gradients_match_finite_differences(kind):
    """d loss / d (mem_bias, mem_gate) through memorizing attention: autograd = central differences
    (float64), with the cache and memory carried across segments exactly as scoring does."""
    torch.manual_seed(0)
    model = build_model(tiny_args()).double().eval()
    model.inv_freq = model.inv_freq.float()
    cfg = Config(segment=32, sinks=2, memory_layers="1,2", **kind)
    layers = plan.layers_for(cfg, 3)
    model.add_memory_params(layers, 0.3)
    model.requires_grad_(False)
    name = "mem_gate" if kind["combine"] == "gate" else "mem_bias"
    params = [getattr(model.layers[i].attn, name) for i in layers]
    with torch.no_grad():
        for p in params:
            p.data = (torch.randn_like(p) * 0.5).double()
            p.requires_grad_(True)
    ids = torch.randint(0, 300, (160,))
    seg = cfg.segment

    def last_segment_loss(p=None, h=0, delta=0.0):
        """The document's earlier segments fill cache and memory (constants to the last one, as
        in training); then the last segment's loss, with one parameter moved by delta."""
        st = Streamer(model, cfg)
        with torch.no_grad():
            for s in range(0, len(ids) - seg, seg):
                st.step(ids[s : s + seg])
            if p is not None:
                p[h] += delta
        hidden = st.step(ids[-seg:-1])
        loss = torch.nn.functional.cross_entropy(model.logits(hidden), ids[-seg + 1 :], reduction="sum")
        if p is not None:
            with torch.no_grad():
                p[h] -= delta
        return loss

    last_segment_loss().backward()
    # Attention log-sum-exps are float32 (as in inference): ~1e-7 relative noise in the loss,
    # so a step of 1e-3 and a tolerance of 1e-3 relative. A lost gradient path (e.g. through the
    # flash kernel's log-sum-exp, which has none) is off by far more.
    eps = 1e-3
    for p in params:
        for h in (0, 3):
            with torch.no_grad():
                fd = (float(last_segment_loss(p, h, eps)) - float(last_segment_loss(p, h, -eps))) / (2 * eps)
            assert abs(float(p.grad[h]) - fd) < 1e-3 * max(1.0, abs(fd)), (name, h, float(p.grad[h]), fd)
        assert p.grad.abs().sum() > 0


def test_untrained_memory_parameters_change_nothing(tiny_model):
    """A zero joint bias is the untrained joint softmax: the same numbers to the last bit."""
    cfg = Config(segment=32, sinks=2, memory_layers="1,2", retrieval="block", block_size=8, blocks=3, block_chunk=16)
    ids = torch.randint(0, 300, (128,))
    with torch.no_grad():
        before = _stream_loss(tiny_model, ids, cfg)
        tiny_model.add_memory_params(plan.layers_for(cfg, 3), 0.0)
        after = _stream_loss(tiny_model, ids, cfg)
    assert float(before) == float(after)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# Training runs (tiny model from scratch)


def _tiny_cfg(init: InitConfig) -> Config:
    from memtx_cli.config import merge_config

    return merge_config(init.settings, {"device": "cpu"})


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path, init_yaml):
    """One sequence, read again every step: the loss must fall well below its start."""
    init = InitConfig.from_yaml(init_yaml)
    doc = tmp_path / "one.c"
    doc.write_text((CODE / "lcorolib.c").read_text()[:3000])  # one sequence of < 4096 tokens
    tc = TrainConfig(train="all", max_steps=25, lr=3e-3, warmup=2, seq_len=4096, eval_every=0, save_every=0)
    res = train([str(doc)], tmp_path / "ck", _tiny_cfg(init), tc, init=init, val_paths=[str(CODE / "lstring.c")])
    assert res.steps == 25 and len(res.losses) == 25
    assert res.losses[-1] < res.losses[0] - 0.5, res.losses
    assert res.evals[-1]["ppl_memory"] < res.evals[0]["ppl_memory"]


def test_checkpoint_round_trips_exactly_and_is_a_model(tmp_path, init_yaml):
    init = InitConfig.from_yaml(init_yaml)
    tc = TrainConfig(train="all", max_steps=3, seq_len=256, eval_every=0, save_every=0, eval_tokens=256)
    ck = tmp_path / "ck"
    events = []
    res = train([str(CODE)], ck, _tiny_cfg(init), tc, init=init, on_event=lambda k, i: events.append(k))
    assert {"start", "step", "eval", "save", "done"} <= set(events)
    assert sorted(p.name for p in ck.iterdir()) == [
        "config.json",
        "memtx.yaml",
        "model.safetensors",
        "tokenizer.json",
        "train_state.safetensors",
        "train_state.yaml",
    ]
    assert not list(tmp_path.glob("ck.*")), "no temporary checkpoint left behind"
    card = yaml.safe_load((ck / "memtx.yaml").read_text())
    assert card["trained"]["from_scratch"] and card["trained"]["steps"] == 3
    assert {Path(f["name"]).name for f in card["trained"]["on"]} == {"LICENSE-lua.txt", "lcorolib.c", "lstring.c"}
    assert card["settings"]["memory-layers"] == "1" and card["settings"]["combine"] == "gate"
    # Load it back as a model: every tensor, the memory gates included, bit for bit.
    lm = load_model(str(ck), device="cpu", dtype="float32")
    from safetensors.torch import load_file

    saved = load_file(str(ck / "model.safetensors"))
    assert torch.equal(saved["model.layers.1.self_attn.mem_gate"], lm.model.layers[1].attn.mem_gate.float())
    assert getattr(lm.model.layers[0].attn, "mem_gate", None) is None  # only the memory layer has one
    st = yaml.safe_load((ck / "train_state.yaml").read_text())
    assert st["losses"] == res.losses
    # The last evaluation re-computed from the loaded checkpoint: the same perplexity.
    from memtx_cli.tasks.train import evaluate

    ids = torch.tensor(lm.tokenizer.encode((CODE / "lstring.c").read_text())[:256])
    cfg = _tiny_cfg(init)
    assert evaluate(lm.model, [ids], cfg, None)["ppl_memory"] > 1
    # The CLI takes the checkpoint as --model, with its card's memory settings as defaults.
    r = sh(["score", str(CODE / "lstring.c"), "--model", str(ck), "--json", "--max-tokens", "300"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mode"] == "memory" and d["memory"]["memory_layers"] == "1" and d["memory"]["combine"] == "gate"
    r = sh(["generate", "--model", str(ck), "local function", "--max-tokens", "5", "--temperature", "0", "--json"])
    assert r.returncode == 0, r.stderr
    (tmp_path / "block.yaml").write_text("retrieval: block\n")  # banks hold block memories
    r = sh(
        [
            "ingest",
            str(CODE / "lcorolib.c"),
            "--model",
            str(ck),
            "--out",
            str(tmp_path / "b.idx"),
            "--config",
            str(tmp_path / "block.yaml"),
        ]
    )
    assert r.returncode == 0, r.stderr


def test_resume_after_a_kill_reproduces_the_loss_curve(tmp_path, init_yaml):
    args = [
        "train",
        str(CODE),
        "--init",
        str(init_yaml),
        "--max-steps",
        "40",
        "--seq-len",
        "256",
        "--eval-every",
        "0",
        "--eval-tokens",
        "128",
        "--save-every",
        "1",
        "--seed",
        "3",
        "--json",
        "-q",
    ]
    full = sh([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    want = json.loads(full.stdout)["losses"]
    assert len(want) == 40
    # The same run killed hard (SIGKILL: no clean-up) once a few checkpoints exist, then resumed.
    ck = tmp_path / "killed"
    proc = subprocess.Popen(
        MEMTX + [*args, "--out", str(ck)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            step = (yaml.safe_load((ck / "train_state.yaml").read_text()) or {}).get("step", 0)
        except (OSError, yaml.YAMLError):
            step = 0
        if step >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    r = sh(["train", str(CODE), "--out", str(ck), "--resume", "--max-steps", "40", "--json", "-q"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["losses"]
    assert got == want  # bit for bit: weights, AdamW moments, data order and schedule all resume


# ----------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_give_one_clear_line(tmp_path, init_yaml):
    r = sh(["train", str(tmp_path / "nope"), "--init", str(init_yaml), "--out", str(tmp_path / "o")])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("architecture: {dim: 64, n_layers: 2, n_heads: 3, n_kv_heads: 2, ffn_dim: 128}\n")
    r = sh(["train", str(CODE), "--init", str(bad), "--out", str(tmp_path / "o")])
    assert r.returncode == 1 and "multiple of n_kv_heads" in r.stderr, r.stderr
    bad.write_text("architecture: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128, depth: 3}\n")
    r = sh(["train", str(CODE), "--init", str(bad), "--out", str(tmp_path / "o")])
    assert r.returncode == 1 and "unknown architecture key" in r.stderr
    bad.write_text(TINY_INIT.replace('memory-layers: "1"', 'memory-layers: "7"'))
    r = sh(["train", str(CODE), "--init", str(bad), "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "out of range" in r.stderr, r.stderr  # a bad setting: usage error
    r = sh(["train", str(CODE), "--init", str(init_yaml), "--out", str(tmp_path / "o"), "--train", "bias"])
    assert r.returncode == 1 and "--train must be one of" in r.stderr
    r = sh(["train", str(CODE), "--out", str(tmp_path), "--resume"])
    assert r.returncode == 1 and "not a memtx training checkpoint" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    r = sh(["train", str(CODE), "--init", str(init_yaml), "--out", str(tmp_path / "full")])
    assert r.returncode == 1 and "not empty" in r.stderr
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(MemtxError, match="max-steps"):
        TrainConfig(max_steps=0)


def test_gradient_checkpointing_and_frozen_layers_keep_the_gradients(tiny_model):
    """Recomputing activations in backward, and running frozen lower layers without autograd,
    give the same gradients as plain backpropagation."""
    cfg = Config(segment=32, sinks=2, memory_layers="2", retrieval="block", block_size=8, blocks=3, block_chunk=16)
    tiny_model.add_memory_params([2], 0.0)
    ids = torch.randint(0, 300, (96,))

    def grads(ckpt: bool, frozen: int) -> list[torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model.requires_grad_(False)
        for n, p in tiny_model.named_parameters():
            if n.startswith(("layers.2.", "layers.1.")):
                p.requires_grad_(True)
        tiny_model.grad_checkpoint, tiny_model.frozen_below = ckpt, frozen
        _stream_loss(tiny_model, ids, cfg).backward()
        tiny_model.grad_checkpoint, tiny_model.frozen_below = False, 0
        return [p.grad.clone() for n, p in sorted(tiny_model.named_parameters()) if p.grad is not None]

    plain = grads(False, 0)
    for ckpt, frozen in ((True, 0), (False, 1), (True, 1)):
        other = grads(ckpt, frozen)
        assert len(other) == len(plain) > 5
        for a, b in zip(plain, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wall_clock_budget_stops_the_run(tmp_path, init_yaml):
    init = InitConfig.from_yaml(init_yaml)
    tc = TrainConfig(train="all", max_steps=10_000, max_minutes=0.02, seq_len=256, eval_every=0, save_every=0)
    res = train([str(CODE)], tmp_path / "ck", _tiny_cfg(init), tc, init=init)
    assert res.stopped == "minutes" and 0 < res.steps < 10_000
    st = yaml.safe_load((tmp_path / "ck" / "train_state.yaml").read_text())
    assert st["step"] == res.steps  # the checkpoint holds where the budget stopped it


def test_real_model_gate_checkpoint_serves_ingest_and_ask(tmp_path):
    """The default model, its joint memory biases trained for two steps: a checkpoint that
    ingests a bank and answers with sources like the model it came from."""
    ck = tmp_path / "smol-gate"
    legal = SAMPLE / "legal"
    r = sh(
        [
            "train",
            str(legal / "GPL-3.txt"),
            "--out",
            str(ck),
            "--train",
            "gate",
            "--max-steps",
            "2",
            "--seq-len",
            "1536",
            "--eval-every",
            "0",
            "--eval-tokens",
            "512",
            "--val",
            str(legal / "debian_constitution_1.8.txt"),
            "--json",
        ]
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 2 and res["evals"][-1]["ppl_memory"] > 1
    card = yaml.safe_load((ck / "memtx.yaml").read_text())
    assert card["name"] == "smollm2-135m-memtx-gate" and card["trained"]["from"]["model"] == "smollm2-135m"
    base = yaml.safe_load((Path(__file__).parents[1] / "models" / "smollm2-135m.yaml").read_text())
    assert card["chat_template"] and card["settings"]["memory-heads"] == base["settings"]["memory-heads"]
    from safetensors.torch import load_file

    biases = load_file(str(ck / "model.safetensors"))
    assert biases["model.layers.15.self_attn.mem_bias"].abs().sum() > 0  # it moved
    assert "model.layers.2.self_attn.mem_bias" not in biases  # no memory head of top36 in layer 2
    # A bank of the constitution's opening (its ratification dates), kept small for speed
    docs = tmp_path / "legal"
    docs.mkdir()
    (docs / "constitution.txt").write_text((legal / "debian_constitution_1.8.txt").read_text()[:6000])
    bank = tmp_path / "legal.idx"
    r = sh(["ingest", str(docs), "-m", str(ck), "--out", str(bank), "--json"])
    assert r.returncode == 0, r.stderr
    r = sh(
        ["ask", "When was version 1.8 ratified?", "--memory", str(bank), "-m", str(ck), "--max-tokens", "12", "--json"]
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["sources"] and all(Path(s["path"]).parent == docs for s in d["sources"])
    # The bank belongs to the checkpoint: the base model refuses it.
    r = sh(["ask", "When?", "--memory", str(bank), "--max-tokens", "4"])
    assert r.returncode == 1 and "model" in r.stderr
