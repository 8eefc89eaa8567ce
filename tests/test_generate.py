"""memtx generate: sampling, determinism, stdin, JSON, closed pipes, bad banks (tiny GGUF model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, memtx

from memtx_cli.engine.generate import Sampling, sample_next


def test_sampling_rules():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_next(logits, Sampling(temperature=0), None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, Sampling(temperature=1.0, top_k=2, top_p=1.0), g) for _ in range(200)}
    assert draws == {1, 2}  # top-k 2 never samples outside the two best
    draws = {sample_next(logits, Sampling(temperature=1.0, top_p=0.3), g) for _ in range(50)}
    assert draws == {1}  # the nucleus of mass 0.3 is the single best token
    with pytest.raises(Exception, match="top-p"):
        Sampling(top_p=0)


def test_generate_seed_stdin_json_and_pipe(tiny_gguf):
    common = ["--model", str(tiny_gguf), "--max-tokens", "12", "--seed", "5", "--temperature", "1.0"]
    a = memtx("generate", "hello there", *common, "--json", "--config", str(write_segment(tiny_gguf)))
    b = memtx("generate", "-", *common, "--json", "--config", str(write_segment(tiny_gguf)), stdin="hello there")
    assert a.returncode == 0, a.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["text"] == jb["text"] and ja["tokens"] >= 1  # same seed (and same prompt via stdin)
    assert ja["prompt_tokens"] == jb["prompt_tokens"] > 0
    # a closed pipe ends quietly
    p = subprocess.Popen(
        [sys.executable, "-m", "memtx_cli", "generate", "x" * 50, "--model", str(tiny_gguf), "--max-tokens", "60",
         "--temperature", "0", "--config", str(write_segment(tiny_gguf))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    p.stdout.read(5)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Traceback" not in err


def write_segment(tiny_gguf: Path) -> Path:
    p = tiny_gguf.parent / "cfg.yaml"
    p.write_text("segment: 64\nblock-size: 8\n")
    return p


def test_generate_with_missing_or_foreign_bank(tiny_gguf, tmp_path):
    r = memtx("generate", "hi", "--model", str(tiny_gguf), "--memory", str(tmp_path / "nope.idx"))
    assert r.returncode == 1 and "no such bank" in r.stderr


def test_a_generation_that_loops_is_recognised():
    from memtx_cli.engine.generate import looping

    assert looping("The answer is: 11\n\nThe answer is: 11\n", [1] * 3)
    assert not looping("The answer is: 11\n\nThe answer is: 11", [1] * 3)  # the line is not complete yet
    assert not looping("a\n\nb\n\nc\n", [1, 2, 3])  # blank lines do not count
    assert looping("x", [5, 7] * 8) and not looping("x", [5, 7] * 7)  # a 2-token pattern over 16 tokens
    assert looping("x", [1, 2, 3, 4, 5, 6, 7, 8] * 3) and not looping("x", [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    assert not looping("x", list(range(40)))


def test_copy_constrained_answers_are_spans_of_their_source(tiny_lm):
    """CopyFrom: every generated token continues a span of the source the tokens before it
    copied, or starts another; a stop token is only allowed once something was copied."""
    from memtx_cli.config import merge_config
    from memtx_cli.engine.generate import CopyFrom, generate

    cfg = merge_config({"memory": False, "segment": 64, "dtype": "float32"})
    source = tiny_lm.tokenizer.encode("the cat sat on the mat and the dog ran far away")
    stops = {min(set(range(tiny_lm.args.vocab_size)) - set(source))}
    n = len(source)
    for seed in range(3):
        copy, taken = CopyFrom(source, stops), []
        advance = copy.advance
        copy.advance = lambda t, advance=advance, taken=taken: (taken.append(t), advance(t))
        generate(tiny_lm, [5, 6, 7], cfg, Sampling(max_tokens=12, temperature=1.0, seed=seed), copy=copy)
        at = list(range(n))  # the reference: positions a span may take next
        for k, tok in enumerate(taken):
            assert tok in {source[p] for p in at} or (k > 0 and tok in stops)
            at = [p + 1 for p in at if source[p] == tok and p + 1 < n] or list(range(n))
    first = CopyFrom(source, stops).mask(torch.zeros(tiny_lm.args.vocab_size))
    assert torch.isinf(first[list(stops)]).all()  # nothing copied yet: no stopping
    assert set(torch.nonzero(torch.isfinite(first)).flatten().tolist()) == set(source)
    c = CopyFrom(source, stops)
    c.advance(source[0])  # "the": the next token continues one of its spans, or stops
    nxt = c.mask(torch.zeros(tiny_lm.args.vocab_size))
    follow = {source[i + 1] for i in range(n - 1) if source[i] == source[0]}
    assert set(torch.nonzero(torch.isfinite(nxt)).flatten().tolist()) == follow | stops


def test_decode_threads_keep_the_faster_count_and_restore(monkeypatch):
    """DecodeThreads: each candidate count timed on the first steps, the faster one kept until
    the next probe, torch's count restored at the end."""
    from memtx_cli.engine import generate as g

    clock = [0.0]
    monkeypatch.setattr(g.time, "perf_counter", lambda: clock[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dt = g.DecodeThreads(probe=3, every=20)
        used = []
        for _ in range(20):
            dt.begin()
            n = torch.get_num_threads()
            used.append(n)
            clock[0] += 0.01 if n == 1 else 0.05  # one thread is faster here (a busy machine)
            dt.end()
        assert used[:6] == [2, 2, 2, 1, 1, 1] and set(used[6:]) == {1}
        dt.begin()  # step 20: probing again
        assert torch.get_num_threads() == 2
        dt.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
