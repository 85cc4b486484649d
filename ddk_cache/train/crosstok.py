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
import torch

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
        self.t_special = _special_ids(teacher_tok)
        self.t_special_ids = np.array(sorted(self.t_special), np.int64)
        self.t_eos, self.t_bos = teacher_tok.eos_token_id, teacher_tok.bos_token_id
        self.t_names = {i: teacher_tok.convert_ids_to_tokens(i) for i in self.t_special}
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
        return self._align(*self.keys(row, student))

    def keys(self, row: np.ndarray, student: StudentRow) -> tuple[np.ndarray, np.ndarray]:
        """(teacher, student): after each token of each side, the text and documents read
        (`_prefix_keys`), comparable across the two. The student's own BOS (EOS doubling as
        BOS) is not a document end."""
        row = np.asarray(row, np.int64)
        eos = student.ids == self.s_eos
        eos[: student.prefix] = False
        return _prefix_keys(self.t_lengths[row], row == self.t_eos), _prefix_keys(student.lengths, eos)

    @staticmethod
    def _align(t_end: np.ndarray, s_end: np.ndarray) -> np.ndarray:
        """`align` from `keys`."""
        t_keys, s_keys = t_end[:-1], s_end[:-1]  # positions 0..L-2 predict a token
        j = np.searchsorted(t_keys, s_keys, side="right") - 1
        ok = (j >= 0) & (t_keys[np.maximum(j, 0)] == s_keys)
        return np.where(ok, j, -1)

    def carry_mask(self, row: np.ndarray, student: StudentRow, mask: np.ndarray) -> np.ndarray:
        """bool [len(student.ids)]: a chat row's loss mask in the student's tokens. A student
        token carries loss when the teacher token holding its last byte does (an EOS: the
        teacher's EOS of the same document)."""
        return self._carry(*self.keys(row, student), mask)

    @staticmethod
    def _carry(t_end: np.ndarray, s_end: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`carry_mask` from `keys`."""
        return np.asarray(mask, bool)[np.minimum(np.searchsorted(t_end, s_end, side="left"), len(t_end) - 1)]

    def vocab_map(self) -> np.ndarray:
        """int64 [teacher vocabulary]: the student id whose bytes are exactly the teacher
        token's, or -1. Where several student ids have the same bytes: the teacher's own id
        if it is one of them (so a student of the teacher's tokenizer maps every id to
        itself), else the lowest. Special tokens: the teacher's EOS is the student's EOS;
        others map to the student's special token of the same name, if it has one."""
        s_pieces = token_bytes(self.tok)
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(s_pieces):
            if b and b not in by_bytes:
                by_bytes[b] = i
        pieces = self.t_blob.tobytes()
        out = np.full(len(self.t_lengths), -1, np.int64)
        for t in range(len(self.t_lengths)):
            if self.t_lengths[t]:
                b = pieces[self.t_offsets[t]: self.t_offsets[t + 1]]
                out[t] = t if t < len(s_pieces) and s_pieces[t] == b else by_bytes.get(b, -1)
        s_names = {self.tok.convert_ids_to_tokens(i): i for i in _special_ids(self.tok)}
        for t in self.t_special:
            if 0 <= t < len(out):
                out[t] = s_names.get(self.t_names[t], -1) if t in self.t_names else -1
        if self.t_eos is not None and self.s_eos is not None:
            out[self.t_eos] = self.s_eos
        return out


class CrossTokenizer:
    """A batch of the cache's rows (teacher tokens and targets) as the same text in a
    student's tokens, with the teacher's targets on the student's positions: what the
    distill loader hands the loss when the student's tokenizer is not the cache's. It runs
    where the batch is read (the loader's thread or its reader processes).

    Per row: the text is tokenized again (`RowText.student_rows`); each student position is
    paired with the teacher position that has read the same text (`RowText.align`); there
    the teacher's top-k ids become student ids by `vocab_map` (-1 where a teacher token's
    bytes are no single student token: the loss puts that mass in the tail bucket, and the
    hybrid's ULD term compares it with the student's unmatched ids). Unpaired positions (a
    student boundary inside a teacher token: the teacher's distribution there is over
    tokens that start before it) get no teacher target: every entry is padding, and the
    loss gives 0 there (CE still applies). Where two teacher ids map to one student id their
    probabilities are added. A chat row's loss mask carries over by bytes: a student token
    carries loss when the teacher token holding its last byte did.

    Rows whose text does not tokenize back to its own bytes train on nothing (every label
    ignored) and are counted (`stats`); rows longer than `max_len` student tokens are cut
    there and counted.

    mode "prefix" (`--cross-tokenizer prefix`) gives unpaired positions targets too, from
    the teacher's candidates that fit the bytes read (`_prefix_targets`), and sends a
    candidate that is several student tokens to the first of them; its rows have one more
    column, the teacher's actual next token."""

    MODES = ("paired", "prefix")

    def __init__(self, teacher_tok: Any, student_tok: Any, student_vocab: int, max_len: int | None = None, mode: str = "paired") -> None:
        """`mode`: "paired" (hybrid and uld: targets on paired positions only) or "prefix"
        (every position, by the teacher's candidates that fit the bytes read: `_prefix_targets`)."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.rt = RowText(teacher_tok, student_tok)
        m = self.rt.vocab_map()
        m[m >= student_vocab] = -1
        self.map = m
        self.unmatched = np.ones(student_vocab, bool)  # student ids no teacher token maps to (the hybrid's ULD side)
        self.unmatched[m[m >= 0]] = False
        self.max_len, self.mode, self.student_vocab = max_len, mode, student_vocab
        self.pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else (self.rt.s_eos or 0)
        if mode == "prefix":
            lens = self.rt.t_lengths
            self.width = int(lens.max()) + 1
            rows = np.repeat(np.arange(len(lens)), lens)
            cols = np.arange(int(lens.sum())) - np.repeat(self.rt.t_offsets[:-1], lens)
            self.t_bytes = np.zeros((len(lens), self.width), np.uint8)  # each teacher token's bytes, zero-padded
            self.t_bytes[rows, cols] = self.rt.t_blob
            # the first 8 bytes as one big-endian integer: prefixes of up to 8 bytes compare in one op
            head = np.zeros((len(lens), 8), np.uint8)
            head[:, : min(8, self.width)] = self.t_bytes[:, :8]
            self.t_head = head.view(">u8").ravel().astype(np.uint64)
            # the student's first token of teacher token t's bytes from offset c followed by byte nb
            # (256: none), by (t * width + c) * 257 + nb; filled as pairs are first seen
            self.first_keys = np.zeros(0, np.int64)  # sorted
            self.first_ids = np.zeros(0, np.int64)

    def convert(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """SequenceReader's arrays (teacher rows) -> the same keys in the student's tokens:
        tokens [B, W] (W: the longest student row, padded), loss_mask [B, W] (False on
        padding and unusable rows), topk_ids [B, W-1, K] student ids (-1: no student id),
        topk_logprobs, tail_logprob (if stored); target_logprob and sample_logprob are not
        carried (None); `crosstok`: counts for the log (rows, unusable, cut, label positions,
        paired positions, teacher mass on mapped ids at paired positions)."""
        tokens = arrays["tokens"].numpy()
        B = tokens.shape[0]
        t_ids = arrays["topk_ids"].numpy()
        t_lps = arrays["topk_logprobs"].numpy()
        t_tail = None if arrays.get("tail_logprob") is None else arrays["tail_logprob"].numpy()
        t_mask = None if arrays.get("loss_mask") is None else arrays["loss_mask"].numpy()
        t_target = None if arrays.get("target_logprob") is None else arrays["target_logprob"].numpy()
        K = t_ids.shape[-1]
        prefix = self.mode == "prefix" and K > 0  # (a tokens-only read has no targets to carry)
        if prefix and t_target is None:
            raise ValueError("the prefix targets need the teacher's log-prob of each next token (target_logprob)")
        extra = int(prefix)  # one more column: the teacher's actual next token
        rows = self.rt.student_rows(list(tokens))
        stats = {"rows": B, "unusable": 0, "cut": 0, "positions": 0, "paired": 0, "mapped_mass": 0.0}
        lengths = []
        for r in rows:
            n = 1 if r is None else len(r.ids)
            lengths.append(min(n, self.max_len) if self.max_len else n)
        W = max(2, max(lengths))
        out_tokens = np.full((B, W), self.pad, np.int64)
        out_mask = np.zeros((B, W), bool)
        ids = np.full((B, W - 1, K + extra), -1, np.int64)
        lps = np.full((B, W - 1, K + extra), -np.inf, np.float32)
        tail = None if t_tail is None else np.zeros((B, W - 1), np.float32)
        for b, r in enumerate(rows):
            if r is None:
                stats["unusable"] += 1
                continue
            n = lengths[b]
            stats["cut"] += int(n < len(r.ids))
            out_tokens[b, :n] = r.ids[:n]
            t_end, s_end = self.rt.keys(tokens[b], r)  # once per row: pairing, mask and prefix targets
            pair = self.rt._align(t_end, s_end)[: n - 1]
            if t_mask is None:
                out_mask[b, :n] = True
            else:
                out_mask[b, :n] = self.rt._carry(t_end, s_end, t_mask[b])[:n]
            at = np.flatnonzero(pair >= 0)
            j = pair[at]
            tid = t_ids[b, j].astype(np.int64)
            known = np.isfinite(t_lps[b, j]) & (tid >= 0) & (tid < len(self.map))  # ids past the tokenizer: a padded head
            ids[b, at, :K] = np.where(known, self.map[np.where(known, tid, 0)], -1)
            lps[b, at, :K] = t_lps[b, j]
            if tail is not None:
                tail[b, at] = t_tail[b, j]
            if prefix:
                self._prefix_targets(tokens[b], t_end, s_end, n, t_ids[b], t_lps[b], t_target[b], ids[b], lps[b],
                                     None if tail is None else tail[b])
            labelled = out_mask[b, 1:n]
            stats["positions"] += int(labelled.sum())
            stats["paired"] += int(labelled[at].sum())
            p = np.where(ids[b, at] >= 0, np.exp(lps[b, at].astype(np.float64)), 0.0).sum(-1)
            stats["mapped_mass"] += float(p[labelled[at]].sum())
            if prefix:
                stats["targeted"] = stats.get("targeted", 0) + int((labelled & np.isfinite(lps[b, : n - 1]).any(-1)).sum())
        self._merge_duplicates(ids, lps)
        out = dict(arrays)
        out.update(tokens=torch.from_numpy(out_tokens), loss_mask=torch.from_numpy(out_mask), topk_ids=torch.from_numpy(ids.astype(np.int32)),
                   topk_logprobs=torch.from_numpy(lps), tail_logprob=None if tail is None else torch.from_numpy(tail),
                   target_logprob=None, sample_logprob=None, crosstok=stats)
        return out

    @staticmethod
    def _merge_duplicates(ids: np.ndarray, lps: np.ndarray) -> None:
        """Where two entries of one position name the same student id, their probabilities
        are added into one entry and the other becomes padding (the loss gathers each id
        once). In place, vectorised: entries sorted by id per position, runs summed in log space."""
        K = ids.shape[-1]
        if K < 2:
            return
        flat_ids, flat_lps = ids.reshape(-1, K), lps.reshape(-1, K)
        order = np.argsort(flat_ids, axis=-1, kind="stable")
        sid, slp = np.take_along_axis(flat_ids, order, -1), np.take_along_axis(flat_lps, order, -1)
        same = (sid[:, 1:] == sid[:, :-1]) & (sid[:, 1:] >= 0)
        rows = np.flatnonzero(same.any(-1))
        if not len(rows):
            return
        sid, slp, same = sid[rows], slp[rows], same[rows]  # only positions that have duplicates
        acc = slp.astype(np.float64)
        for c in range(1, K):  # a run's running log-sum, column by column over all positions at once
            acc[:, c] = np.where(same[:, c - 1], np.logaddexp(acc[:, c - 1], acc[:, c]), acc[:, c])
        last = np.concatenate([~same, np.ones((len(sid), 1), bool)], -1)
        flat_ids[rows] = np.where(last, sid, -1)
        flat_lps[rows] = np.where(last, acc, -np.inf).astype(flat_lps.dtype)

    def _first_pieces(self, t: np.ndarray, c: np.ndarray, nb: np.ndarray) -> np.ndarray:
        """The student's first token of teacher token t's bytes from offset c, followed by the
        byte nb that follows in the text (256: none), for arrays of (t, c, nb). The next byte
        is context: a tokenizer that merges a word with the space after it gives "cat " there,
        not "cat". The student tokenizer runs once on what was not seen before (kept for later
        batches); -1 where the bytes are not whole UTF-8 characters or give no token."""
        keys = (t.astype(np.int64) * self.width + c) * 257 + nb
        uniq, inverse = np.unique(keys, return_inverse=True)
        at = np.searchsorted(self.first_keys, uniq)
        known = (at < len(self.first_keys)) & (self.first_keys[np.minimum(at, len(self.first_keys) - 1)] == uniq) \
            if len(self.first_keys) else np.zeros(len(uniq), bool)
        if not known.all():
            todo = uniq[~known]
            found = np.full(len(todo), -1, np.int64)
            texts, where = [], []
            for n, k in enumerate(todo.tolist()):
                tc, b = divmod(k, 257)
                tt, cc = divmod(tc, self.width)
                piece = self.t_bytes[tt, cc: self.rt.t_lengths[tt]].tobytes()
                for text in (piece + bytes([b]), piece) if b < 256 else (piece,):  # the next byte only if it is a whole character
                    try:
                        texts.append(text.decode("utf-8"))
                        where.append(n)
                        break
                    except UnicodeDecodeError:
                        continue
            for n, enc in zip(where, self.rt.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []):
                if enc.ids and enc.ids[0] < self.student_vocab:
                    found[n] = enc.ids[0]
            where_new = np.searchsorted(self.first_keys, todo)  # both sorted: an insertion, not a re-sort of all seen
            self.first_keys, self.first_ids = np.insert(self.first_keys, where_new, todo), np.insert(self.first_ids, where_new, found)
            at = np.searchsorted(self.first_keys, uniq)
        return self.first_ids[at][inverse]

    def _prefix_targets(self, row: np.ndarray, t_end: np.ndarray, s_end: np.ndarray, n: int, t_ids: np.ndarray, t_lps: np.ndarray,
                        t_target: np.ndarray, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray | None) -> None:
        """`--cross-tokenizer prefix`: a target at every student position, from the teacher's
        candidates at the last teacher position j that has read no more than the student.

        Having read c more bytes than the teacher at j (c > 0: the student's boundary is inside
        the teacher's next token), the student's next token is distributed as the teacher's
        candidates at j that begin with those c bytes, each giving its probability to the
        student's first token of the rest of its bytes, divided by the total probability of
        the candidates that fit (a candidate that ends exactly there goes to the tail: what
        follows it is the next teacher position's). The teacher's actual next token always
        fits; it is added with its cached log-prob where it is not among the top-k. At c = 0
        (paired positions) a candidate that is several student tokens gives its probability to
        the first of them. Approximations: candidates outside the top-k (but the actual token)
        are unknown, and the first piece is the student's tokenization of those bytes followed
        by one byte of the text (the byte after the teacher's actual next token), not of the
        whole context. In place on ids/lps/tail [W-1, K+1] (one row); t_end, s_end: `RowText.keys`."""
        rt = self.rt
        row = np.asarray(row, np.int64)
        K = t_ids.shape[-1]
        t_keys, s_keys = t_end[:-1], s_end[:-1][: n - 1]
        j = np.searchsorted(t_keys, s_keys, side="right") - 1
        ok = j >= 0
        diff = s_keys - t_keys[np.maximum(j, 0)]
        c = diff >> 24
        same_docs = (diff & ((1 << 24) - 1)) == 0
        # the byte after the teacher's next token in the text (256: none): the context of first pieces
        after = np.full(len(row) + 2, 256, np.int64)
        after[: len(row)] = np.where(rt.t_lengths[row] > 0, self.t_bytes[row, 0], 256)
        # paired positions: candidates that are several student tokens give their mass to the first
        paired = np.flatnonzero(ok & (c == 0) & same_docs)
        if len(paired):
            jj = j[paired]
            tid = t_ids[jj].astype(np.int64)
            fine = np.isfinite(t_lps[jj]) & (tid >= 0) & (tid < len(self.map)) & (rt.t_lengths[np.clip(tid, 0, len(self.map) - 1)] > 0)
            unmapped = fine & (ids[paired, :K] < 0)
            if unmapped.any():
                first = self._first_pieces(tid[unmapped], np.zeros(int(unmapped.sum()), np.int64),
                                           np.broadcast_to(after[jj + 2][:, None], tid.shape)[unmapped])
                sub = ids[paired, :K]
                sub[unmapped] = first
                ids[paired, :K] = sub
        inside = np.flatnonzero(ok & (c > 0) & same_docs)
        if not len(inside):
            return
        jj, cc = j[inside], c[inside]
        actual = row[jj + 1]
        cand = np.concatenate([t_ids[jj].astype(np.int64), actual[:, None]], -1)  # [P, K+1]
        in_top = (t_ids[jj] == actual[:, None]) & np.isfinite(t_lps[jj])
        lp = np.concatenate([t_lps[jj], np.where(in_top.any(-1), -np.inf, t_target[jj])[:, None]], -1).astype(np.float64)
        real = np.isfinite(lp) & (cand >= 0) & (cand < len(self.map))
        cand = np.where(real, cand, 0)
        clen = rt.t_lengths[cand]
        # does each candidate begin with the c bytes read? (the first 8 as one integer; longer prefixes byte by byte)
        shift = (8 * (8 - np.minimum(cc, 8))).astype(np.uint64)[:, None]
        fits = (self.t_head[cand] >> shift) == (self.t_head[actual][:, None] >> shift)
        long = np.flatnonzero(cc > 8)
        if len(long):
            w, lc = int(cc[long].max()), cc[long]
            fits[long] &= ((self.t_bytes[cand[long], :w] == self.t_bytes[actual[long], :w][:, None, :])
                           | (np.arange(w) >= lc[:, None, None])).all(-1)
        go_on = real & fits & (clen > cc[:, None])
        end_here = real & fits & (clen == cc[:, None])
        z = _logsumexp(np.where(go_on | end_here, lp, -np.inf))
        has = np.isfinite(z)
        sid = np.full(cand.shape, -1, np.int64)
        if go_on.any():
            sid[go_on] = self._first_pieces(cand[go_on], np.broadcast_to(cc[:, None], cand.shape)[go_on],
                                            np.broadcast_to(after[jj + 2][:, None], cand.shape)[go_on])
        new_lp = np.where(go_on & has[:, None], lp - z[:, None], -np.inf)
        ids[inside] = np.where(np.isfinite(new_lp), sid, -1)
        lps[inside] = new_lp.astype(np.float32)
        if tail is not None:  # the stored tail here: the candidates that end at the boundary
            with np.errstate(divide="ignore"):
                tail[inside] = np.where(has, _logsumexp(np.where(end_here, lp, -np.inf)) - z, 0.0)


def _special_ids(tok: Any) -> set[int]:
    """A tokenizer's special ids: its declared ones and its added tokens marked special."""
    return set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis; -inf for rows of -inf only."""
    m = x.max(-1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(m), safe + np.log(np.exp(x - safe[:, None]).sum(-1)), -np.inf)


def _prefix_keys(lengths: np.ndarray, eos: np.ndarray) -> np.ndarray:
    """After each token: (UTF-8 bytes read, EOS tokens read) as one nondecreasing int64."""
    return np.cumsum(lengths) * (1 << 24) + np.cumsum(eos.astype(np.int64))


__all__ = ["CrossTokenizer", "RowText", "StudentRow"]
