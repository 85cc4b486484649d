"""The `pack-v2` target codec: one sequence's sparse teacher targets <-> one byte string.

storage_layout.md ("Encoding pack-v2") specifies the bytes; this module is their only
writer. What it guarantees, for any teacher distribution (flat, peaked with p1 -> 1,
ties, -inf entries, bf16-rounded values whose probabilities sum past 1):

  * decoded targets are distributions by construction: every decoded probability is
    > 0, the kept mass is <= 1 and the tail bucket >= 0, because one category per
    position (the *remainder*: the larger of the top-1 and the tail) is not stored but
    decoded as 1 minus everything else, and the encoder checks that it stays > 0;
  * per position (not on average), the coarse KL between the teacher's kept entries +
    tail and the decoded ones is at most `kl_budget` nats. The encoder computes that KL
    exactly (float64) for every position and, where it would exceed the budget, halves
    that position's step and tries again (at most MAX_REFINE times; a per-position step
    exponent is stored);
  * ids and sampled counts are exact; up to 65,535 entries per position.

How: an entry of probability p is stored as level floor(sqrt(p) / h) and decoded as the
middle of its bin, ((level + 0.5) h)^2. In sqrt(p) the error is uniform, so each entry
costs about h^2/6 nats of KL whatever its p (small p get small absolute errors). The
base step is h = sqrt(STEP_SCALE * kl_budget / K): the mean KL per position lands near a
third to a half of the budget, and the budget is the hard bound. The tail is stored on
the same grid. The target token's log-probability is a reference to its kept entry
(slot + 1), or the teacher's exact float32 value when it is not kept.

Sampled targets store the unique ids, their exact draw counts and, with a sampling
temperature != 1, their teacher log-probs (step 2^-10 nats) for the importance weights;
the target token's log-probability is always stored exactly (the kept values are weights,
not teacher probabilities).
"""

from __future__ import annotations

import math
import struct
import threading
from typing import TYPE_CHECKING

import numpy as np
from numcodecs import Zstd

from .planes import nbytes as _nbytes, planes as _planes, starts as _starts, unplanes as _unplanes

if TYPE_CHECKING:
    import zstandard

VERSION = 2
STEP_SCALE = 3.0  # h^2 = STEP_SCALE * budget / K
MAX_REFINE = 12  # per-position step halvings the encoder may use
MAX_ENTRIES = 65535
LOGP_STEP = 2.0**-10  # sampled targets at T != 1: teacher -log p in these units (uint16, up to 64 nats)

# Frame header: total length, version, flags, id bytes, count bytes, entry level bytes,
# tail level bytes, stream count.
HEADER = struct.Struct("<IBBBBBBB")  # then per stream its compressed size, then its raw size (u32)
FLAG_SAMPLED = 1
FLAG_LOGP = 2  # sampled with teacher log-probs (sample temperature != 1)
FLAG_EXACT_TARGET = 4  # every position's target log-prob stored exactly

# Per-position flag bits (top-k).
HAS_TAIL = 1
REM_IS_TAIL = 2
REFINE_SHIFT = 2  # bits 2..7: the step exponent e (step h / 2^e)


def base_step(kl_budget: float, max_entries: int) -> float:
    """The sqrt(p) step of an unrefined position (see the module docstring)."""
    return math.sqrt(STEP_SCALE * kl_budget / max(1, max_entries))


