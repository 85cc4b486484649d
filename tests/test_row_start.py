"""Rows start the way the teacher expects: with a tokenizer that adds a BOS, every row the
teacher scores (and the student trains on) begins with it, mid-document rows included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ddk_cache.capture.build import build
from ddk_cache.capture.tokenization import load_tokenizer, resolve_row_start
from ddk_cache.cli.main import main
from ddk_cache.models import ModelSpec, make_model_dir
from ddk_cache.store.cache import SPLITS, Cache

from .helpers import CHAT_TEMPLATE, WORDS, make_docs, small_config, write_chat_corpus
from .test_build import reference


@pytest.fixture(scope="module")
def bos_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny teacher, but its tokenizer puts a BOS of its own before every document."""
    texts = [d for dom in WORDS for d in make_docs(dom, 30)]
    spec = ModelSpec(vocab_size=400, hidden_size=32, layers=2, heads=1, max_position_embeddings=64, seed=0, add_bos=True)
    return make_model_dir(texts, tmp_path_factory.mktemp("bos-teacher") / "model", spec)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, bos_teacher: Path, corpus_dir: Path) -> dict[str, Path]:
    """The same corpus and teacher built with the default rule (auto: bos here) and with none."""
    root = tmp_path_factory.mktemp("row-start")
    out = {}
    for rule in ("auto", "none"):
        out[rule] = root / f"{rule}.zarr"
        build(small_config(bos_teacher, corpus_dir, out[rule], row_start=rule), progress=False)
    return out


def test_auto_follows_the_tokenizer(bos_teacher, teacher_dir):
    assert resolve_row_start("auto", load_tokenizer(str(bos_teacher))) == "bos"
    assert resolve_row_start("auto", load_tokenizer(str(teacher_dir))) == "none"  # the usual test tokenizer adds nothing


def test_every_row_begins_with_bos_mid_document_rows_included(caches, bos_teacher):
    cache = Cache(str(caches["auto"]))
    bos = load_tokenizer(str(bos_teacher)).bos_token_id
    assert cache.meta.row_start == "bos"
    mid_document = 0
    for domain in cache.domains:
        for split in SPLITS:
            tokens = cache.tokens(domain, split, np.arange(cache.num_sequences(domain, split)))
            assert (tokens[:, 0] == bos).all()
            # Row r + 1's first stream token is row r's last token: not a BOS means that row
            # starts inside a document, and got the BOS all the same.
            mid_document += int((tokens[:-1, -1] != bos).sum())
    assert mid_document > 10


def test_rows_hold_the_same_stream_every_token_predicted_once(caches):
    """Rows with a BOS cover the stream with a stride of L - 1: their tokens after the BOS are
    the stream that the rows without a BOS hold, shifted by one (validation: same documents)."""
    with_bos, without = Cache(str(caches["auto"])), Cache(str(caches["none"]))
    for domain in with_bos.domains:
        a = with_bos.tokens(domain, "val", np.arange(with_bos.num_sequences(domain, "val")))[:, 1:].ravel()
        b = without.tokens(domain, "val", np.arange(without.num_sequences(domain, "val"))).ravel()[1:]
        n = min(len(a), len(b))
        assert n > 30
        np.testing.assert_array_equal(a[:n], b[:n])


def test_cached_targets_are_the_teachers_log_probs_after_the_bos(caches, bos_teacher):
    cache = Cache(str(caches["auto"]))
    batch = cache.read("alpha", "train", 0, 4)
    ids, lps, tgt = reference(bos_teacher, batch.tokens, cache.top_k)
    np.testing.assert_array_equal(batch.topk_ids, ids)
    np.testing.assert_array_equal(batch.topk_logprobs, lps)
    np.testing.assert_array_equal(batch.target_logprob, tgt)
    # Not the same as scoring the rows without their BOS: the teacher saw it.
    model = AutoModelForCausalLM.from_pretrained(bos_teacher, dtype=torch.float32).eval()
    mid = batch.tokens[1:2].copy()
    mid[0, 0] = cache.tokens("alpha", "train", [0])[0, -1]  # the stream token the BOS replaced
    with torch.inference_mode():
        without = torch.log_softmax(model(torch.from_numpy(mid).long()).logits[0, :-1], -1)
    assert not np.allclose(without.gather(-1, torch.from_numpy(mid[0, 1:, None]).long())[:, 0].numpy(), batch.target_logprob[1], atol=1e-3)


def test_chat_samples_get_the_bos_too(tmp_path, bos_teacher):
    corpus = write_chat_corpus(tmp_path / "corpus")
    out = tmp_path / "chat.zarr"
    build(small_config(bos_teacher, corpus, out, seq_len=64, val_tokens=128, chat_template=CHAT_TEMPLATE), progress=False)
    cache = Cache(str(out))
    bos = load_tokenizer(str(bos_teacher)).bos_token_id
    rows = np.arange(cache.num_sequences("chat", "train"))
    tokens, mask = cache.tokens("chat", "train", rows), cache.loss_mask("chat", "train", rows)
    assert (tokens[:, 0] == bos).all() and (mask[:, 0] == 0).all()
    assert (tokens[:, 1] != bos).all()  # one BOS, not two (the template adds none)


def test_the_student_trains_and_is_evaluated_on_the_same_rows(caches, bos_teacher):
    from ddk_cache import CacheDataset

    bos = load_tokenizer(str(bos_teacher)).bos_token_id
    data = CacheDataset(str(caches["auto"]))
    assert all(int(data[i]["input_ids"][0]) == bos for i in range(len(data)))


def test_inspect_names_the_rule_and_older_caches_say_not_recorded(caches):
    result = CliRunner().invoke(main, ["inspect", str(caches["auto"])])
    assert result.exit_code == 0, result.output
    assert "row start: every row begins with BOS" in result.output
    result = CliRunner().invoke(main, ["inspect", str(caches["none"])])
    assert "row start: rows start as the token stream falls" in result.output
    legacy = Path(__file__).parent / "data" / "legacy" / "v2-plain.zarr"
    result = CliRunner().invoke(main, ["inspect", str(legacy)])
    assert result.exit_code == 0, result.output
    assert "row start: not recorded" in result.output


def test_rule_is_in_the_fingerprint(caches, bos_teacher, corpus_dir):
    from ddk_cache.errors import StoreError

    with pytest.raises(StoreError, match="--row-start: .bos. in the cache, .none. here"):
        build(small_config(bos_teacher, corpus_dir, caches["auto"], row_start="none"), progress=False)
