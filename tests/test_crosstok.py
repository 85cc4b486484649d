"""A cached row as text for a model of another tokenizer, and its bits per byte (issue #26)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddk_cache.capture.tokenization import cache_tokenizer
from ddk_cache.cli.main import main
from ddk_cache.errors import DDKCacheError
from ddk_cache.store.cache import SPLITS, Cache
from ddk_cache.train.crosstok import RowText
from ddk_cache.train.evaluate import evaluate_text

from .helpers import make_docs


@pytest.fixture(scope="module")
def other_student(tmp_path_factory):
    """A random Llama whose tokenizer is trained apart from the teacher's: a smaller BPE
    vocabulary (300) with a BOS of its own."""
    from ddk_cache.models import ModelSpec, init_model, train_tokenizer

    texts = [doc for d in ("alpha", "beta", "gamma") for doc in make_docs(d, 30, seed=7)]
    tok = train_tokenizer(texts, 300, add_bos=True)
    out = tmp_path_factory.mktemp("other") / "student"
    init_model(ModelSpec(vocab_size=len(tok), hidden_size=32, layers=1, heads=1, max_position_embeddings=256, seed=3), tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_same_tokenizer_gives_back_every_row(built_cache):
    """The identity: with the cache's own tokenizer on both sides, every row tokenized again
    from its text is the row itself (EOS between documents included)."""
    cache = Cache(str(built_cache))
    tok = cache_tokenizer(cache)
    rt = RowText(tok, tok)
    for d in cache.domains:
        for s in SPLITS:
            for row in cache.tokens(d, s, np.arange(cache.num_sequences(d, s))):
                got = rt.student_row(row)
                np.testing.assert_array_equal(got.ids, row)


def test_other_tokenizer_rows_hold_the_same_text(built_cache, other_student):
    from ddk_cache.capture.tokenization import load_tokenizer

    cache = Cache(str(built_cache))
    teacher, student = cache_tokenizer(cache), load_tokenizer(str(other_student))
    rt = RowText(teacher, student)
    for row in cache.tokens("alpha", "val", np.arange(cache.num_sequences("alpha", "val"))):
        got = rt.student_row(row)
        assert got.ids[0] == student.bos_token_id and not (got.ids == teacher.eos_token_id).all()
        # the same text: every piece between EOS tokens decodes to the teacher's piece
        assert student.decode(got.ids.tolist(), skip_special_tokens=True) == teacher.decode(row.tolist(), skip_special_tokens=True)
        assert got.lengths.sum() == len(rt.text_bytes(row))


def test_bits_per_byte_of_another_tokenizer(built_cache, other_student):
    """Its NLL (float64, a direct forward pass over its own tokens of each row) per UTF-8 byte
    it predicts: with its BOS first, every byte of the rows' text; the teacher's table covers
    the same text but for each row's first token (rows here start without a BOS)."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from transformers import AutoModelForCausalLM

    cache = Cache(str(built_cache))
    student = load_tokenizer(str(other_student))
    model = AutoModelForCausalLM.from_pretrained(other_student, dtype=torch.float32)
    scores = evaluate_text(model, student, cache, batch_size=3)
    rt = RowText(cache_tokenizer(cache), student)
    for d in cache.domains:
        rows = cache.tokens(d, "val", np.arange(cache.num_sequences(d, "val")))
        nll = nbytes = 0.0
        for row in rows:
            got = rt.student_row(row)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.from_numpy(got.ids)[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, torch.from_numpy(got.ids[1:])[:, None]).sum().item()
            nbytes += len(rt.text_bytes(row))
        assert scores[d]["bytes"] == nbytes and scores[d]["unusable"] == 0 and scores[d]["truncated"] == 0
        assert scores[d]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
        assert cache.meta.ppl(d).bytes == sum(len(rt.text_bytes(row[1:])) for row in rows)
    result = CliRunner().invoke(main, ["eval", "--cache", str(built_cache), "--model", str(other_student), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["tokenizer"] == "other"
    assert [r["student_bits_per_byte"] for r in got["rows"]] == pytest.approx([scores[d]["bits_per_byte"] for d in cache.domains], rel=1e-5)
    table = CliRunner().invoke(main, ["eval", "--cache", str(built_cache), "--model", str(other_student), "--device", "cpu"])
    assert "another tokenizer than the cache's" in table.stdout and "student bits/byte" in table.stdout


def test_text_that_does_not_come_back_stops_the_evaluation(built_cache, other_student, tmp_path):
    """A tokenizer that changes the text (here: a normaliser that drops spaces) cannot be
    measured in bytes of this text: the rows are counted and the evaluation refuses."""
    from tokenizers import normalizers
    from transformers import AutoModelForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    tok = load_tokenizer(str(other_student))
    tok.backend_tokenizer.normalizer = normalizers.Replace(" ", "")
    model = AutoModelForCausalLM.from_pretrained(other_student, dtype=torch.float32)
    with pytest.raises(DDKCacheError, match=r"rows do not tokenize back to their own text with this tokenizer"):
        evaluate_text(model, tok, Cache(str(built_cache)))


def test_alignment_pairs_positions_that_read_the_same_text(built_cache, other_student):
    """With the cache's own tokenizer every position is its own partner and every id maps to
    itself; with another, a student position is paired with a teacher position exactly when
    both have read the same bytes and documents (checked against every prefix), and mapped
    ids stand for the same bytes."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.tokenbytes import token_bytes

    cache = Cache(str(built_cache))
    teacher = cache_tokenizer(cache)
    same = RowText(teacher, teacher)
    np.testing.assert_array_equal(same.vocab_map(), np.arange(len(teacher)))  # special tokens by name
    rows = cache.tokens("alpha", "train", np.arange(6))
    for row in rows:
        np.testing.assert_array_equal(same.align(row, same.student_row(row)), np.arange(len(row) - 1))
    student = load_tokenizer(str(other_student))
    rt = RowText(teacher, student)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    vmap = rt.vocab_map()
    mapped = np.flatnonzero(vmap >= 0)
    assert len(mapped) > 50 and all(t_bytes[t] == s_bytes[vmap[t]] for t in mapped if t != teacher.eos_token_id)
    paired = 0
    for row in rows:
        srow = rt.student_row(row)
        j = rt.align(row, srow)
        t_prefix = [(b"".join(t_bytes[t] for t in row[: k + 1]), int((row[: k + 1] == teacher.eos_token_id).sum())) for k in range(len(row) - 1)]
        for i, jj in enumerate(j):
            ids = srow.ids[srow.prefix: i + 1]
            s_prefix = (b"".join(s_bytes[t] for t in ids), int((ids == student.eos_token_id).sum()))
            if jj >= 0:
                assert t_prefix[jj] == s_prefix and (jj + 1 == len(t_prefix) or t_prefix[jj + 1] != s_prefix)
                paired += 1
            else:
                assert s_prefix not in t_prefix
    assert paired > len(rows) * 10  # most student positions have a partner on this corpus


# ----------------------------------------------------------------------------- training across tokenizers


def _uld_authors(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """ULD per position as the authors' code computes it (Nicolas-BZRD/llm-recipes,
    models/distillation_model.py, DistillationLoss.forward at ab6e798), transcribed: softmax
    both, sort descending, pad the smaller vocabulary with zeros, sum of |difference|."""
    student = torch.nn.functional.softmax(student_logits, dim=-1).sort(dim=-1, descending=True).values
    teacher = torch.nn.functional.softmax(teacher_logits, dim=-1).sort(dim=-1, descending=True).values
    diff_size = student.size(-1) - teacher.size(-1)
    if diff_size > 0:
        teacher = torch.nn.functional.pad(teacher, (0, diff_size), value=0)
    elif diff_size < 0:
        student = torch.nn.functional.pad(student, (0, abs(diff_size)), value=0)
    return abs(student - teacher).sum(-1)


def test_uld_is_the_authors_formula():
    """Dense ULD and sparse ULD with every id kept equal the authors' formula (float64), for
    vocabularies of different sizes; with k < V the sparse form (top-k plus one tail
    category per side) is a lower bound of it; a position without teacher entries adds 0."""
    from ddk_cache.train.losses import KDConfig, dense_kd, sparse_kd

    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    want = _uld_authors(student, teacher)
    cfg = KDConfig("uld")
    torch.testing.assert_close(dense_kd(student, teacher, cfg), want, rtol=1e-12, atol=1e-12)
    lp = torch.log_softmax(teacher, -1)
    full = sparse_kd(student, torch.arange(40).expand(6, 40), lp, cfg)
    torch.testing.assert_close(full, want, rtol=1e-12, atol=1e-12)
    # a teacher of 25 ids (another vocabulary): ids do not matter to ULD, -1 included
    small = torch.randn(6, 25, generator=g, dtype=torch.float64)
    ids = torch.full((6, 25), -1)
    torch.testing.assert_close(sparse_kd(student, ids, torch.log_softmax(small, -1), cfg), _uld_authors(student, small), rtol=1e-12, atol=1e-12)
    top = lp.topk(8, -1)
    part = sparse_kd(student, top.indices, top.values, cfg)
    assert (part <= want + 1e-12).all() and (part > 0).all()
    empty = torch.full((6, 8), float("-inf"), dtype=torch.float64)
    assert (sparse_kd(student, top.indices, empty, cfg) == 0).all()


def test_hybrid_loss_is_kd_on_mapped_ids_plus_golds_unmatched_term():
    """The hybrid: the divergence on the entries mapped to student ids, with the teacher's
    unmapped mass in the tail bucket (so: equal to the divergence on targets whose unmapped
    ids are dropped), plus GOLD's unmatched term (TRL, GOLDTrainer._compute_hybrid_uld_loss,
    transcribed for one position's full distributions): the L1 distance between the sorted
    teacher probabilities of unmapped ids and the sorted student probabilities of ids no
    teacher id maps to."""
    from ddk_cache.train.losses import KDConfig, sparse_kd

    g = torch.Generator().manual_seed(1)
    Vt, Vs = 30, 24
    vmap = torch.full((Vt,), -1)
    vmap[:18] = torch.randperm(Vs, generator=g)[:18]  # teacher ids 0..17 have a student id
    unmatched = torch.ones(Vs, dtype=torch.bool)
    unmatched[vmap[vmap >= 0]] = False
    student = torch.randn(5, Vs, generator=g, dtype=torch.float64)
    teacher_lp = torch.log_softmax(torch.randn(5, Vt, generator=g, dtype=torch.float64), -1)
    ids = vmap.expand(5, Vt)
    for kind in ("fkl", "rkl", "jsd"):
        hybrid = sparse_kd(student, ids, teacher_lp, KDConfig(kind, unmatched=unmatched))
        mapped = sparse_kd(student, torch.where(ids >= 0, ids, Vs + 1), teacher_lp, KDConfig(kind))  # unmapped: out of vocabulary
        q = torch.softmax(student, -1)
        t_un = teacher_lp.exp()[:, vmap < 0].sort(-1, descending=True).values
        s_un = q[:, unmatched].sort(-1, descending=True).values
        width = max(t_un.shape[-1], s_un.shape[-1])
        gold = (torch.nn.functional.pad(s_un, (0, width - s_un.shape[-1])) - torch.nn.functional.pad(t_un, (0, width - t_un.shape[-1]))).abs().sum(-1)
        torch.testing.assert_close(hybrid, mapped + gold, rtol=1e-12, atol=1e-12)


def test_hybrid_with_the_caches_own_tokenizer_is_plain_kd(pack_cache, teacher_dir, tmp_path):
    """The test that mapping and alignment are right: a student of the cache's tokenizer
    trained with --cross-tokenizer hybrid (rows tokenized again, positions paired, ids
    mapped) has the losses of plain KD, step by step (pack-v3: stored tails too); so does
    --cross-tokenizer prefix."""
    from ddk_cache.train.distill import distill

    from .helpers import distill_config, make_student

    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    plain = distill(distill_config(pack_cache, student, tmp_path / "plain", max_steps=3), progress=False)
    hybrid = distill(distill_config(pack_cache, student, tmp_path / "hybrid", max_steps=3, cross_tokenizer="hybrid"), progress=False)
    np.testing.assert_allclose(hybrid.losses, plain.losses, rtol=0, atol=1e-5)
    prefix = distill(distill_config(pack_cache, student, tmp_path / "prefix", max_steps=3, cross_tokenizer="prefix"), progress=False)
    np.testing.assert_allclose(prefix.losses, plain.losses, rtol=0, atol=1e-5)
    kd = [json.loads(line)["kd"] for line in open(tmp_path / "hybrid" / "metrics.jsonl") if '"step"' in line and '"kd"' in line]
    assert min(kd) > 0  # the KD term is there to compare
    rec = [json.loads(line) for line in open(tmp_path / "hybrid" / "metrics.jsonl")]
    assert [r["crosstok"]["paired"] for r in rec if r["type"] == "step"] == [1.0] * 3


def test_distill_with_another_tokenizer(built_cache, other_student, tmp_path):
    """A student of another tokenizer trains from the cache alone: its batches pair positions
    and map ids (counted in the metrics), it is evaluated in bits per byte on the cache's
    text, and DDK judges it per byte: the weights are the mixer's on 2 ** bits per byte."""
    from ddk_cache.train.distill import distill
    from ddk_cache.train.mixing import Mixer

    from .helpers import distill_config

    for method in ("auto", "uld", "prefix"):
        out = tmp_path / method
        result = distill(distill_config(built_cache, other_student, out, max_steps=4, cross_tokenizer=method), progress=False)
        assert all(math.isfinite(x) for x in result.losses) and (result.out / "config.json").exists()
        rec = [json.loads(line) for line in open(out / "metrics.jsonl")]
        steps, evals = [r for r in rec if r["type"] == "step"], [r for r in rec if r["type"] == "eval"]
        assert all(0.1 < s["crosstok"]["paired"] < 1 and s["crosstok"]["unusable_rows"] == 0 and s["kd"] > 0 for s in steps)
        if method == "prefix":  # a target nearly everywhere, not only where positions pair
            assert all(s["crosstok"]["targeted"] > max(0.9, s["crosstok"]["paired"]) for s in steps)
        cache = Cache(str(built_cache))
        mixer = Mixer("ddk", cache.domains, [cache.num_sequences(d, "train") for d in cache.domains])
        teacher = [2 ** cache.meta.ppl(d).bits_per_byte for d in cache.domains]
        for e in evals[:-1]:
            assert e["ddk_unit"] == "byte"
            w = mixer.update([2 ** e["bpb_student"][d] for d in cache.domains], teacher)
            assert list(e["weights"].values()) == pytest.approx(w.tolist(), rel=1e-9)


def test_the_loaders_targets_are_the_teachers_on_paired_positions(built_cache, other_student):
    """A converted batch: the text is the same; at each paired position the targets are the
    teacher's (log-probs as stored, ids mapped to the student id of the same bytes, or -1);
    elsewhere none; a loader with reader processes gives the same batches."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.tokenbytes import token_bytes
    from ddk_cache.train.crosstok import CrossTokenizer
    from ddk_cache.train.data import CacheLoader, SequenceReader

    cache = Cache(str(built_cache))
    teacher, student = cache_tokenizer(cache), load_tokenizer(str(other_student))
    ct = CrossTokenizer(teacher, student, len(student))
    items = [(d, s) for d in range(3) for s in range(4)]
    t = SequenceReader(cache, True).read(items)
    s = SequenceReader(cache, True, crosstok=ct).read(items)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    for b in range(len(items)):
        row = t["tokens"][b].numpy()
        srow = ct.rt.student_row(row)
        n = len(srow.ids)
        np.testing.assert_array_equal(s["tokens"][b, :n].numpy(), srow.ids)
        assert s["loss_mask"][b, :n].all() and not s["loss_mask"][b, n:].any()
        pair = ct.rt.align(row, srow)
        for i, j in enumerate(pair):
            ids, lps = s["topk_ids"][b, i].numpy(), s["topk_logprobs"][b, i].numpy()
            if j < 0:
                assert (ids == -1).all() and np.isneginf(lps).all()
                continue
            np.testing.assert_array_equal(lps, t["topk_logprobs"][b, j].numpy())
            for sid, tid in zip(ids, t["topk_ids"][b, j].numpy()):
                assert sid == -1 or s_bytes[sid] == t_bytes[tid]
    with CacheLoader(cache, batch_size=4, weights=np.ones(3), seed=5, crosstok=ct) as a, \
            CacheLoader(cache, batch_size=4, weights=np.ones(3), seed=5, crosstok=ct, workers=1) as w:
        for _ in range(2):
            x, y = a.next(), w.next()
            assert torch.equal(x.tokens, y.tokens) and torch.equal(x.topk_ids, y.topk_ids) and x.crosstok == y.crosstok


def test_chat_loss_mask_carries_over_by_bytes(chat_cache, other_student, tmp_path):
    """A student token carries loss exactly when the teacher token holding its last byte
    does (checked byte by byte), so the loss stays on the assistant's text; the evaluation
    across tokenizers scores those tokens and bytes only, and a chat cache trains a student
    of another tokenizer."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.tokenbytes import token_bytes
    from ddk_cache.train.crosstok import CrossTokenizer
    from ddk_cache.train.data import SequenceReader

    cache = Cache(str(chat_cache))
    teacher, student = cache_tokenizer(cache), load_tokenizer(str(other_student))
    ct = CrossTokenizer(teacher, student, len(student))
    d = cache.domains.index("chat")
    items = [(d, s) for s in range(6)]
    t = SequenceReader(cache, True).read(items)
    s = SequenceReader(cache, True, crosstok=ct).read(items)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    checked = 0
    for b in range(len(items)):
        row, tmask = t["tokens"][b].numpy(), t["loss_mask"][b].numpy()
        owner = []  # the teacher position of every text byte
        for k, tid in enumerate(row):
            owner += [k] * len(t_bytes[tid])
        srow = ct.rt.student_row(row)
        at = 0
        for k, sid in enumerate(srow.ids):
            at += len(s_bytes[sid])
            if len(s_bytes[sid]):
                assert bool(s["loss_mask"][b, k]) == bool(tmask[owner[at - 1]])
                checked += 1
        assert 0 < s["loss_mask"][b].sum() < len(srow.ids)  # prompts are masked, responses are not
    assert checked > 100
    # the evaluation across tokenizers scores the same tokens: NLL and bytes of the carried-over mask only
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(other_student, dtype=torch.float32)
    scores = evaluate_text(model, student, cache, batch_size=3)["chat"]
    nll = nbytes = 0.0
    n = cache.num_sequences("chat", "val")
    rows, masks = cache.tokens("chat", "val", np.arange(n)), cache.loss_mask("chat", "val", np.arange(n))
    for row, m in zip(rows, masks):
        srow = ct.rt.student_row(row)
        on = torch.from_numpy(ct.rt.carry_mask(row, srow, m)[1:])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.from_numpy(srow.ids)[None]).logits[0, :-1].double(), -1)
        nll -= logp.gather(-1, torch.from_numpy(srow.ids[1:])[:, None]).squeeze(-1)[on].sum().item()
        nbytes += float(srow.lengths[1:][on.numpy()].sum())
    assert 0 < scores["bytes"] == nbytes and scores["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    run = distill(distill_config(chat_cache, other_student, tmp_path / "run", max_steps=2), progress=False)
    evals = [json.loads(line) for line in open(run.out.parent / "metrics.jsonl") if '"eval"' in line]
    assert all(e["bpb_student"]["chat"] > 0 and e["ddk_unit"] == "byte" for e in evals)


HARD = ["naïve café — 中文字符 and emoji 🙂🚀 mixed", "tabs\t\tand   runs of    spaces\n\n\nnew lines",
        "digits 1234567890 and 3.14159, 2026-12-07", "ﬁ ligature, combining é (e\u0301), zero\u200bwidth"]


def test_alignment_on_hard_text(teacher_dir):
    """Multi-byte UTF-8 (characters split across byte tokens: byte-level BPE's bytes, and a
    SentencePiece-style tokenizer's byte fallback `<0xNN>`), whitespace runs, digits one by one
    (another pre-tokenization): every row comes back as its text, and positions pair exactly
    where both sides have read the same bytes (checked against every prefix)."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.models import train_sentencepiece_bpe, train_tokenizer
    from ddk_cache.tokenbytes import token_bytes

    teacher = load_tokenizer(str(teacher_dir))
    docs = [h * 2 for h in HARD]
    sp = train_sentencepiece_bpe([d.replace("🙂", "") for d in docs] + make_docs("alpha", 10), 200)
    assert any(p.startswith("<0x") for p in sp.convert_ids_to_tokens(sp(HARD[0], add_special_tokens=False)["input_ids"]))  # fell back
    for student in (train_tokenizer(docs + make_docs("alpha", 10), 300, add_bos=True), train_tokenizer(docs, 280, digits=True), sp):
        rt = RowText(teacher, student)
        t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
        row = np.array([i for h in HARD for i in teacher(h, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]])
        srow = rt.student_row(row)
        assert srow is not None
        assert b"".join(s_bytes[i] for i in srow.ids) == b"".join(t_bytes[i] for i in row)
        t_prefix = {}
        for k in range(len(row) - 1):
            key = (b"".join(t_bytes[t] for t in row[: k + 1]), int((row[: k + 1] == teacher.eos_token_id).sum()))
            t_prefix[key] = k  # the last teacher position with this prefix
        for i, j in enumerate(rt.align(row, srow)):
            ids = srow.ids[srow.prefix: i + 1]
            key = (b"".join(s_bytes[t] for t in ids), int((ids == student.eos_token_id).sum()))
            assert j == t_prefix.get(key, -1)


def test_readme_a_student_with_another_tokenizer_runs(built_cache, other_student, tmp_path, monkeypatch):
    """README's "A student with another tokenizer": its commands, on a cache and a student of
    another tokenizer made here (short runs)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## A student with another tokenizer"):]
    section = section[: section.index("\n## ", 1)]
    commands = [line.split("#")[0].split() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["ddk-cache", "distill"]] * 2 + [["ddk-cache", "eval"]]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache.zarr").symlink_to(built_cache)
    (tmp_path / "other-student").symlink_to(other_student)
    short = ["--max-steps", "2", "--batch-size", "2", "--ddk-interval", "1", "--eval-batch-size", "4", "--warmup-steps", "1",
             "--device", "cpu", "--quiet"]
    for command in commands:
        argv = command[1:] + (short if command[1] == "distill" else ["--device", "cpu"])
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
    assert "student bits/byte" in result.stdout and "another tokenizer than the cache's" in result.stdout
    rec = [json.loads(line) for line in open(tmp_path / "runs" / "other" / "metrics.jsonl")]
    assert all(r["ddk_unit"] == "byte" for r in rec if r["type"] == "eval") and any("crosstok" in r for r in rec)


def test_rows_that_do_not_come_back_train_on_nothing_and_stop_the_run(built_cache, other_student, tmp_path):
    """A student tokenizer that changes the text (a normaliser dropping spaces): its rows are
    counted as unusable and carry no label; once more than 1% of the rows read are, training
    stops with the count and what to do (here the first evaluation already stops it)."""
    from types import SimpleNamespace

    from tokenizers import normalizers

    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.train.crosstok import CrossTokenizer
    from ddk_cache.train.data import SequenceReader
    from ddk_cache.train.distill import distill
    from ddk_cache.train.trainer import Trainer

    from .helpers import distill_config

    cache = Cache(str(built_cache))
    tok = load_tokenizer(str(other_student))
    tok.backend_tokenizer.normalizer = normalizers.Replace(" ", "")
    got = SequenceReader(cache, True, crosstok=CrossTokenizer(cache_tokenizer(cache), tok, len(tok))).read([(0, 0), (1, 1)])
    assert got["crosstok"]["unusable"] == 2 and not got["loss_mask"].any()
    counts = dict.fromkeys(("rows", "unusable", "cut", "positions", "paired"), 0) | {"mapped_mass": 0.0}
    fake = SimpleNamespace(xtok_counts=dict(counts), MAX_UNUSABLE=0.01, cfg=SimpleNamespace(tokenizer="", student="s/"))
    Trainer._count_crosstok(fake, [SimpleNamespace(crosstok=dict(counts, rows=50, unusable=1))], 100, 1)  # 1% of all ranks' rows: goes on
    with pytest.raises(DDKCacheError, match=r"3 of the 200 rows read so far do not tokenize back to their own text"):
        Trainer._count_crosstok(fake, [SimpleNamespace(crosstok=dict(counts, rows=50, unusable=0))], 100, 2)  # judged on the global counts
    tok.save_pretrained(tmp_path / "normalising")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(other_student).save_pretrained(tmp_path / "normalising")
    with pytest.raises(DDKCacheError, match=r"rows do not tokenize back to their own text with this tokenizer"):
        distill(distill_config(built_cache, tmp_path / "normalising", tmp_path / "run"), progress=False)


def test_mass_of_ids_past_the_student_vocabulary_joins_a_stored_tail():
    """Pack-v3 stores the teacher's tail; kept ids the student has no row for (a teacher with
    a larger vocabulary, or -1: no student id) are dropped, and their mass must join that
    tail (it was lost before: the teacher's categories summed to less than 1). Checked
    against the bucket categories written out in float64."""
    from ddk_cache.train.losses import KDConfig, sparse_kd

    g = torch.Generator().manual_seed(3)
    V = 12
    student = torch.randn(4, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(4, V + 3, generator=g, dtype=torch.float64), -1)  # 3 ids past the student's
    top = teacher.topk(8, -1)
    ids = top.indices.clone()
    ids[:, 1] = -1  # and one entry without a student id
    stored_tail = torch.log1p(-top.values.exp().sum(-1))
    for kind in ("fkl", "rkl", "jsd"):
        got = sparse_kd(student, ids, top.values, KDConfig(kind), tail_logprob=stored_tail)
        keep = (ids >= 0) & (ids < V)
        q = torch.softmax(student, -1)
        for n in range(4):
            P = top.values[n][keep[n]].exp()
            Q = q[n][ids[n][keep[n]]]
            P, Q = torch.cat([P, (1 - P.sum())[None]]), torch.cat([Q, (1 - Q.sum())[None]])
            want = {"fkl": (P * (P / Q).log()).sum(), "rkl": (Q * (Q / P).log()).sum(),
                    "jsd": 0.5 * (P * (P / (0.5 * P + 0.5 * Q)).log()).sum() + 0.5 * (Q * (Q / (0.5 * P + 0.5 * Q)).log()).sum()}[kind]
            assert float(got[n]) == pytest.approx(float(want), rel=1e-9)


def test_prefix_targets_are_the_fitting_candidates_by_first_student_token(pack_cache, other_student):
    """--cross-tokenizer prefix, checked position by position against a direct computation
    with strings: the last teacher position j that has read no more bytes than the student;
    the bytes read since (c); the teacher's top-k at j and its actual next token; those whose
    bytes begin with the c bytes read and go on give their probability to the student's first
    token of the rest (the student tokenizer on that text alone), divided by the probability
    of all that fit (ending there included); at c = 0 every candidate fits, and one that is a
    student token keeps its own id."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.tokenbytes import token_bytes
    from ddk_cache.train.crosstok import CrossTokenizer
    from ddk_cache.train.data import SequenceReader

    cache = Cache(str(pack_cache))
    teacher, student = cache_tokenizer(cache), load_tokenizer(str(other_student))
    ct = CrossTokenizer(teacher, student, len(student), mode="prefix")
    items = [(d, s) for d in range(3) for s in range(2)]
    t = SequenceReader(cache, True).read(items)
    s = SequenceReader(cache, True, crosstok=ct).read(items)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    s_ids = {b: i for i, b in reversed(list(enumerate(s_bytes))) if b}
    inside = 0
    for b in range(len(items)):
        row = t["tokens"][b].numpy()
        srow = ct.rt.student_row(row)
        # (bytes read, documents read) after each token, as one number: EOS ends a document
        t_read = np.cumsum([len(t_bytes[x]) for x in row]) * 1000 + np.cumsum(row == teacher.eos_token_id)
        s_eos = (srow.ids == student.eos_token_id) & (np.arange(len(srow.ids)) >= srow.prefix)
        s_read = np.cumsum([len(s_bytes[x]) for x in srow.ids]) * 1000 + np.cumsum(s_eos)
        for i in range(len(srow.ids) - 1):
            j = int(np.searchsorted(t_read[:-1], s_read[i], side="right")) - 1
            if j < 0 or (s_read[i] - t_read[j]) % 1000:
                continue
            c = int(s_read[i] - t_read[j]) // 1000
            actual = int(row[j + 1])
            read = t_bytes[actual][:c]
            cands = list(zip(t["topk_ids"][b, j].tolist(), t["topk_logprobs"][b, j].double().tolist()))
            if c > 0 and actual not in [x for x, lp in cands if math.isfinite(lp)]:
                cands.append((actual, float(t["target_logprob"][b, j])))
            want, total = {}, 0.0
            for x, lp in cands:
                piece = t_bytes[x]
                if math.isfinite(lp) and not piece and c == 0 and ct.map[x] >= 0:  # a special token: by name (vocab_map)
                    want[int(ct.map[x])] = want.get(int(ct.map[x]), 0.0) + math.exp(lp)
                if not math.isfinite(lp) or not piece or not piece.startswith(read):
                    continue
                total += math.exp(lp)
                if len(piece) == c:
                    continue
                rest = piece[c:]
                sid = s_ids.get(rest) if c == 0 and rest in s_ids else None
                follow = t_bytes[int(row[j + 2])][:1] if j + 2 < len(row) else b""  # the next byte of the text: context
                for text in (rest + follow, rest):
                    if sid is not None:
                        break
                    try:
                        enc = student(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
                        sid = enc[0] if enc else -1
                    except UnicodeDecodeError:
                        sid = -1 if text == rest else None
                want[sid] = want.get(sid, 0.0) + math.exp(lp)
            got = {}
            for x, lp in zip(s["topk_ids"][b, i].tolist(), s["topk_logprobs"][b, i].double().tolist()):
                if math.isfinite(lp):
                    got[x] = got.get(x, 0.0) + math.exp(lp)
            scale = 1.0 if c == 0 else total
            assert got.keys() - {-1} == want.keys() - {-1}
            for sid in want.keys() - {-1}:
                assert got[sid] == pytest.approx(want[sid] / scale, rel=1e-4), (b, i, c, sid)
            inside += c > 0
    assert inside > 20  # positions inside a teacher token were checked
