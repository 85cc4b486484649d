"""The `pack-v3` target codec: one sequence's top-k teacher targets <-> one byte string, every
kept probability (and the tail) to a bounded *relative* error.

storage_layout.md ("Encoding pack-v3") specifies the bytes; this module is their only
writer. Why a new codec: pack-v2 bounds the forward KL of each position, which leaves a
small probability's *log* far off (its sqrt-scale bins are absolute). Forward KL does not
mind; reverse KL, AKL, the skew KLs and JSD weight the student's mass by log p and do:
from a default pack-v2 cache of a peaked teacher their gradients pointed elsewhere.

What pack-v3 stores, per position, in rank order (entry 0 = the top-1):

  * the kept ids, exactly;
  * each kept entry's log-ratio to the top-1, r_j = log p_1 - log p_j >= 0, quantised on a
    companded scale F(r) = r up to the knee r0, r0 (1 + log(r / r0)) beyond, with step
    `step` in F: an absolute log error of step/2 for entries within e^r0 of the top-1, and a
    relative one (step / (2 r0)) of r further down, where the student's log q - log p is
    as large;
  * the tail's log-ratio r_t = log p_1 - log(1 - sum kept p) (of either sign) on the plain
    step: the tail holds most of a far-off student's mass, and its reverse-KL terms nearly
    cancel there, so it gets the absolute bound (one value per position);
  * the target token's log-prob as a reference into the kept entries (slot + 1), or its
    exact float32 value.

Decoding is a softmax over the kept entries and the tail: the decoded values are a
distribution by construction (positive, summing to 1) and 1 - p_1 keeps its relative
precision even at p_1 = 1 - 1e-9. The encoder checks, in float64 at every position, that
each decoded log-probability is within step * max(1, r / r0) of the teacher's (the tail's
within step), and halves that position's step (at most MAX_REFINE times) where it is not.

Sampled targets are stored exactly as pack-v2 stores them (their counts are exact); a
pack-v3 row of sampled targets is a pack-v2 frame.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .pack2 import HEADER, MAX_ENTRIES, Pack2Codec, _gather_planes, _nbytes, _planes, _unplanes, _workspace

VERSION = 3
DEFAULT_STEP = 2.0**-9  # in F: |log error| <= 2^-10 ~ 0.1% of each probability near the top
DEFAULT_KNEE = 4.0  # r0: entries within e^4 ~ 55x of the top-1 get the absolute step
MAX_REFINE = 12
HAS_TAIL = 1
REFINE_SHIFT = 2  # per-position flag bits 2..7: the step exponent e (step / 2^e)
MAX_R = 160.0  # log-ratios are clipped here (float32 log-probs end near -104)


def compand(r: np.ndarray, knee: float) -> np.ndarray:
    """F(r) = r up to the knee, knee * (1 + log(r / knee)) beyond (continuous, slope 1 at the knee)."""
    return np.where(r <= knee, r, knee * (1.0 + np.log(np.maximum(r, knee) / knee)))


def expand(f: np.ndarray, knee: float) -> np.ndarray:
    """The inverse of `compand`."""
    return np.where(f <= knee, f, knee * np.exp(np.minimum(f, 1e3) / knee - 1.0))


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 in float64 (-inf at 0): Maechler's two branches."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > -0.6931, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _jit():  # noqa: ANN202
    """pack3_jit (the compiled row decoder), or None where numba is missing or DDK_CACHE_JIT=0."""
    global _JIT
    if _JIT is False:
        try:
            from . import pack3_jit
        except ImportError:
            pack3_jit = None
        _JIT = pack3_jit
    return None if os.environ.get("DDK_CACHE_JIT", "1") == "0" else _JIT


_JIT = False  # not imported yet

RUN_MAX = 128  # _running_sums' widest row: its product costs O(K) per entry, numpy's cumsum O(1)


def _running_sums(steps: np.ndarray, ws) -> np.ndarray | None:
    """int32 [N, K]: 0, then each row's running sum of its K - 1 steps (float32 [N, K - 1]
    holding integers in [0, 2^16)), or None where a row's total reaches 2^24.

    One float32 product with an upper-triangular matrix of ones (BLAS): numpy's cumsum along
    rows this short is 2.7x slower at K = 64 (measured; even at K = RUN_MAX). Exact below
    that total: every partial sum is an integer no larger than the total, so each is
    represented exactly in whatever order BLAS adds."""
    n, k = steps.shape[0], steps.shape[1] + 1
    upper = ws.constants.get(("upper", k))
    if upper is None:
        upper = ws.constants[("upper", k)] = np.triu(np.ones((k - 1, k), np.float32), 1)
    sums = ws.array("sums3", (n, k), np.float32)
    np.matmul(steps, upper, out=sums)
    if n and float(sums[:, -1].max()) >= 2.0**24:  # the last entry is each row's total (steps are >= 0)
        return None
    lv = ws.array("lv3", (n, k), np.int32)
    np.copyto(lv, sums, casting="unsafe")
    return lv


class Pack3Codec(Pack2Codec):
    """Encode and decode sequences of P positions holding at most `max_entries` entries each
    (sampled targets: pack-v2's frames, see the module docstring)."""

    frame_versions = (2, 3)

    def __init__(self, *, vocab_size: int, max_entries: int, step: float = DEFAULT_STEP, knee: float = DEFAULT_KNEE,
                 sampled: bool = False, sample_logp: bool = False, exact_target: bool = False, id_level: int = 7) -> None:
        super().__init__(vocab_size=vocab_size, max_entries=max_entries, kl_budget=1e-4, sampled=sampled,
                         sample_logp=sample_logp, exact_target=exact_target, id_level=id_level)
        if not 0 < step <= 0.5:
            raise ValueError(f"pack-v3 step must be in (0, 0.5], got {step}")
        if not 0 < knee <= 64:
            raise ValueError(f"pack-v3 knee must be in (0, 64], got {knee}")
        self.step, self.knee = float(step), float(knee)
        self.f_max = float(compand(np.array(MAX_R), self.knee))
        self._neg_r_table: np.ndarray | None = None
        self._jit_tables: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ sizes
    def capacity(self, positions: int) -> int:
        """The most bytes a frame can take (zstd's bound on every stream; sampled rows too)."""
        P, K = positions, self.max_entries
        bound = lambda n: n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0) + 64  # noqa: E731
        streams = [P * (2 * self.count_bytes + 1 + 4), P * K * self.id_bytes, P * K * 4, 4 * P]
        return max(super().capacity(positions), HEADER.size + 8 * len(streams) + sum(bound(n) for n in streams))

    # ------------------------------------------------------------------ top-k
    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray, target_logprob: np.ndarray, next_tokens: np.ndarray,
                    tail_logprob: np.ndarray | None = None) -> bytes:
        """ids int [P, K] and float log-probs [P, K] in rank order (entry 0 = top-1), -inf where
        an entry is not kept (adaptive k); the teacher's log-prob of each next token [P], the
        next tokens [P]; `tail_logprob` [P], if the engine knows it exactly, the log of the
        teacher's mass outside the kept entries (default: 1 - their sum, in float64; -inf:
        none, e.g. every id kept)."""
        P, K = ids.shape
        lp = np.asarray(logprobs, np.float64)
        if np.isnan(lp).any() or np.isposinf(lp).any() or not np.isfinite(lp[:, 0]).all():
            bad = int(np.flatnonzero(~np.isfinite(lp[:, 0]) | np.isnan(lp).any(1) | np.isposinf(lp).any(1))[0])
            raise ValueError(f"pack-v3: non-finite teacher log-probability at position {bad} "
                             f"(top-1 {lp[bad, 0]!r}); the teacher's output is broken there")
        keep = np.isfinite(lp)
        if ((lp[:, 1:] > lp[:, :-1]) & keep[:, 1:]).any() or (keep[:, 1:] & ~keep[:, :-1]).any():
            order = np.argsort(-np.where(keep, lp, -np.inf), axis=1, kind="stable")  # rank order, dropped entries last
            ids, lp, keep = (np.take_along_axis(a, order, 1) for a in (np.asarray(ids), lp, keep))
        n = keep.sum(1)
        with np.errstate(under="ignore", over="ignore"):
            kept_lse = np.logaddexp.reduce(np.where(keep, lp, -np.inf), axis=1)
        if tail_logprob is None:
            tail = log1mexp(np.minimum(kept_lse, 0.0)) if K < self.vocab_size or (n < K).any() else np.full(P, -np.inf)
            if K >= self.vocab_size:
                tail = np.where(n < K, tail, -np.inf)
        else:
            tail = np.asarray(tail_logprob, np.float64)
            if np.isnan(tail).any() or np.isposinf(tail).any():
                raise ValueError("pack-v3: non-finite tail log-probability from the teacher")
        has_tail = np.isfinite(tail)
        top = lp[:, 0]
        r = np.where(keep, np.clip(top[:, None] - lp, 0.0, MAX_R), 0.0)
        rt = np.where(has_tail, np.clip(top - tail, -MAX_R, MAX_R), 0.0)
        # The teacher's own log-probs, renormalised over kept + tail (what decoding targets).
        with np.errstate(divide="ignore", under="ignore"):
            z = np.log1p(np.where(keep[:, 1:], np.exp(-r[:, 1:]), 0.0).sum(1) + np.where(has_tail, np.exp(-rt), 0.0))
        exact, exact_t = -r - z[:, None], -rt - z
        f = compand(r, self.knee)
        neg_t = rt < 0
        # Allowed error per value: step * max(1, r / r0) for entries; step for the tail, which
        # holds most of a far-off student's mass (its reverse-KL terms nearly cancel there).
        tol = self.step * np.maximum(1.0, r / self.knee)
        tol_t = np.full(P, self.step)

        levels = np.zeros((P, K), np.int64)
        tail_level = np.zeros(P, np.int64)
        exponent = np.zeros(P, np.int64)
        todo = np.arange(P)
        for e in range(MAX_REFINE + 1):
            h = self.step / 2.0**e
            sel = slice(None) if e == 0 else todo
            lv = np.where(keep[sel], np.rint(f[sel] / h), 0).astype(np.int64)
            lv[:, 0] = 0
            tl = np.rint(np.abs(rt[sel]) / h).astype(np.int64)
            r_hat = expand(lv * h, self.knee)
            rt_hat = np.where(neg_t[sel], -tl * h, tl * h)
            with np.errstate(under="ignore", over="ignore"):
                zh = np.log1p(np.where(keep[sel][:, 1:], np.exp(-r_hat[:, 1:]), 0.0).sum(1)
                              + np.where(has_tail[sel], np.exp(-rt_hat), 0.0))
            err = np.where(keep[sel], np.abs((-r_hat - zh[:, None]) - exact[sel]) - tol[sel], -1.0).max(1)
            err_t = np.where(has_tail[sel], np.abs((-rt_hat - zh) - exact_t[sel]) - tol_t[sel], -1.0)
            ok = (err <= 0) & (err_t <= 0)
            if e == MAX_REFINE:
                ok[:] = True  # step / 4096: finer than the float32 input can tell apart
            done = todo[ok]
            levels[done] = lv[ok]
            tail_level[done] = np.where(has_tail[done], tl[ok], 0)
            exponent[done] = e
            todo = todo[~ok]
            if not len(todo):
                break

        # Stored: per position the kept ids in rank order, the level steps between neighbours.
        deltas = np.diff(levels, axis=1)[keep[:, 1:]]
        tail_z = np.where(neg_t, 2 * tail_level + 1, 2 * tail_level) * has_tail
        flags = (has_tail * HAS_TAIL) | (exponent << REFINE_SHIFT)
        if self.exact_target:
            refs = np.zeros(P, np.int64)
        else:
            match = (np.asarray(ids, np.int64) == np.asarray(next_tokens, np.int64)[:, None]) & keep
            refs = np.where(match.any(1), match.argmax(1) + 1, 0)
        exact_target = np.asarray(target_logprob, np.float32)[refs == 0]
        if not np.isfinite(exact_target).all():
            raise ValueError("pack-v3: non-finite target log-probability from the teacher")
        lb, tb, cb = _nbytes(int(deltas.max(initial=0))), _nbytes(int(tail_z.max(initial=0))), self.count_bytes
        per_position = _planes(n, cb) + flags.astype(np.uint8).tobytes() + _planes(refs, cb) + _planes(tail_z, tb)
        streams = [per_position, _planes(np.asarray(ids, np.int64)[keep], self.id_bytes), _planes(deltas, lb),
                   exact_target.astype("<f4").tobytes()]
        return self._frame3(FLAG_EXACT if self.exact_target else 0, lb, tb, streams, [3, self.id_level, 3, 3])

    def _frame3(self, flags: int, level_bytes: int, tail_bytes: int, streams: list[bytes], levels: list[int]) -> bytes:
        frame = bytearray(self._frame(flags, level_bytes, tail_bytes, streams, levels))
        frame[4] = VERSION  # the header's version byte (pack-v2's framing, version 3 layout)
        return bytes(frame)

    # ------------------------------------------------------------------ decode
    def _level_table(self) -> np.ndarray:
        """-r (float32) for every level at the base step."""
        if self._neg_r_table is None:
            n = int(math.ceil(self.f_max / self.step)) + 2
            self._neg_r_table = (-expand(np.arange(n, dtype=np.float64) * self.step, self.knee)).astype(np.float32)
        return self._neg_r_table

    def decode(self, frames: list, positions: int, temperature: float = 1.0,
               out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, tail: bool = False) -> tuple:
        """Frames of B sequences -> (ids int32 [B, P, K], log-probs float32 [B, P, K], target
        log-probs float32 [B, P]), and with `tail` the tail's log-probs float32 [B, P] (-inf:
        none; None for sampled targets, which have none). Kept entries in rank order (entry
        0 = top-1), then padding (id 0, log-prob -inf); sampled targets as pack-v2 decodes
        them. Vectorised over the whole batch, with per-thread scratch arrays (see
        Pack2Codec.decode)."""
        B, P, K = len(frames), positions, self.max_entries
        ids, logq, target = out if out is not None else (
            np.empty((B, P, K), np.int32), np.empty((B, P, K), np.float32), np.empty((B, P), np.float32))
        if B == 0:
            return (ids, logq, target, np.empty((0, P), np.float32)) if tail else (ids, logq, target)
        ws = _workspace()
        parsed = [self._unframe(f) for f in frames]
        if parsed[0][0][2] & 1:  # sampled: pack-v2 frames
            got = self._decode_sampled(parsed, P, K, temperature, (ids, logq, target))
            return (*got, None) if tail else got
        cb, BP = self.count_bytes, B * P
        n = ws.array("n3", BP, np.int64)
        ref, tail_z = ws.array("ref3", BP, np.intp), ws.array("tail3", BP, np.int64)
        fl = ws.array("flags3", BP, np.uint8)
        for i, (head, (s_pos, _, _, _)) in enumerate(parsed):
            r = slice(i * P, (i + 1) * P)
            n[r] = _unplanes(s_pos, P, cb)
            fl[r] = np.frombuffer(s_pos, np.uint8, P, P * cb)
            ref[r] = _unplanes(s_pos, P, cb, P * cb + P)
            tail_z[r] = _unplanes(s_pos, P, head[6], 2 * P * cb + P)
        per_row = n.reshape(B, P).sum(1)
        level_bytes = [h[5] for h, _ in parsed]
        exponent = fl >> REFINE_SHIFT
        has_tail = (fl & HAS_TAIL) != 0
        ids2, logq2 = ids.reshape(BP, K), logq.reshape(BP, K)
        T = int(per_row.sum())
        dense = T == BP * K
        W = K if dense else int(n.max())  # the widest row of the batch: ragged work is [BP, W]
        id_streams, step_streams = [s_[1] for _, s_ in parsed], [s_[2] for _, s_ in parsed]
        refined = np.flatnonzero(exponent)
        h1 = self.step / 2.0 ** exponent.astype(np.float64)
        # Tail: its log-ratio on the plain (not companded) step; odd zigzag = tail > top-1.
        half = tail_z >> 1
        rt = np.where(tail_z & 1, -half * h1, half * h1)
        tail_q = np.where(has_tail, np.exp(-rt), 0.0)
        log_z = None
        jit = _jit()
        if jit is not None:
            log_z = self._decode_jit(jit, ws, id_streams, step_streams, per_row, level_bytes, n, exponent, tail_q,
                                     ids2, logq2)
        elif not dense and T * 5 < 2 * BP * W and not len(refined):  # few entries per row (under 40%): scatter them
            log_z = self._decode_sparse(ws, id_streams, step_streams, per_row, level_bytes, n, T, tail_q, ids2, logq2)
        if log_z is None:
            log_z = self._decode_block(ws, parsed, id_streams, step_streams, per_row, level_bytes, n, dense, W, h1, tail_q,
                                       refined, ids2, logq2)
        t2 = target.reshape(BP)
        hit = np.flatnonzero(ref)
        t2[hit] = logq2[hit, ref[hit] - 1]
        t2[ref == 0] = np.concatenate([np.frombuffer(s_[3], "<f4") for _, s_ in parsed])
        if not tail:
            return ids, logq, target
        tails = np.where(has_tail, -rt - log_z, -np.inf).astype(np.float32).reshape(B, P)
        return ids, logq, target, tails

    def _decode_jit(self, jit, ws, id_streams: list, step_streams: list, per_row: np.ndarray, level_bytes: list[int],
                    n: np.ndarray, exponent: np.ndarray, tail_q: np.ndarray, ids2: np.ndarray,
                    logq2: np.ndarray) -> np.ndarray:
        """Every row by the compiled decoder (pack3_jit), one call per frame on its streams as
        they came out of zstd (no copy): one pass per row over its own entries, whatever the
        batch's widest row. Returns the log normalisers."""
        if self._jit_tables is None:
            self._jit_tables = jit.tables(self._level_table())
        B = len(per_row)
        P, K = len(n) // B, ids2.shape[1]
        # The kernel reads without bounds checks: a frame must hold what its counts say.
        if n.min() < 1 or n.max() > K:
            raise ValueError(f"pack-v3 frame: a row keeps {int(n.min())}..{int(n.max())} entries, not 1..{K} "
                             "(a corrupt frame: its entry counts do not match its streams)")
        log_z = ws.array("logz3", len(n), np.float64)
        scratch = ws.array("jit3", 2 * int(per_row.max()), np.int32)
        for b in range(B):
            T, lb = int(per_row[b]), level_bytes[b]
            if len(id_streams[b]) != T * self.id_bytes or len(step_streams[b]) != (T - P) * lb:
                raise ValueError("pack-v3 frame: its entry counts do not match its streams (a corrupt frame)")
            r = slice(b * P, (b + 1) * P)
            jit.decode_frame(np.frombuffer(id_streams[b], np.uint8), self.id_bytes, np.frombuffer(step_streams[b], np.uint8),
                             lb, n[r], exponent[r], tail_q[r], *self._jit_tables, self.step, self.knee,
                             ids2[r], logq2[r], log_z[r], scratch)
        return log_z

    def _decode_sparse(self, ws, id_streams: list, step_streams: list, per_row: np.ndarray, level_bytes: list[int],
                       n: np.ndarray, T: int, tail_q: np.ndarray, ids2: np.ndarray, logq2: np.ndarray) -> np.ndarray | None:
        """Ragged rows that keep few of their K slots (unrefined): the T kept entries are
        worked on flat and scattered into the padded output, whose cost then grows with T,
        not with rows x the widest row. The row sums as the block path does them, over all K
        columns with zeros past n, so a row decodes to the same bits by either path. Returns
        the log normalisers, or None (nothing written but ids) where a level is past the
        table."""
        BP, K = ids2.shape
        starts = np.cumsum(n) - n
        slot = np.arange(T) + np.repeat(np.arange(BP) * K - starts, n)  # each entry's place in [BP, K]
        ids2.fill(0)
        ids2.reshape(-1)[slot] = _gather_planes(id_streams, per_row, self.id_bytes, ws, "ids3")
        stepped = np.ones(T, bool)
        stepped[starts] = False  # each row's top-1 has no step: level 0
        steps = np.zeros(T, np.int64)
        steps[stepped] = _gather_planes(step_streams, per_row - BP // len(per_row), level_bytes, ws, "deltas3")
        run = np.cumsum(steps)
        levels = run - np.repeat(run[starts], n)
        neg_r_tab = self._level_table()
        if int(levels.max(initial=0)) >= len(neg_r_tab):
            return None
        neg_r = neg_r_tab.take(levels, mode="clip")
        q = ws.array("q3", (BP, K), np.float32)
        q.fill(0.0)
        q.reshape(-1)[slot] = np.exp(neg_r)
        log_z = np.log1p(np.matmul(q, ws.not_first(K)).astype(np.float64) + tail_q)
        logq2.fill(-np.inf)
        logq2.reshape(-1)[slot] = neg_r - np.repeat(log_z.astype(np.float32), n)
        return log_z

    def _decode_block(self, ws, parsed: list, id_streams: list, step_streams: list, per_row: np.ndarray,
                      level_bytes: list[int], n: np.ndarray, dense: bool, W: int, h1: np.ndarray, tail_q: np.ndarray,
                      refined: np.ndarray, ids2: np.ndarray, logq2: np.ndarray) -> np.ndarray:
        """Every row as one [BP, W] block (W: the widest row; K for full rows), the float32
        fast path where no row is refined; returns the log normalisers."""
        BP, K = ids2.shape
        P = BP // len(parsed)
        neg_r_tab = self._level_table()
        one_byte, narrow = max(level_bytes) == 1, max(level_bytes) <= 2 and W <= RUN_MAX
        # Rows are decoded as a [BP, W] block: full rows are plain reshapes of the streams;
        # ragged ones (adaptive k) are placed by a mask of each row's first n entries
        # (row-major order is the streams' order), their padding holds level steps of 0 and
        # is masked again at the end.
        kept = None if dense else ws.first_n(n, W, K)
        padding = None if dense else ~kept
        if dense:
            _gather_planes(id_streams, per_row, self.id_bytes, ws, "ids3", out=ids2.reshape(-1))
        else:
            block = ws.array("idsw3", (BP, W), np.int32)
            block.fill(0)
            block[kept] = _gather_planes(id_streams, per_row, self.id_bytes, ws, "ids3")
            ids2[:, :W] = block
            ids2[:, W:] = 0
        lv = None
        if narrow:  # steps below 2^16: exact in float32, summed by _running_sums
            steps = ws.array("steps3", (BP, W - 1), np.float32)
            if dense and one_byte:  # one byte plane per frame: cast straight from it, no gathered copy
                for i, (_, s_) in enumerate(parsed):
                    steps[i * P : (i + 1) * P] = np.frombuffer(s_[2], np.uint8, P * (K - 1)).reshape(P, K - 1)
            elif dense:
                _gather_planes(step_streams, per_row - P, level_bytes, ws, "deltas3", out=steps.reshape(-1))
            else:
                steps.fill(0.0)
                steps[kept[:, 1:]] = _gather_planes(step_streams, per_row - P, level_bytes, ws, "deltas3")
            lv = _running_sums(steps, ws)
        if lv is None:  # wide rows, or refined ones whose levels pass 2^24: integer sums
            deltas = _gather_planes(step_streams, per_row - P, level_bytes, ws, "deltas3")
            lv = np.zeros((BP, W), np.int64)
            if dense:
                np.cumsum(deltas.reshape(BP, K - 1), axis=1, out=lv[:, 1:])
            else:
                lv[:, 1:][kept[:, 1:]] = deltas
                np.cumsum(lv, axis=1, out=lv)
        top_level = int(lv[:, -1].max(initial=0))  # levels never fall along a row: the last is the largest
        fast = top_level < len(neg_r_tab) and not len(refined)
        out_w = logq2 if dense else ws.array("logqw3", (BP, W), np.float32)
        if fast:
            # The usual case: -r by a table lookup, then exp(-r), float32, in place. mode="clip"
            # skips numpy's per-element bounds check (~2x faster); it never clips: levels are
            # >= 0 (unsigned steps) and top_level < len(table) was checked. numpy's SIMD exp
            # is cheaper than a second lookup.
            np.take(neg_r_tab, lv, out=out_w, mode="clip")
            q = ws.array("q3", (BP, K), np.float32)
            if dense:
                np.exp(out_w, out=q)
            else:
                q[:, W:] = 0.0
                np.exp(out_w, out=q[:, :W])
                np.copyto(q[:, :W], 0.0, where=padding)
            # sum_{j>=1} q_j as one float32 matrix-vector product over all K columns (BLAS:
            # ~10x numpy's row sums), zeros past n included, so that a row sums to the same
            # bits in any batch; its relative error, <= K * 2^-24, is far below the
            # quantisation step.
            s = np.matmul(q, ws.not_first(K)).astype(np.float64) + tail_q
            log_z = np.log1p(s)
            np.subtract(out_w, log_z.astype(np.float32)[:, None], out=out_w)
        else:
            h = h1[:, None]
            r = expand(lv * h, self.knee)
            s = (np.exp(-r) if kept is None else np.where(kept, np.exp(-r), 0.0))[:, 1:].sum(1) + tail_q
            log_z = np.log1p(s)
            out_w[:] = -r - log_z[:, None]
        if not dense:
            np.copyto(out_w, -np.inf, where=padding)
            logq2[:, :W] = out_w
            logq2[:, W:] = -np.inf
        return log_z


FLAG_EXACT = 4  # frame flag bit 2, as in pack-v2: every target log-prob stored exactly

__all__ = ["DEFAULT_KNEE", "DEFAULT_STEP", "MAX_ENTRIES", "Pack3Codec", "compand", "expand", "log1mexp"]
