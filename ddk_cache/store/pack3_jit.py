"""pack-v3's top-k rows decoded by one compiled pass per row (numba), the loader's default.

Why compiled: a vectorised numpy decode makes about ten passes over a batch's entries
(byte planes, running sums, table lookups, exp, masks), each with its own temporary, and
ragged rows (adaptive k) pay them over the batch's widest row (issue #25). Here a frame's
byte planes are combined in one flat pass, then each row is walked once over its own
entries; its padding is written, not computed. Measured in BENCHMARKS.md ("Ragged
decode, compiled").

Each row is decoded alone, in a fixed order (its level steps summed left to right, its
probabilities summed in float64 in four fixed chains), so a row decodes to the same bits
in any batch, on any rank. The numbers are storage_layout.md's ("Encoding pack-v3"):
level l at step h = step / 2^e is r = expand(l h); the kept entries and the tail are
normalised by log_z = log1p(sum_{j>=1} exp(-r_j) + tail_q). Unrefined rows (e = 0) take
-r from the numpy path's float32 table and exp(-r) from a float64 one; refined rows and
levels past the table compute both in float64.

numba is a dependency, imported only by this module, which pack3.py imports on its first
decode. Where numba cannot be imported (a platform without its wheels) or DDK_CACHE_JIT=0
is set, pack3.py decodes with numpy: the same values to float32 rounding, not the same
bits, so do not mix the two within one training run. numba caches the machine code on
disk (`cache=True`): a process compiles only if no cache of this source exists.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _expand(f: float, knee: float) -> float:  # pack3.expand for one value
    if f <= knee:
        return f
    return knee * math.exp(min(f, 1e3) / knee - 1.0)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _combine(planes, count, nbytes, out) -> None:  # noqa: ANN001
    """out[:count] = the integers stored as `nbytes` little-endian byte planes. One flat pass
    over the frame (vectorised by LLVM), not one per row: per row it was 4x slower."""
    if nbytes == 1:
        for j in range(count):
            out[j] = planes[j]
    elif nbytes == 2:
        lo = planes[:count]
        hi = planes[count : 2 * count]
        for j in range(count):
            out[j] = np.int32(lo[j]) | (np.int32(hi[j]) << 8)
    else:
        for j in range(count):
            out[j] = planes[j]
        for c in range(1, nbytes):
            plane = planes[c * count : (c + 1) * count]
            for j in range(count):
                out[j] |= np.int32(plane[j]) << (8 * c)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def decode_frame(ids, id_bytes, steps, step_bytes, n, exponent, tail_q, neg_r_tab, q_tab, step, knee,  # noqa: ANN001
                 ids_out, logq_out, log_z, scratch) -> None:
    """One frame's P top-k rows into ids_out int32 [P, K], logq_out float32 [P, K] (padding:
    id 0, -inf) and log_z float64 [P]. ids / steps: the frame's decompressed id and level-
    step streams (uint8; `id_bytes` / `step_bytes` byte planes); n: each row's kept entries
    (checked by the caller against the streams' lengths: nothing here checks bounds);
    exponent: each row's step exponent; tail_q: exp(-r_tail) (0: no tail); neg_r_tab
    (float32) / q_tab (float64): -r and exp(-r) per level of an unrefined row; scratch:
    int32, at least 2 T long (T: the frame's kept entries)."""
    P, K = ids_out.shape
    L = neg_r_tab.shape[0]
    T = ids.shape[0] // id_bytes
    S = T - P  # level steps: one per kept entry but each row's first
    flat_ids = scratch[:T]
    flat_steps = scratch[T : T + S]
    _combine(ids, T, id_bytes, flat_ids)
    _combine(steps, S, step_bytes, flat_steps)
    neg_r = np.empty(K, np.float64)
    at = 0  # the row's first entry
    s_at = 0  # its first level step
    for p in range(P):
        m = n[p]
        out_i = ids_out[p]
        out_q = logq_out[p]
        out_i[:m] = flat_ids[at : at + m]
        out_i[m:] = 0
        st = flat_steps[s_at : s_at + m - 1]
        level = 0  # the row's last level (levels rise along a row: its largest)
        for j in range(m - 1):
            level += st[j]
        e = exponent[p]
        if e == 0 and level < L:
            # -r by table (float32, as numpy's path); sum_{j>=1} exp(-r_j) in float64 as four
            # running sums in a fixed order (one chain is bound by an add's latency), so a
            # row gives the same bits in any batch
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            out_q[0] = 0.0
            level = 0
            j = 1
            while j + 3 < m:
                level += st[j - 1]
                l0 = level
                level += st[j]
                l1 = level
                level += st[j + 1]
                l2 = level
                level += st[j + 2]
                out_q[j] = neg_r_tab[l0]
                out_q[j + 1] = neg_r_tab[l1]
                out_q[j + 2] = neg_r_tab[l2]
                out_q[j + 3] = neg_r_tab[level]
                s0 += q_tab[l0]
                s1 += q_tab[l1]
                s2 += q_tab[l2]
                s3 += q_tab[level]
                j += 4
            while j < m:
                level += st[j - 1]
                out_q[j] = neg_r_tab[level]
                s0 += q_tab[level]
                j += 1
            z = math.log1p(((s0 + s1) + (s2 + s3)) + tail_q[p])
            z32 = np.float32(z)
            for j in range(m):
                out_q[j] = out_q[j] - z32
        else:  # refined (step / 2^e) or past the table: -r computed, in float64
            h = step / (1 << e)
            level = 0
            neg_r[0] = 0.0
            s0 = 0.0
            for j in range(1, m):
                level += st[j - 1]
                x = -_expand(level * h, knee)
                neg_r[j] = x
                s0 += math.exp(x)
            z = math.log1p(s0 + tail_q[p])
            for j in range(m):
                out_q[j] = np.float32(neg_r[j] - z)
        out_q[m:] = -np.inf
        log_z[p] = z
        at += m
        s_at += m - 1


def tables(neg_r32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(-r float32, exp(-r) float64) for every level of an unrefined row, from the numpy
    path's float32 table of -r (the same -r values, so both paths agree to float32
    rounding of the sum)."""
    return neg_r32, np.exp(neg_r32.astype(np.float64))


__all__ = ["decode_frame", "tables"]
