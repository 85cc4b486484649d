"""The packing rule of storage_layout.md: shuffled documents, whole-document validation, fixed sequences."""

from __future__ import annotations

import numpy as np
import pytest

from ddk_cache.errors import CorpusError
from ddk_cache.capture.packing import domain_rng, pack_domain

EOS = 0


def docs_with_ids(lengths: list[int]) -> list[np.ndarray]:
    """Document j is [j*1000+1, j*1000+2, ...] followed by EOS, so every token names its document."""
    return [np.array([j * 1000 + i + 1 for i in range(n - 1)] + [EOS], np.int32) for j, n in enumerate(lengths)]


def owner(tokens: np.ndarray) -> set[int]:
    return {int(t) // 1000 for t in tokens.ravel() if t != EOS}


def test_shapes_and_disjoint_splits():
    docs = docs_with_ids([37, 5, 60, 23, 44, 18, 90, 12])
    p = pack_domain("d", docs, seq_len=16, val_sequences=2, seed=3)
    assert p.val.tokens.shape == (2, 16) and p.train.tokens.dtype == np.int32
    assert owner(p.val.tokens).isdisjoint(owner(p.train.tokens))
    total = sum(map(len, docs))
    assert p.tokens_read == total
    # Train keeps every token of the remaining documents except the tail shorter than a sequence.
    val_docs = owner(p.val.tokens)
    rest = sum(len(d) for j, d in enumerate(docs) if j not in val_docs)
    assert p.train.tokens.shape == (rest // 16, 16)


def test_train_stream_is_the_shuffled_documents_concatenated():
    docs = docs_with_ids([30, 30, 30, 30, 30])
    order = domain_rng(7, "news").permutation(len(docs))
    p = pack_domain("news", docs, seq_len=10, val_sequences=1, seed=7)
    # Validation = first 10 tokens of the first shuffled document; the rest of it is discarded.
    np.testing.assert_array_equal(p.val.tokens[0], docs[order[0]][:10])
    stream = np.concatenate([docs[i] for i in order[1:]])
    np.testing.assert_array_equal(p.train.tokens.ravel(), stream[: len(stream) // 10 * 10])
    assert p.val.documents == 1 and p.train.documents == 4


def test_deterministic_and_seeded():
    docs = docs_with_ids([20] * 12)
    a = pack_domain("x", docs, seq_len=8, val_sequences=2, seed=1)
    b = pack_domain("x", docs, seq_len=8, val_sequences=2, seed=1)
    c = pack_domain("x", docs, seq_len=8, val_sequences=2, seed=2)
    np.testing.assert_array_equal(a.train.tokens, b.train.tokens)
    assert not np.array_equal(a.train.tokens, c.train.tokens)


def test_max_tokens_caps_the_domain():
    docs = docs_with_ids([50] * 10)
    p = pack_domain("x", docs, seq_len=10, val_sequences=1, max_tokens=125)
    assert p.tokens_read == 125
    assert p.val.tokens.size + p.train.tokens.size <= 125


def test_too_few_tokens():
    with pytest.raises(CorpusError, match=r"domain 'x' has 20 tokens; it needs at least 48 \(2 validation \+ 1 training sequence of 16 tokens\)"):
        pack_domain("x", docs_with_ids([10, 10]), seq_len=16, val_sequences=2)


def test_no_training_sequence_left():
    # 40 tokens >= 2*16, but the validation document takes all of its 40 tokens' document.
    with pytest.raises(CorpusError, match="fewer than one training sequence"):
        pack_domain("x", docs_with_ids([40]), seq_len=16, val_sequences=1)


def test_no_documents():
    with pytest.raises(CorpusError, match="domain 'x' has no documents"):
        pack_domain("x", [], seq_len=16, val_sequences=1)
