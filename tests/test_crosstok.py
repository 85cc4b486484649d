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
    want = np.arange(len(teacher))
    want[[i for i in teacher.all_special_ids if i != teacher.eos_token_id]] = -1  # padding stands for no text
    np.testing.assert_array_equal(same.vocab_map(), want)
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
