"""Tokenizer fingerprint and document tokenization."""

from __future__ import annotations

import numpy as np

from ddk_cache.models import train_tokenizer
from ddk_cache.capture.tokenization import load_tokenizer, tokenize_documents, tokenizer_fingerprint


def test_eos_appended_to_every_document(teacher_dir):
    tok = load_tokenizer(str(teacher_dir))
    docs = ["the market rose", "def f(x): return x", "a"]
    out = list(tokenize_documents(tok, docs, batch_size=2))
    assert len(out) == 3 and all(d.dtype == np.int32 and d[-1] == tok.eos_token_id for d in out)
    assert tok.decode(out[0][:-1]) == "the market rose"


def test_fingerprint_survives_save_and_reload(tmp_path, teacher_dir):
    tok = load_tokenizer(str(teacher_dir))
    tok.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path))) == tokenizer_fingerprint(tok)


def test_fingerprint_differs_for_another_tokenizer(teacher_dir):
    other = train_tokenizer(["completely different text " * 50], 320)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(load_tokenizer(str(teacher_dir)))
