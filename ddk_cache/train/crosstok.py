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
    special tokens). Position i predicts ids[i + 1], whose text is lengths[i + 1] bytes.
    `prefix`: tokens put in front that the teacher's row does not have (the student's BOS)."""

    ids: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]
    prefix: int = 0


class RowText:
    """Turns rows of the teacher's ids into rows of the student tokenizer's ids."""

    def __init__(self, teacher_tok: Any, student_tok: Any) -> None:
        pieces = token_bytes(teacher_tok)
        self.t_lengths = np.array([len(p) for p in pieces], np.int64)
        self.t_offsets = np.concatenate([[0], np.cumsum(self.t_lengths)])
        self.t_blob = np.frombuffer(b"".join(pieces), np.uint8)
        self.t_special = set(teacher_tok.all_special_ids) | {i for i, t in getattr(teacher_tok, "added_tokens_decoder", {}).items()
                                                             if getattr(t, "special", False)}
        self.t_special_ids = np.array(sorted(self.t_special), np.int64)
        self.t_eos, self.t_bos = teacher_tok.eos_token_id, teacher_tok.bos_token_id
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
        teacher's EOS as the student's EOS; other special tokens dropped), or None where a run
        of text does not tokenize back to its own bytes."""
        return self.student_rows([row])[0]

    def student_rows(self, rows: list[np.ndarray] | np.ndarray) -> list[StudentRow | None]:
        """`student_row` for many rows, with one call of the tokenizer for all their runs of
        text (its Rust side batches them; a call per run cost 0.5 ms)."""
        plans: list[list[tuple[bool, object]]] = []
        texts: list[str] = []
        for row in rows:
            row = np.asarray(row, np.int64)
            special = np.isin(row, self.t_special_ids)
            bounds = np.flatnonzero(np.diff(special.astype(np.int8))) + 1
            plan: list[tuple[bool, object]] = []
            for run in np.split(np.arange(len(row)), bounds):
                if not len(run):
                    continue
                if special[run[0]]:
                    # Text rows hold no padding (packed); a chat row's padding would be EOS here too.
                    plan.append((False, [self.s_eos] * int((row[run] == self.t_eos).sum()) if self.s_eos is not None else []))
                else:
                    plan.append((True, len(texts)))
                    texts.append(self.text_bytes(row[run]).decode("utf-8", errors="ignore"))  # a character cut at the row's edge
            plans.append(plan)
        encoded = self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        out: list[StudentRow | None] = []
        for plan in plans:
            ids: list[int] = [self.s_bos] if self.s_bos is not None else []
            ok = True
            for is_text, item in plan:
                if not is_text:
                    ids += item  # type: ignore[operator]
                    continue
                got = encoded[item].ids  # type: ignore[index]
                if int(self.s_lengths[np.asarray(got, np.int64)].sum()) != len(texts[item].encode("utf-8")):  # type: ignore[index]
                    ok = False
                    break
                ids += got
            if not ok:
                out.append(None)
                continue
            arr = np.asarray(ids, np.int64)
            out.append(StudentRow(arr, self.s_lengths[arr], int(self.s_bos is not None)))
        return out

    def align(self, row: np.ndarray, student: StudentRow) -> np.ndarray:
        """int64 [len(student.ids) - 1]: for each student position i (after reading
        student.ids[: i + 1]), the teacher position j (after reading row[: j + 1]) that has read
        exactly the same text and the same documents (EOS tokens), or -1 where none has: a
        student token boundary inside a teacher token. Both then predict what follows the
        same prefix. Where the teacher reads tokens the student's row leaves out (padding,
        other special tokens), the last such position is taken: the one that goes on to the
        next text."""
        row = np.asarray(row, np.int64)
        t_keys = _prefix_keys(self.t_lengths[row], row == self.t_eos)[:-1]  # positions 0..L-2 predict a token
        eos = student.ids == self.s_eos
        eos[: student.prefix] = False  # the student's own BOS (EOS doubling as BOS) is not the teacher's
        s_keys = _prefix_keys(student.lengths, eos)[:-1]
        j = np.searchsorted(t_keys, s_keys, side="right") - 1
        ok = (j >= 0) & (t_keys[np.maximum(j, 0)] == s_keys)
        return np.where(ok, j, -1)

    def vocab_map(self) -> np.ndarray:
        """int64 [teacher vocabulary]: the student id whose bytes are exactly the teacher
        token's, or -1 (special tokens: the teacher's EOS is the student's EOS; others -1).
        Where several student ids have the same bytes, the lowest."""
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(token_bytes(self.tok)):
            if b and b not in by_bytes:
                by_bytes[b] = i
        pieces = self.t_blob.tobytes()
        out = np.full(len(self.t_lengths), -1, np.int64)
        for t in range(len(self.t_lengths)):
            if self.t_lengths[t]:
                out[t] = by_bytes.get(pieces[self.t_offsets[t]: self.t_offsets[t + 1]], -1)
        if self.t_eos is not None and self.s_eos is not None:
            out[self.t_eos] = self.s_eos
        return out


def _prefix_keys(lengths: np.ndarray, eos: np.ndarray) -> np.ndarray:
    """After each token: (UTF-8 bytes read, EOS tokens read) as one nondecreasing int64."""
    return np.cumsum(lengths) * (1 << 24) + np.cumsum(eos.astype(np.int64))


__all__ = ["RowText", "StudentRow"]
