"""A cached row as text, tokenized again for a model with another tokenizer (issue #26).

The cache stores the teacher's token ids; with the teacher's tokenizer (kept in the cache,
`capture.tokenization.cache_tokenizer`) each id's UTF-8 bytes are known (tokenbytes.py), so a row is text
again: runs of text tokens become strings, and the special tokens between them (EOS
between packed documents, a leading BOS) become the other tokenizer's own. Each run is
tokenized by the other tokenizer; a run whose tokens do not add up to its bytes (a
normaliser, an added space, an unknown byte) makes the row *unusable*, counted, never
silently wrong.

Cut characters: a row starts and ends where the token stream was cut, which can be inside
a multi-byte character (byte-level BPE splits them); those partial bytes at a run's edges
are dropped, and the bytes counted are the text's own after that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..capture.tokenization import adds_bos
from ..tokenbytes import byte_lengths, token_bytes


@dataclass
class StudentRow:
    """One cached row in the other tokenizer: its ids and each id's UTF-8 bytes (0 for
    special tokens). Position i predicts ids[i + 1], whose text is lengths[i + 1] bytes."""

    ids: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]


class RowText:
    """Turns rows of the teacher's ids into rows of the student tokenizer's ids."""

    def __init__(self, teacher_tok: Any, student_tok: Any) -> None:
        pieces = token_bytes(teacher_tok)
        self.t_lengths = np.array([len(p) for p in pieces], np.int64)
        self.t_offsets = np.concatenate([[0], np.cumsum(self.t_lengths)])
        self.t_blob = np.frombuffer(b"".join(pieces), np.uint8)
        self.t_special = set(teacher_tok.all_special_ids) | {i for i, t in getattr(teacher_tok, "added_tokens_decoder", {}).items()
                                                             if getattr(t, "special", False)}
        self.t_eos, self.t_bos = teacher_tok.eos_token_id, teacher_tok.bos_token_id
        self.t_pad = teacher_tok.pad_token_id
        self.tok = student_tok
        self.s_lengths = byte_lengths(student_tok).astype(np.int64)
        self.s_eos = student_tok.eos_token_id
        self.s_bos = student_tok.bos_token_id if adds_bos(student_tok) else None

    def text_bytes(self, row: np.ndarray) -> bytes:
        """The UTF-8 bytes of a row's text tokens (special tokens stand for none)."""
        row = np.asarray(row, np.int64)
        lens = self.t_lengths[row]
        starts = self.t_offsets[row]
        if not lens.sum():
            return b""
        idx = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        return self.t_blob[idx].tobytes()

    def student_row(self, row: np.ndarray) -> StudentRow | None:
        """The row in the student's tokens (its BOS first when its tokenizer adds one; the
        teacher's EOS as the student's EOS; padding and other special tokens dropped), or None
        where a run of text does not tokenize back to its own bytes."""
        row = np.asarray(row, np.int64)
        ids: list[int] = [self.s_bos] if self.s_bos is not None else []
        special = np.isin(row, list(self.t_special))
        bounds = np.flatnonzero(np.diff(special.astype(np.int8))) + 1
        for run in np.split(np.arange(len(row)), bounds):
            if not len(run):
                continue
            if special[run[0]]:
                ids += [self.s_eos for t in row[run] if t == self.t_eos and t != self.t_pad and self.s_eos is not None]
                continue
            text = self.text_bytes(row[run]).decode("utf-8", errors="ignore")  # a character cut at the row's edge
            got = self.tok(text, add_special_tokens=False)["input_ids"]
            if int(self.s_lengths[np.asarray(got, np.int64)].sum()) != len(text.encode("utf-8")):
                return None
            ids += got
        out = np.asarray(ids, np.int64)
        return StudentRow(out, self.s_lengths[out])


__all__ = ["RowText", "StudentRow"]
