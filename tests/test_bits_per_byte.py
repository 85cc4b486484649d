"""Bits per byte: each token's UTF-8 bytes, the teacher's table, and the student's evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddk_cache.capture.tokenization import cache_tokenizer, load_tokenizer
from ddk_cache.cli.main import main
from ddk_cache.errors import ConfigError
from ddk_cache.store.cache import SPLITS, Cache
from ddk_cache.tokenbytes import byte_lengths, check_round_trip, token_bytes
from ddk_cache.train.evaluate import evaluate_scores

from .helpers import make_student

HARD = [
    "héllo wörld — ünïcode: 日本語のテキスト, emoji 🙂🙂 and ℌ ﬁ",  # 2-, 3- and 4-byte characters
    "   runs   of\t\tspaces\n\n\n and newlines  ",
    "0123456789 3.14159 1e-9 2026-12-06",
    "\x00\x01 control bytes \x7f",
]


def test_token_bytes_add_up_to_every_text(teacher_dir):
    """Byte-level BPE: the bytes of a text's tokens are the text's UTF-8 bytes, on hard text
    (multi-byte characters, whitespace runs, digits, control bytes); special tokens are none."""
    tok = load_tokenizer(str(teacher_dir))
    lengths = byte_lengths(tok)
    assert len(lengths) == len(tok) and all(lengths[i] == 0 for i in tok.all_special_ids)
    assert check_round_trip(tok, HARD, lengths) == (len(HARD), 0)
    table = token_bytes(tok)
    for text in HARD:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def test_a_tokenizer_it_cannot_read_is_refused(teacher_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    with pytest.raises(ConfigError, match="cannot measure bits per byte with this tokenizer \\(decoder WordPiece\\)"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]"))


def test_teacher_bits_per_byte_counts_the_predicted_text(built_cache, teacher_dir):
    """The table's bytes are the UTF-8 length of the text each split predicts (tokens 1..L-1 of
    every row, decoded by the tokenizer itself: the test corpus is ASCII, so no row cut splits a
    character), and bits per byte is the NLL in bits over them."""
    cache, tok = Cache(str(built_cache)), load_tokenizer(str(teacher_dir))
    for d in cache.domains:
        for s in SPLITS:
            entry = cache.meta.ppl(d, s)
            tokens = cache.tokens(d, s, np.arange(cache.num_sequences(d, s)))
            want = sum(len(tok.decode(row[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for row in tokens)
            assert entry.bytes == want > 0
            assert entry.bits_per_byte == pytest.approx(entry.nll_sum / (math.log(2) * want), rel=1e-12)
    text = CliRunner().invoke(main, ["inspect", str(built_cache)]).output
    assert "teacher bits/byte" in text and f"{cache.meta.ppl('alpha', 'val').bits_per_byte:.4f}" in text


def test_student_bits_per_byte_over_the_teachers_positions(built_cache, teacher_dir, tmp_path):
    """The student is scored over the same positions as the teacher's table, so its bytes equal
    the table's, and its bits per byte is its own NLL (float64, from a direct forward pass) over
    them; `eval` prints both."""
    cache = Cache(str(built_cache))
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    scores = evaluate_scores(model, cache, byte_lengths=byte_lengths(load_tokenizer(str(student))))
    for d in cache.domains:
        x = torch.from_numpy(cache.tokens(d, "val", np.arange(cache.num_sequences(d, "val")))).long()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, x[:, 1:, None]).sum().item()
        assert scores[d]["bytes"] == cache.meta.ppl(d).bytes
        assert scores[d]["bits_per_byte"] == pytest.approx(nll / (math.log(2) * scores[d]["bytes"]), rel=1e-5)
    result = CliRunner().invoke(main, ["eval", "--cache", str(built_cache), "--model", str(student), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["student_bits_per_byte"] for r in rows] == pytest.approx([scores[d]["bits_per_byte"] for d in cache.domains], rel=1e-5)
    assert [r["teacher_bits_per_byte"] for r in rows] == [cache.meta.ppl(d).bits_per_byte for d in cache.domains]


def test_a_cache_without_bytes_says_so():
    """A cache built before the table recorded bytes (ddk-cache 0.3): bits per byte is n/a."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "legacy" / "v3-pack.zarr"
    assert Cache(str(path)).meta.ppl("alpha").bits_per_byte is None
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "teacher bits/byte" in text and "n/a" in text


def test_the_cache_holds_its_teachers_tokenizer(built_cache, teacher_dir, tmp_path):
    """A build keeps the teacher's tokenizer files in the cache (`_tokenizer/`): loaded from
    there it is the one the token ids come from (same fingerprint, same ids for any text), and
    `verify` refuses a changed copy; a cache without them says how to get them."""
    from ddk_cache.capture.tokenization import tokenizer_fingerprint
    from ddk_cache.errors import StoreError
    from ddk_cache.store.verify import verify_cache

    from .helpers import copy_cache

    cache = Cache(str(built_cache))
    stored, original = cache_tokenizer(cache), load_tokenizer(str(teacher_dir))
    assert tokenizer_fingerprint(stored) == tokenizer_fingerprint(original) == cache.meta.tokenizer["fingerprint"]
    for text in HARD:
        assert stored(text)["input_ids"] == original(text)["input_ids"]
    assert "its files in the cache" in CliRunner().invoke(main, ["inspect", str(built_cache)]).output
    out = copy_cache(built_cache, tmp_path / "c.zarr")
    vocab = json.loads((out / "_tokenizer" / "tokenizer.json").read_text())
    model_vocab = vocab["model"]["vocab"]
    a, b = list(model_vocab)[100:102]
    model_vocab[a], model_vocab[b] = model_vocab[b], model_vocab[a]  # two ids swapped
    (out / "_tokenizer" / "tokenizer.json").write_text(json.dumps(vocab))
    problems, _ = verify_cache(str(out))
    assert [p.where for p in problems] == ["_tokenizer"] and "its sha256 differs" in problems[0].what
    legacy = Cache(str(__import__("pathlib").Path(__file__).parent / "data" / "legacy" / "v3-pack.zarr"))
    with pytest.raises(StoreError, match="holds no tokenizer .*rebuild or re-import it"):
        cache_tokenizer(legacy)
