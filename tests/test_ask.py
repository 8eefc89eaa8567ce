"""memtx ask / chat / bench passkey: attention-mass sources (exact against an explicit softmax),
line ranges, --remember, the passkey prompt, and the commands as real subprocesses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_tiny, memtx, write_gguf
from test_bank import build, make_corpus

from memtx_cli.attention.memorizing import MemorizingAttention
from memtx_cli.attention.reads import MemoryRead
from memtx_cli.bank.store import Bank
from memtx_cli.memory.results import BlockRetrieval
from memtx_cli.model.llama import ModelArgs, local_bias, rope_inv_freq, rotate_by
from memtx_cli.tasks.chat import BankTrace, sources_from_mass
from memtx_cli.tasks.passkey import answer_is, build_prompt, parse_depths, parse_lengths


@pytest.fixture(scope="module")
def bank_dir(tiny_lm, tiny_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("askbank")
    corpus = make_corpus(root / "corpus", n_docs=3, words=400)
    out = root / "b.idx"
    build(tiny_lm, tiny_gguf, corpus, out)
    cfg = root / "cfg.yaml"
    cfg.write_text("segment: 64\nblock-size: 8\nblocks: 4\nblock-chunk: 16\n")
    return out, corpus, cfg


# ----------------------------------------------------------------------------------------------
# Sources: the traced mass is the joint softmax's weight on each bank block


class FakeBankMemory:
    """Returns fixed blocks as CompositeMemory would: own blocks first, then bank blocks."""

    block_size = 4

    def __init__(self, keys, values, bank_ids):
        self.keys, self.values, self.bank_ids = keys, values, bank_ids

    def __len__(self):
        return self.keys.shape[1]

    def retrieve_blocks(
        self,
        sel,
        n_blocks,
        scale,
        scheme="fixed",
        near=None,
        spread=0,
        far_blocks=-1,
        far_bias=0.0,
        exact=False,
        budgets=None,
    ):
        kv, c = sel.shape[:2]
        m = self.keys.shape[1]
        return BlockRetrieval(
            keys=self.keys.repeat_interleave(c, 0),
            rkeys=None,
            values=self.values.repeat_interleave(c, 0),
            valid=torch.ones(kv * c, m, dtype=torch.bool),
            bias=None,
            bank_ids=self.bank_ids.repeat_interleave(c, 0),
        )


def test_traced_mass_equals_explicit_attention_weights():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=16, vocab_size=10)
    att = MemorizingAttention(args)
    kv, g, t, d, s = 2, 2, 3, 8, 5
    q = torch.randn(1, kv * g, t, d)
    k, v = torch.randn(1, kv, s, d), torch.randn(1, kv, s, d)
    qr = torch.randn(kv, g, t, d)
    mem_k, mem_v = torch.randn(kv, 12, d), torch.randn(kv, 12, d)  # 1 own block + 2 bank blocks of 4
    bank_ids = torch.tensor([[7, 9], [9, 3]])  # per KV head
    got: list = []
    inv_freq = rope_inv_freq(args)
    mem = MemoryRead(
        FakeBankMemory(mem_k, mem_v, bank_ids),
        top_k=1,
        q_pos=torch.arange(10, 13),
        distance=50,
        retrieval="block",
        blocks=3,
        chunk=64,
        trace=lambda ids, m: got.append((ids.clone(), m.clone())),
    )
    groups = [(0, t, torch.randn(kv, 1, d))]
    bias = local_bias(t, s, q.dtype, q.device)
    out_m, lse_m, traced = att.block_memory_attention(q, qr, groups, mem, inv_freq)
    att.merge_memory(q, k, v, bias, out_m, lse_m, mem, traced)
    # explicit: one softmax over [local keys (causal), memory keys at distance 50]
    scale = 1 / math.sqrt(d)
    qm = rotate_by(qr, inv_freq, torch.full((kv, g, t), 50))
    expected = {}
    for h in range(kv):
        sl = (q[0].view(kv, g, t, d)[h] @ k[0, h].T) * scale + bias  # (G, T, S)
        sm = (qm[h] @ mem_k[h].T) * scale  # (G, T, 12)
        w = torch.softmax(torch.cat([sl, sm], -1), -1)[..., s:]
        per_block = w.sum((0, 1)).view(3, 4).sum(-1)[1:]  # the two bank blocks
        for b, m in zip(bank_ids[h].tolist(), per_block.tolist(), strict=True):
            expected[(h, b)] = m
    ((ids, mass),) = got
    assert ids.tolist() == bank_ids.tolist()
    for h in range(kv):
        for j, b in enumerate(ids[h].tolist()):
            assert mass[h, j].item() == pytest.approx(expected[(h, b)], rel=1e-4, abs=1e-6)


def test_bank_trace_accumulates_and_ignores_missing_blocks():
    tr = BankTrace()
    tr(torch.tensor([[3, -1], [3, 5]]), torch.tensor([[0.5, 9.0], [0.25, 1.0]]))
    assert tr.mass == {3: 0.75, 5: 1.0} and tr.total == 1.75


def test_sources_map_blocks_to_documents_and_lines(bank_dir):
    out, corpus, _ = bank_dir
    with Bank.open(out, verify=False) as bank:
        doc = next(d for d in bank.docs.values() if d.path.endswith("doc1.txt"))
        text = Path(doc.path).read_text()
        b = doc.blocks[5]  # a block in the middle of doc1
        prov = bank.provenance()[b * 8 : b * 8 + 8]
        srcs = sources_from_mass(bank, {b: 3.0, doc.blocks[6]: 1.0, bank.docs[0].blocks[2]: 0.5}, 3)
    top = srcs[0]
    assert top.path == doc.path and top.weight == pytest.approx(4.0 / 4.5)  # blocks 5 and 6 merge
    first_line = text[: int(prov[0, 2])].count("\n") + 1
    assert top.lines[0] == first_line and top.lines[1] >= first_line
    assert text.splitlines()[first_line - 1] in top.text
    assert len(srcs) == 2 and srcs[1].path.endswith("doc0.txt")


# ----------------------------------------------------------------------------------------------
# Passkey


def test_passkey_prompt_and_parsing(tiny_lm):
    assert parse_lengths("2k,8K,300") == [2048, 8192, 300]
    assert parse_depths("5") == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("x", "0.5,2"):
        with pytest.raises(Exception, match="depths"):
            parse_depths(bad)
    with pytest.raises(Exception, match="lengths"):
        parse_lengths("4q")
    ids, at = build_prompt(tiny_lm, 2000, 0.25, 12345)
    text = tiny_lm.tokenizer.decode(ids)
    assert abs(len(ids) - 2000) < 60 and text.count("12345") == 2
    assert tiny_lm.tokenizer.decode(ids[at:]).lstrip().startswith("The pass key is 12345")
    assert 0.2 < at / len(ids) < 0.3
    assert answer_is(" 12345. Remember", 12345) and not answer_is(" 1234", 12345) and not answer_is("no", 1)


def test_bench_passkey_json(tiny_gguf, bank_dir):
    _, _, cfg = bank_dir
    r = memtx("bench", "passkey", "--model", str(tiny_gguf), "--lengths", "300", "--depths", "2", "--trials", "1",
              "--config", str(cfg), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    row = res["rows"][0]
    assert row["trials"] == 2 and 0 <= row["accuracy_memory"] <= 1 and 0 <= row["accuracy_window"] <= 1
    meta = res["meta"]  # every bench result carries its run: command, date, commit, CPU
    assert meta["command"].startswith("memtx bench passkey") and meta["date"][:2] == "20"
    assert meta["cpu"] and meta["cores"] >= 1 and meta["commit"] and meta["torch"]
    assert row["seconds_per_trial"] > 0 and len(row["details"]) == 2
    r = memtx("bench", "passkey", "--model", str(tiny_gguf), "--lengths", "300", "--depths", "1", "--trials", "1",
              "--config", str(cfg), "--bank", "--set", "answer-bank=true", "--precision", "sq8", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    row = res["rows"][0]
    assert res["mode"] == "bank" and res["precision"] == "sq8"
    assert row["seconds_ingest_per_trial"] > 0 and row["accuracy_window_key_outside"] == 0
    assert row["details"][0]["key_in_window"] is False  # the question alone: the key is only in the bank


# ----------------------------------------------------------------------------------------------
# ask / chat as subprocesses


def test_ask_json_sources_stdin_and_errors(tiny_gguf, bank_dir, tmp_path):
    out, corpus, cfg = bank_dir
    common = ["--model", str(tiny_gguf), "--memory", str(out), "--config", str(cfg), "--max-tokens", "8"]
    r = memtx("ask", "what is the memory bank index?", *common, "--json", "--sources", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert isinstance(res["answer"], str) and 1 <= len(res["sources"]) <= 2
    for s in res["sources"]:
        assert Path(s["path"]).parent == corpus and 0 < s["weight"] <= 1
        n_lines = Path(s["path"]).read_text().count("\n")
        assert 1 <= s["lines"][0] <= s["lines"][1] <= n_lines
    r2 = memtx("ask", "-", *common, "--json", "--sources", "2", stdin="what is the memory bank index?\n")
    assert json.loads(r2.stdout)["answer"] == res["answer"]  # greedy: the same answer from stdin
    r3 = memtx("ask", "what?", *common)  # the table form lists the sources
    assert r3.returncode == 0 and "Sources:" in r3.stdout and "lines" in r3.stdout
    # a missing bank, a bank of another model: one line, exit 1
    r = memtx("ask", "hi", "--model", str(tiny_gguf), "--memory", str(tmp_path / "none.idx"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such bank" in r.stderr
    args, state = make_tiny()
    state = {k: v * 1.01 for k, v in state.items()}  # other weights: another fingerprint
    other = tmp_path / "other.gguf"
    write_gguf(other, args, state)
    r = memtx("ask", "hi", "--model", str(other), "--memory", str(out), "--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "model" in r.stderr


def test_chat_remember_persists_across_sessions(tiny_gguf, bank_dir, tmp_path):
    import shutil

    src, _, cfg = bank_dir
    bank = tmp_path / "chat.idx"
    shutil.copytree(src, bank)
    with Bank.open(bank, verify=False) as b:
        before = len(b.docs)
    common = ["--model", str(tiny_gguf), "--memory", str(bank), "--config", str(cfg), "--max-tokens", "6"]
    r = memtx("chat", *common, "--remember", "--json", "--temperature", "0", stdin="my cat is called Io\nhello\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [0, 1] and all(t["remembered_tokens"] > 0 for t in turns)
    r = memtx("bank", "verify", str(bank))
    assert r.returncode == 0, r.stderr
    with Bank.open(bank, verify=True) as b:
        chats = [d for d in b.docs.values() if d.path.startswith("chat:")]
        assert len(b.docs) == before + 2 and len(chats) == 2 and chats[0].path.endswith("#0")
    # without --remember nothing is written; --remember without a bank is refused
    r = memtx("chat", *common, stdin="hi\n")
    assert r.returncode == 0
    with Bank.open(bank, verify=False) as b:
        assert len(b.docs) == before + 2
    r = memtx("chat", "--model", str(tiny_gguf), "--remember", stdin="hi\n")
    assert r.returncode == 1 and "--remember needs --memory" in r.stderr


# ----------------------------------------------------------------------------------------------
# The real model on real text


def test_ask_real_model_answers_with_the_right_source(real_lm, tmp_path):
    """A bank of two sample documents; the answer is on line 29 of Persuasion:
    "Walter Elliot, born March 1, 1760, married, July 15, 1784, Elizabeth," """
    from memtx_cli.bank.ingest import ingest, open_or_create_bank
    from memtx_cli.config import merge_config
    from memtx_cli.engine.generate import Sampling
    from memtx_cli.tasks.chat import answer

    # the constitution's first pages as a second document of another kind (kept short for speed)
    other = tmp_path / "debian_constitution_1.8.txt"
    other.write_text((REPO / "sample_docs/legal/debian_constitution_1.8.txt").read_text()[:12000])
    docs = [REPO / "sample_docs/books/austen_persuasion_ch1-2.txt", other]
    cfg = merge_config(real_lm.card.settings)
    bank = open_or_create_bank(tmp_path / "s.idx", real_lm, cfg, 0, "fifo")
    try:
        ingest(real_lm, bank, docs, cfg)
        res = answer(
            real_lm,
            [{"role": "user", "content": "In Persuasion, when was Walter Elliot born?"}],
            cfg,
            Sampling(max_tokens=24, temperature=0),
            bank,
            n_sources=3,
            evidence=2,
        )
    finally:
        bank.close()
    # The answer (answer-mode quote) is the lines of the quoted excerpts the question attends
    # to: line 29, as written.
    assert res.generation.stop_reason == "quote"
    assert "Walter Elliot, born March 1, 1760" in res.generation.text
    assert res.generation.text.splitlines()[0] in "".join(e.text for e in res.evidence)
    top = res.sources[0]
    assert top.path == str(docs[0]) and top.lines[0] <= 29 <= top.lines[1]
    line29 = docs[0].read_text().splitlines()[28]
    assert line29 in top.text and "born March 1, 1760" in line29


# ----------------------------------------------------------------------------------------------
# bench ask: the question set and its grading


ASK_SET = REPO / "benchmarks/ask_set.yaml"
CORPUS = REPO.parent / "shared/corpus"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="needs the benchmark corpus beside the checkout")
def test_the_question_set_has_its_answers_in_its_gold_lines(tmp_path):
    from memtx_cli.tasks.ask_bench import load_set, write_documents

    s = load_set(ASK_SET)
    assert len(s.questions) >= 30 and len(s.documents) >= 6 and len({d.kind for d in s.documents.values()}) >= 5
    assert min(len(s.only(sp).questions) for sp in ("tune", "held-out")) >= 15
    paths = write_documents(s, CORPUS, tmp_path)  # raises if an answer is not where the set says
    for doc in s.documents.values():
        assert paths[doc.name].read_text(encoding="utf-8").count("\n") == doc.last - doc.first + 1
    # every question asks about one document: the set names each document in its questions
    assert {q.doc for q in s.questions} == set(s.documents)


def test_answers_match_whole_words_and_gold_lines_shift_into_the_document():
    from memtx_cli.tasks.ask_bench import Document, Question, contains_answer, grade
    from memtx_cli.tasks.chat import Source

    assert contains_answer("Text is an alias of str.", ("str",)) and not contains_answer("a string", ("str",))
    assert contains_answer("with a 3:1\n majority", ("3:1 majority",)) and contains_answer("FALSE", ("False",))
    assert not contains_answer("13:1", ("3:1",))
    doc = Document("d.txt", "book", "books/x.txt", 101, 200)
    q = Question("d.txt", "?", 150, 152, ("x",), "tune")

    def src(path, lines):
        return Source(path, 0, 1.0, (0, 1), lines)

    g = grade(q, doc, "the x", [src("/tmp/a/other.txt", (50, 52)), src("/tmp/a/d.txt", (52, 60))])
    assert g == {"doc_first": False, "gold_lines": True, "answer_right": True}
    g = grade(q, doc, "no", [src("/w/d.txt", (1, 49)), src("/w/d.txt", (53, 60)), src("/w/d.txt", None)])
    assert g == {"doc_first": True, "gold_lines": False, "answer_right": False}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("documents: []\nquestions: []\n", "needs `documents` and `questions`"),
        ("documents: [{name: a, kind: k, source: s, lines: [1, 9]}]\n"
         "questions: [{doc: b, question: q, lines: [1, 1], answers: [x], split: tune}]\n", "must name one"),
        ("documents: [{name: a, kind: k, source: s, lines: [5, 9]}]\n"
         "questions: [{doc: a, question: q, lines: [2, 3], answers: [x], split: tune}]\n", "outside"),
        ("documents: [{name: a, kind: k, source: s, lines: [1, 9]}]\n"
         "questions: [{doc: a, question: q, lines: [2, 3], answers: [x], split: test}]\n", "split must be"),
        ("documents: [{name: a/b, kind: k, source: s, lines: [1, 9]}]\nquestions: [1]\n", "holds a '/'"),
        ("documents: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_question_sets_are_refused_with_one_line(tmp_path, bad, message):
    from memtx_cli.errors import MemtxError
    from memtx_cli.tasks.ask_bench import load_set

    p = tmp_path / "set.yaml"
    p.write_text(bad)
    with pytest.raises(MemtxError, match=message):
        load_set(p)


def test_bench_ask_runs_the_set_and_reuses_its_bank(tiny_gguf, bank_dir, tmp_path):
    _, _, cfg = bank_dir
    corpus = tmp_path / "corpus"
    (corpus / "books").mkdir(parents=True)
    lines = [f"Line {i}: the number of the day is {1000 + i}.\n" for i in range(1, 61)]
    (corpus / "books/days.txt").write_text("".join(lines))
    (tmp_path / "set.yaml").write_text(
        "documents: [{name: days.txt, kind: book, source: books/days.txt, lines: [11, 60]}]\n"
        "questions:\n"
        "  - {doc: days.txt, question: 'Number of day 20?', lines: [20, 20], answers: ['1020'], split: tune}\n"
        "  - {doc: days.txt, question: 'And of day 41?', lines: [41, 41], answers: ['1041'], split: held-out}\n"
    )
    common = ["bench", "ask", "--model", str(tiny_gguf), "--config", str(cfg), "--corpus", str(corpus),
              "--questions", str(tmp_path / "set.yaml"), "--workdir", str(tmp_path / "w"),
              "--max-tokens", "4"]  # fmt: skip
    r = memtx(*common, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [x["questions"] for x in res["summary"].values()] == [2, 1, 1] and "ingested 1 documents" in r.stderr
    assert all(set(row) >= {"doc_first", "gold_lines", "answer_right", "sources", "answer"} for row in res["rows"])
    assert res["rows"][0]["sources"] and all("days.txt" in s for s in res["rows"][0]["sources"])
    r = memtx(*common, "--split", "held-out")  # the kept bank is reused: nothing ingested again
    assert r.returncode == 0, r.stderr
    assert "ingested" not in r.stderr and "held-out" in r.stdout and "questions with sources" in r.stdout
    (tmp_path / "set.yaml").write_text(
        "documents: [{name: days.txt, kind: book, source: books/days.txt, lines: [11, 60]}]\n"
        "questions: [{doc: days.txt, question: q, lines: [20, 20], answers: ['1021'], split: tune}]\n"
    )
    r = memtx(*common)
    assert r.returncode == 1 and "no accepted answer" in r.stderr and "Traceback" not in r.stderr
