"""The UTF-8 bytes each token id stands for: what bits per byte is measured in.

Perplexity per token depends on the tokenizer (a larger vocabulary makes fewer, harder
tokens), so it does not compare students of different tokenizers, nor a student with a
teacher of another family. Bits per byte does: the negative log-likelihood of a text in
bits, divided by its length in UTF-8 bytes. Over the predicted positions of a row,
`bits/byte = sum(nll) / (ln 2 * sum(len(bytes(token))))`, with each predicted token's
bytes from `token_bytes`.

Two tokenizer families are read: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: each vocab
string is bytes under GPT-2's byte-to-character table) and SentencePiece-style pieces
(Llama 2, Gemma, Mistral: "▁" for a space, byte-fallback pieces `<0xNN>`). Special and
added control tokens (BOS, EOS, chat markers) stand for no text: zero bytes. Anything else
is refused with its decoder's name, rather than measured wrongly. `check_round_trip` checks
the table on real text: the bytes of a document's tokens must add up to the document's own.
Not covered: a SentencePiece tokenizer that adds a "dummy prefix" space to each text counts
that space (one byte per document more than the text has); `check_round_trip` reports such
a tokenizer, and `evaluate_text` refuses it. SentencePiece-style pieces are tested on a
BPE trained here in that style (models.train_sentencepiece_bpe: "▁", byte fallback), not
on a released SentencePiece model (none can be fetched on this machine).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterable

import numpy as np

from .errors import ConfigError


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes without a printable character of their own get 256, 257, ...
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(tok: Any) -> set[str]:
    """The types of the fast tokenizer's decoder (a Sequence's members too)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{type(tok).__name__} is not a fast (tokenizers-backed) tokenizer: bits per byte needs one")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")}
    for d in decoder.get("decoders") or []:
        kinds.add(d.get("type"))
    return {k for k in kinds if k}


def token_bytes(tok: Any) -> list[bytes]:
    """For every id of `tok`'s vocabulary (len(tok), added tokens included), the UTF-8 bytes
    it stands for in text; b"" for special tokens. ConfigError for a tokenizer whose tokens
    are not byte-level BPE or SentencePiece pieces."""
    kinds = _decoder_kinds(tok)
    specials = set(tok.all_special_ids)
    added = {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    out: list[bytes] = []
    if "ByteLevel" in kinds:
        table = _byte_level_table()
        for i, piece in enumerate(pieces):
            if i in specials or i in added or piece is None:
                out.append(b"")
                continue
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:  # an added plain-text token, stored as text
                out.append(piece.encode("utf-8"))
        return out
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        for i, piece in enumerate(pieces):
            if i in specials or i in added or piece is None:
                out.append(b"")
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out
    raise ConfigError(f"cannot measure bits per byte with this tokenizer (decoder {', '.join(sorted(kinds)) or 'none'}): "
                      "only byte-level BPE and SentencePiece-style tokenizers are read")


def byte_lengths(tok: Any) -> np.ndarray:
    """int32 [len(tok)]: the UTF-8 length of each token id (0 for special tokens)."""
    return np.array([len(b) for b in token_bytes(tok)], np.int32)


def check_round_trip(tok: Any, texts: Iterable[str], lengths: np.ndarray | None = None) -> tuple[int, int]:
    """(documents checked, documents whose tokens' bytes do not add up to their own UTF-8
    length). A tokenizer that normalises text (lower-casing, NFKC, an added leading space)
    fails here, and its bits per byte would be off by what it changed."""
    lengths = byte_lengths(tok) if lengths is None else lengths
    checked = bad = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        checked += 1
        bad += int(lengths[np.asarray(ids, np.int64)].sum()) != len(text.encode("utf-8"))
    return checked, bad




def lengths_or_none(tok: Any) -> np.ndarray | None:
    """byte_lengths, or None for a tokenizer it cannot read (bits per byte is then not
    reported; nothing else depends on it)."""
    try:
        return byte_lengths(tok)
    except ConfigError:
        return None


def predicted_bytes(tokens: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray) -> int:
    """UTF-8 bytes of the tokens a row predicts (tokens[1:]) at the positions that carry
    loss (all of them, or where mask[1:] is 1): the denominator of its bits per byte."""
    predicted = lengths[np.asarray(tokens[1:], np.int64)]
    return int(predicted.sum() if mask is None else predicted[np.asarray(mask[1:], bool)].sum())


__all__ = ["byte_lengths", "check_round_trip", "lengths_or_none", "predicted_bytes", "token_bytes"]