def _gather_planes(streams: list, counts: np.ndarray, nbytes: int | list[int], ws: "_Workspace", name: str,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Concatenate each row's byte-planed stream into one array: `out` (any integer or float
    dtype wide enough) or a scratch array (uint8, uint16 or uint32 by the widest row).
    Planes are combined with shifts and ors (multiplies and adds into floats) on contiguous
    slices: a transposing copy is ~20x slower."""
    widths = [nbytes] * len(streams) if isinstance(nbytes, int) else list(nbytes)
    if out is None:
        out = ws.array(name, int(counts.sum()), {1: np.uint8, 2: np.uint16}.get(max(widths), np.uint32))
    real = out.dtype.kind == "f"
    at = 0
    for stream, count, w in zip(streams, counts.tolist(), widths):
        if count:
            planes = np.frombuffer(stream, np.uint8, count * w).reshape(w, count)
            dst = out[at : at + count]
            if w == 1:
                dst[:] = planes[0]
            elif real:  # the top plane scaled in the destination's dtype (a uint8 multiply would wrap)
                np.multiply(planes[w - 1], 256.0, out=dst, dtype=out.dtype)
            else:
                np.left_shift(planes[w - 1], 8, out=dst, dtype=out.dtype)
            for i in range(w - 2, -1, -1):
                if real:
                    dst += planes[i]
                else:
                    dst |= planes[i]
                if i:  # room for the next, lower plane
                    if real:
                        dst *= 256.0
                    else:
                        dst <<= 8
        at += count
    return out


class _Workspace(threading.local):
    """Per-thread scratch arrays, grown as needed and reused across calls."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], np.ndarray] = {}
        self.constants: dict[tuple[str, int], np.ndarray] = {}
        self.dctx: "zstandard.ZstdDecompressor | None" = None

    def array(self, name: str, shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
        size = int(np.prod(shape))
        key = (name, np.dtype(dtype).str)
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = self.buffers[key] = np.empty(max(size, 1), dtype)
        return buf[:size].reshape(shape)

    def decompressor(self) -> "zstandard.ZstdDecompressor":
        """This thread's zstd decompression context, reused across calls: numcodecs' Zstd
        makes and frees one per call, a large share of a decode made of many small streams
        (4 per sequence). python-zstandard is already a dependency (.jsonl.zst corpora)."""
        if self.dctx is None:
            import zstandard

            self.dctx = zstandard.ZstdDecompressor()
        return self.dctx

    def arange(self, k: int) -> np.ndarray:
        return self.constants.setdefault(("arange", k), np.arange(k, dtype=np.int32))

    def first_n(self, n: np.ndarray, width: int, k: int) -> np.ndarray:
        """bool [len(n), width]: row i True in its first n[i] entries (ragged rows' kept slots;
        n <= width <= k). Looked up in a cached table of k + 1 rows while that stays small
        (k <= 1024: 1 MiB; cheaper than a broadcast comparison per call), compared beyond
        (k up to the vocabulary with adaptive k: the table would take k^2 bytes)."""
        if k > 1024:
            return np.arange(width)[None, :] < n[:, None]
        table = self.constants.get(("first_n", k))
        if table is None:
            table = self.constants[("first_n", k)] = np.arange(k)[None, :] < np.arange(k + 1)[:, None]
        return table[:, :width][n]

    def ones(self, k: int) -> np.ndarray:
        return self.constants.setdefault(("ones", k), np.ones(k, np.float64))

    def not_first(self, k: int) -> np.ndarray:
        """float32 [k]: 0, then ones (a row sum that skips entry 0, as a matrix-vector product)."""
        w = self.constants.get(("not_first", k))
        if w is None:
            w = self.constants[("not_first", k)] = np.ones(k, np.float32)
            w[0] = 0.0
        return w


_WORKSPACE = _Workspace()


def _workspace() -> _Workspace:
    return _WORKSPACE


class Pack2Codec:
    """Encode and decode sequences of P positions holding at most `max_entries` entries each."""

    frame_versions: tuple[int, ...] = (VERSION,)  # frame layouts this codec reads (pack-v3 adds its own)

    def __init__(self, *, vocab_size: int, max_entries: int, kl_budget: float, sampled: bool = False,
                 sample_logp: bool = False, exact_target: bool = False, id_level: int = 7) -> None:
        if not 1 <= max_entries <= MAX_ENTRIES:
            raise ValueError(f"pack-v2 keeps 1..{MAX_ENTRIES} entries per position, got {max_entries}")
        self.vocab_size, self.max_entries, self.kl_budget = vocab_size, max_entries, kl_budget
        self.sampled, self.sample_logp, self.exact_target = sampled, sample_logp, exact_target
        self.h = base_step(kl_budget, max_entries)
        self.id_bytes = _nbytes(max(1, vocab_size - 1))
        self.count_bytes = _nbytes(max_entries + 1)  # slot references run to K (0 = not kept)
        self.max_level = int(math.floor(1.0 / (self.h / 2**MAX_REFINE))) + 1
        self.id_level = id_level
        self._tables: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ sizes
    def capacity(self, positions: int) -> int:
        """The most bytes a frame of `positions` positions can take (zstd's bound on every stream)."""
        P, K = positions, self.max_entries
        bound = lambda n: n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0) + 64  # noqa: E731
        lb = _nbytes(self.max_level)
        per_position = P * (3 * self.count_bytes + 1 + lb)
        streams = [per_position, P * K * self.id_bytes, P * K * max(lb, 2), 4 * P, 2 * P * K]
        return HEADER.size + 8 * len(streams) + sum(bound(n) for n in streams)

    # ------------------------------------------------------------------ framing
    def _frame(self, flags: int, level_bytes: int, tail_bytes: int, streams: list[bytes], levels: list[int]) -> bytes:
        packed = [Zstd(level=lv).encode(s) if s else b"" for s, lv in zip(streams, levels)]
        # Compressed then raw sizes: the reader decompresses into buffers it already has.
        sizes = struct.pack(f"<{2 * len(packed)}I", *map(len, packed), *map(len, streams))
        total = HEADER.size + len(sizes) + sum(map(len, packed))
        head = HEADER.pack(total, VERSION, flags, self.id_bytes, self.count_bytes, level_bytes, tail_bytes, len(packed))
        return head + sizes + b"".join(packed)

    def _unframe(self, blob: memoryview | bytes) -> tuple[tuple, list]:
        """(header, streams) of one frame, each stream decompressed by this thread's zstd context."""
        head = HEADER.unpack_from(blob, 0)
        total, version, n = head[0], head[1], head[-1]
        if version not in self.frame_versions:
            raise ValueError(f"pack frame has version {version}; this codec reads {self.frame_versions}")
        sizes = struct.unpack_from(f"<{2 * n}I", blob, HEADER.size)
        at = HEADER.size + 8 * n
        if at + sum(sizes[:n]) != total or total > len(blob):
            raise ValueError("pack-v2 frame is truncated or its stream sizes do not add up")
        dctx = _workspace().decompressor()
        out = []
        for j, (size, raw) in enumerate(zip(sizes[:n], sizes[n:])):
            stream = dctx.decompress(blob[at : at + size]) if size else b""
            if len(stream) != raw:
                raise ValueError(f"pack frame stream {j} decompressed to {len(stream)} bytes, its header says {raw}")
            out.append(stream)
            at += size
        return head, out

    # ------------------------------------------------------------------ shared pieces
    def _sorted(self, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(order [P, K] by ascending id with dropped entries last, counts, gap stream, sorted ids)."""
        P, K = ids.shape
        key = np.where(keep, ids.astype(np.int64), np.int64(2**40))
        order = np.argsort(key, axis=1, kind="stable")
        sid = np.take_along_axis(ids.astype(np.int64), order, 1)
        kept_sorted = np.take_along_axis(keep, order, 1)
        counts = keep.sum(1)
        prev = np.concatenate([np.full((P, 1), -1, np.int64), sid[:, :-1]], 1)
        gaps = (sid - prev - 1)[kept_sorted]
        return order, counts, gaps, sid

    def _refs(self, sid: np.ndarray, kept_sorted: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
        """Slot + 1 of each position's target among its kept (sorted) entries, 0 if not kept."""
        match = (sid == np.asarray(next_tokens, np.int64)[:, None]) & kept_sorted
        return np.where(match.any(1), match.argmax(1) + 1, 0)

    # ------------------------------------------------------------------ top-k
    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray, target_logprob: np.ndarray, next_tokens: np.ndarray) -> bytes:
        """ids int [P, K] and float log-probs [P, K] in rank order (entry 0 = top-1), -inf where
        an entry is not kept (adaptive k); the teacher's log-prob of each next token [P] and
        the next tokens themselves [P]."""
        P, K = ids.shape
        lp = logprobs.astype(np.float64)
        with np.errstate(under="ignore"):
            p = np.exp(lp)
        keep = p > 0  # -inf (and log-probs below float64's range) are not kept
        keep[:, 0] = True
        p = np.where(keep, p, 0.0)
        total = p.sum(1)
        p = np.where((total > 1.0)[:, None], p / total[:, None], p)  # bf16/float rounding can pass 1
        tail = np.maximum(0.0, 1.0 - p.sum(1)) if K < self.vocab_size else np.zeros(P)
        has_tail = tail > 0
        rem_tail = has_tail & (tail > p[:, 0])

        order, counts, gaps, sid = self._sorted(ids, keep)
        ps = np.take_along_axis(p, order, 1)
        ks = np.take_along_axis(keep, order, 1)
        is_rem = (order == 0) & ~rem_tail[:, None]  # the top-1 is the remainder unless the tail is
        store = ks & ~is_rem
        sqrt_p, sqrt_t = np.sqrt(ps), np.sqrt(tail)
        # log p of the sorted entries from the log-probs themselves (no log of P*K values)
        norm = np.where(total > 1.0, np.log(np.maximum(total, 1e-300)), 0.0)
        logp_s = np.where(ks, np.take_along_axis(lp, order, 1) - norm[:, None], 0.0)
        with np.errstate(divide="ignore"):
            log_t = np.log(np.where(has_tail, tail, 1.0))

        levels = np.zeros((P, K), np.int64)
        tail_level = np.zeros(P, np.int64)
        exponent = np.zeros(P, np.int64)
        todo = np.arange(P)
        base_log = self._encode_log_table()
        for e in range(MAX_REFINE + 1):
            h = self.h / 2.0**e
            # The first pass covers every position (no copies); refinements only the few left.
            sel = slice(None) if e == 0 else todo
            lv = np.minimum(np.floor(sqrt_p[sel] / h), self.max_level).astype(np.int64)
            q = np.where(store[sel], ((lv + 0.5) * h) ** 2, 0.0)
            tl = np.minimum(np.floor(sqrt_t[sel] / h), self.max_level).astype(np.int64)
            qt = np.where(has_tail[sel] & ~rem_tail[sel], ((tl + 0.5) * h) ** 2, 0.0)
            q_rem = 1.0 - q.sum(1) - qt
            if e == 0 and lv.max(initial=0) < len(base_log):
                logq = base_log[lv]  # log ((l + 0.5) h)^2 by table: no log of P*K values
            else:
                with np.errstate(divide="ignore"):
                    logq = np.log(np.where(store[sel], q, 1.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                log_rem = np.log(np.maximum(q_rem, 1e-300))
                logq = np.where(is_rem[sel], log_rem[:, None], logq)
                qt = np.where(rem_tail[sel], q_rem, qt)
                kl = np.where(ks[sel], ps[sel] * (logp_s[sel] - logq), 0.0).sum(1)
                kl += np.where(has_tail[sel], tail[sel] * (log_t[sel] - np.log(np.where(has_tail[sel], qt, 1.0))), 0.0)
            ok = (q_rem > 0) & np.isfinite(kl) & (kl <= self.kl_budget)
            if e == MAX_REFINE:
                ok[:] = True  # h / 2^MAX_REFINE: finer than float32 can tell apart
            done = todo[ok]
            levels[done] = np.where(store[done], lv[ok], 0)
            tail_level[done] = np.where(has_tail[done] & ~rem_tail[done], tl[ok], 0)
            exponent[done] = e
            todo = todo[~ok]
            if not len(todo):
                break

        rem_slot = np.where(rem_tail, 0, np.argmax(is_rem, 1))
        flags = (has_tail * HAS_TAIL) | (rem_tail * REM_IS_TAIL) | (exponent << REFINE_SHIFT)
        refs = self._refs(sid, ks, next_tokens) if not self.exact_target else np.zeros(P, np.int64)
        exact = np.asarray(target_logprob, np.float32)[refs == 0]
        flat_levels = levels[ks]
        lb, tb = _nbytes(int(flat_levels.max(initial=0))), _nbytes(int(tail_level.max(initial=0)))
        cb = self.count_bytes
        per_position = (_planes(counts, cb) + _planes(rem_slot, cb) + flags.astype(np.uint8).tobytes()
                        + _planes(refs, cb) + _planes(tail_level, tb))
        streams = [per_position, _planes(gaps, self.id_bytes), _planes(flat_levels, lb), exact.astype("<f4").tobytes()]
        return self._frame(FLAG_EXACT_TARGET if self.exact_target else 0, lb, tb, streams, [3, self.id_level, 3, 3])

    def _encode_log_table(self) -> np.ndarray:
        """float64 log ((l + 0.5) h)^2 for the levels an unrefined position can have."""
        if not hasattr(self, "_enc_log"):
            self._enc_log = 2.0 * np.log((np.arange(int(1.0 / self.h) + 2, dtype=np.float64) + 0.5) * self.h)
        return self._enc_log

    # ------------------------------------------------------------------ sampled
    def encode_sampled(self, ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray | None, target_logprob: np.ndarray) -> bytes:
        """Unique sampled ids int [P, K] with their draw counts [P, K] (0 = padding) and, for a
        sampling temperature != 1, their teacher log-probs [P, K]; the target's log-prob [P]."""
        keep = counts > 0
        order, n, gaps, _ = self._sorted(ids, keep)
        c = np.take_along_axis(counts, order, 1)[np.take_along_axis(keep, order, 1)]
        vb = _nbytes(int(c.max(initial=1)))
        streams = [_planes(n, self.count_bytes), _planes(gaps, self.id_bytes), _planes(c, vb),
                   np.asarray(target_logprob, "<f4").tobytes()]
        flags = FLAG_SAMPLED | FLAG_EXACT_TARGET
        if logprobs is not None:
            lp = np.take_along_axis(logprobs.astype(np.float64), order, 1)[np.take_along_axis(keep, order, 1)]
            streams.append(_planes(np.clip(np.rint(-lp / LOGP_STEP), 0, 65535).astype(np.uint32), 2))
            flags |= FLAG_LOGP
        return self._frame(flags, vb, 0, streams, [3, self.id_level, 3, 3, 3])

    # ------------------------------------------------------------------ decode
    def _table(self, level_bytes: int) -> np.ndarray:
        """log q (float32) for every level at the base step: q = ((level + 0.5) h)^2."""
        n = 1 << (8 * level_bytes) if level_bytes < 3 else self.max_level + 1
        if n not in self._tables:
            self._tables[n] = (2.0 * np.log((np.arange(n, dtype=np.float64) + 0.5) * self.h)).astype(np.float32)
        return self._tables[n]

    def decode(self, frames: list, positions: int, temperature: float = 1.0,
               out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames of B sequences -> (ids int32 [B, P, K], log-probs float32 [B, P, K], target
        log-probs float32 [B, P]). Kept entries in ascending id order, then padding (id 0,
        log-prob -inf); for sampled targets the log target weights (summing to 1 per position).

        Vectorised over the whole batch: per frame only the header is parsed and its streams
        decompressed and un-planed into batch-wide arrays; the rest is a few numpy passes
        over all B*P*K entries. `out` (three arrays of those shapes) is written in place;
        temporaries live in a per-thread workspace: fresh large arrays cost page faults that
        here take longer than the arithmetic."""
        B, P, K = len(frames), positions, self.max_entries
        ids, logq, target = out if out is not None else (
            np.empty((B, P, K), np.int32), np.empty((B, P, K), np.float32), np.empty((B, P), np.float32))
        if B == 0:
            return ids, logq, target
        ws = _workspace()
        parsed = [self._unframe(f) for f in frames]
        if parsed[0][0][2] & FLAG_SAMPLED:
            return self._decode_sampled(parsed, P, K, temperature, (ids, logq, target))
        cb, BP = self.count_bytes, B * P
        logq_tab = self._table(max(max(head[5], head[6]) for head, _ in parsed))
        n = ws.array("n", BP, np.int64)
        rem, ref, tail_level = ws.array("rem", BP, np.intp), ws.array("ref", BP, np.intp), ws.array("tail", BP, np.intp)
        fl = ws.array("flags", BP, np.uint8)
        for i, (head, (s_pos, _, _, _)) in enumerate(parsed):
            r = slice(i * P, (i + 1) * P)
            n[r] = _unplanes(s_pos, P, cb)
            rem[r] = _unplanes(s_pos, P, cb, P * cb)
            fl[r] = np.frombuffer(s_pos, np.uint8, P, 2 * P * cb)
            ref[r] = _unplanes(s_pos, P, cb, 2 * P * cb + P)
            tail_level[r] = _unplanes(s_pos, P, head[6], 3 * P * cb + P)
        per_row = n.reshape(B, P).sum(1)
        T = int(per_row.sum())
        gaps = _gather_planes([s[1] for _, s in parsed], per_row, self.id_bytes, ws, "gaps")
        levels = _gather_planes([s[2] for _, s in parsed], per_row, [h[5] for h, _ in parsed], ws, "levels")
        exponent = fl >> REFINE_SHIFT
        has_tail = (fl & HAS_TAIL) != 0
        rem_tail = (fl & REM_IS_TAIL) != 0
        ids2, logq2 = ids.reshape(BP, K), logq.reshape(BP, K)
        if T == BP * K:  # every position holds K entries: plain reshapes, no scatter
            # ids = cumulative (gap + 1) - 1 = cumulative gaps + column index
            np.cumsum(gaps.reshape(BP, K), axis=1, dtype=np.int32, out=ids2)
            ids2 += ws.arange(K)
            lvk = levels.reshape(BP, K)
            np.take(logq_tab, lvk, out=logq2)
            # The stored mass: sum of ((l + 0.5) h)^2 = h^2 (sum l^2 + sum l + n/4). On levels
            # as float64 these sums are exact (integers < 2^53), so every path, batch and
            # order gives the same bits: a row decodes the same in any batch.
            lf = ws.array("lf", (BP, K), np.float64)
            np.copyto(lf, lvk, casting="unsafe")
            s2, s1 = np.einsum("ij,ij->i", lf, lf), lf @ ws.ones(K)
            l_rem = lvk[np.arange(BP), rem].astype(np.float64)
        else:
            n_i = n.astype(np.intp)
            starts = _starts(n_i)
            pos = np.repeat(np.arange(BP), n_i)
            col = np.arange(T) - np.repeat(starts, n_i)
            csum = np.cumsum(gaps, dtype=np.int64) + np.arange(1, T + 1)
            flat_ids = csum - np.repeat(np.concatenate([[0], csum])[starts], n_i) - 1
            ids2[:] = 0
            ids2[pos, col] = flat_ids
            logq2[:] = -np.inf
            logq2[pos, col] = logq_tab.take(levels)
            lf = levels.astype(np.float64)
            s2, s1 = np.bincount(pos, lf * lf, minlength=BP), np.bincount(pos, lf, minlength=BP)
            l_rem = np.where(n_i > 0, lf[np.minimum(starts + rem, max(T - 1, 0))] if T else 0.0, 0.0)
        h2 = self.h**2
        q_sum = (s2 + s1 + n / 4.0) * h2
        q_at_rem = (l_rem + 0.5) ** 2 * h2
        qt = np.where(has_tail & ~rem_tail, (tail_level + 0.5) ** 2 * h2, 0.0)
        refined = np.flatnonzero(exponent)
        if len(refined):  # step h / 2^e: q(base) / 4^e
            scale = 0.25 ** exponent[refined].astype(np.float64)
            logq2[refined] += np.log(scale).astype(np.float32)[:, None]
            q_sum[refined] *= scale
            q_at_rem[refined] *= scale
            qt[refined] *= scale
        # The remainder (top-1, or the tail) is 1 minus everything stored; its slot holds a
        # placeholder level, taken out of the sum here.
        q_rem = 1.0 - (q_sum - np.where(rem_tail, 0.0, q_at_rem)) - qt
        with np.errstate(divide="ignore", invalid="ignore"):
            log_rem = np.log(np.maximum(q_rem, 1e-300)).astype(np.float32)
        top = np.flatnonzero(~rem_tail)
        logq2[top, rem[top]] = log_rem[top]
        # The target: its kept entry, or the exact value stored for it.
        t2 = target.reshape(BP)
        hit = np.flatnonzero(ref)
        t2[hit] = logq2[hit, ref[hit] - 1]
        t2[ref == 0] = np.concatenate([np.frombuffer(s[3], "<f4") for _, s in parsed])
        return ids, logq, target

    def _decode_sampled(self, parsed: list, P: int, K: int, temperature: float, out: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        B = len(parsed)
        counts, gaps, draws, targets, logps = [], [], [], [], []
        for head, streams in parsed:
            n = _unplanes(streams[0], P, self.count_bytes)
            T = int(n.sum())
            counts.append(n)
            gaps.append(_unplanes(streams[1], T, self.id_bytes))
            draws.append(_unplanes(streams[2], T, head[5]))
            targets.append(np.frombuffer(streams[3], "<f4"))
            if head[2] & FLAG_LOGP:
                logps.append(-_unplanes(streams[4], T, 2).astype(np.float64) * LOGP_STEP)
        n = np.concatenate(counts).astype(np.int64)
        BP = B * P
        starts = _starts(n)
        pos = np.repeat(np.arange(BP), n)
        col = np.arange(int(n.sum())) - np.repeat(starts, n)
        csum = np.cumsum(np.concatenate(gaps).astype(np.int64) + 1)
        flat_ids = csum - np.repeat(np.concatenate([[0], csum])[starts], n) - 1
        w = np.concatenate(draws).astype(np.float64)
        if logps:
            w = w * np.exp(np.concatenate(logps) * (1.0 - 1.0 / temperature))
        w = w / np.bincount(pos, w, minlength=BP)[pos]
        ids, lw, target = out
        ids2, lw2 = ids.reshape(BP, K), lw.reshape(BP, K)
        ids2[:] = 0
        lw2[:] = -np.inf
        ids2[pos, col] = flat_ids
        lw2[pos, col] = np.log(w)
        target.reshape(BP)[:] = np.concatenate(targets)
        return ids, lw, target
