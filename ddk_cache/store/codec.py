"""The `pack-v1` target codec: one sequence's sparse teacher targets <-> one byte string.

Vectorised numpy over a whole sequence (P positions, at most K entries each); the layout is
specified in storage_layout.md ("Encoding pack-v1"), and this module is its only writer.

What it exploits, and why:
  - ids are a set per position: sorted ascending and stored as gaps (id - previous id - 1),
    small for the frequent (low-id) tokens that fill most top-k lists; neighbouring
    positions share many ids, which zstd's matcher finds in the gap stream;
  - an entry of probability p with log-prob error d adds about p*d^2/2 to KL, so the
    log-probs are quantised uniformly in sqrt(p) (step h): the error in log p is about
    2h/sqrt(p), large only where p is small, and each entry adds h^2/6 to the KL whatever
    its p. h comes from a KL budget: h = sqrt(6 * budget / K);
  - the top-1 log-prob and the kept mass (hence the tail bucket) are stored apart, finely
    (steps 2^-7 and 2^-8 nats), and the other entries are rescaled to the stored kept mass,
    so quantisation never moves mass in or out of the tail;
  - each stream is split into byte planes (high bytes are mostly zero) and zstd-compressed
    on its own, so each gets its own entropy tables.
Sampled targets keep unique ids (same gap stream) and their draw counts; with a sampling
temperature != 1 also each id's log-prob (step 2^-10 nats), for the importance weights.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from numcodecs import Zstd

from .planes import planes as _planes, starts as _starts, unplanes as _unplanes

TOP1_STEP = 2.0**-7  # nats per unit of the top-1 code (uint16: up to 512 nats; error <= 2^-8 nats)
TAIL_STEP = 2.0**-8  # nats per unit of -log(tail mass) (relative error <= 0.2%); code 65535 = no tail
LOGP_STEP = 2.0**-10  # nats per unit of a sampled id's -log p (uint16: up to 64 nats)
NO_TAIL = 65535
MAX_ENTRIES = 255  # entries per position fit a uint8 count


def step_for_budget(kl_budget: float, max_entries: int) -> float:
    """The sqrt(p) quantisation step that keeps the expected KL per position near `kl_budget`."""
    return math.sqrt(6.0 * kl_budget / max(1, max_entries))


def id_bytes(vocab_size: int) -> int:
    """Byte planes an id gap needs: 2 up to 65,536 ids, else 3 (vocabularies up to 2^24)."""
    return 2 if vocab_size <= 1 << 16 else 3


class PackCodec:
    """Encode and decode one sequence's targets; see the module docstring."""

    def __init__(self, *, vocab_size: int, max_entries: int, step: float, level: int = 3) -> None:
        self.vocab_size, self.max_entries, self.step = vocab_size, max_entries, step
        self.id_bytes = id_bytes(vocab_size)
        self.level = level
        self._zstd = Zstd(level=level)
        # Reconstruction of sqrt(p) level l is (l + 0.5) * step: the middle of its bin.
        self._level_logp = (2.0 * np.log((np.arange(1 << 16) + 0.5) * step)).astype(np.float32)

    def capacity(self, positions: int) -> int:
        """Bytes a packed sequence can take at most (zstd's worst case on every stream)."""
        P, K = positions, self.max_entries
        raw = [P, P * K * self.id_bytes, P * K * 2, P, 2 * P, 2 * P]  # the largest stream set (top-k)
        bound = lambda n: n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0) + 64
        return 1 + 4 * len(raw) + sum(bound(n) for n in raw)

    # -- framing: a count of streams, their compressed sizes, then the streams --
    def _frame(self, streams: list[bytes], levels: list[int]) -> bytes:
        # The id gaps gain from zstd's deeper match search; the other streams are all
        # entropy (Huffman) and compress as well at level 3, faster.
        packed = [Zstd(level=lv).encode(st) if st else b"" for st, lv in zip(streams, levels)]
        return struct.pack(f"<B{len(packed)}I", len(packed), *map(len, packed)) + b"".join(packed)

    def _unframe(self, blob: bytes | memoryview) -> list[bytes]:
        n = blob[0]
        sizes = struct.unpack_from(f"<{n}I", blob, 1)
        out, at = [], 1 + 4 * n
        for size in sizes:
            out.append(bytes(self._zstd.decode(blob[at : at + size])) if size else b"")
            at += size
        return out

    def _sorted_ids(self, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat order, counts, gap stream): the kept entries, position-major, ids ascending."""
        P, K = ids.shape
        # Row-wise sorts (cache-friendly, ~3x faster than one flat sort); dropped entries last.
        key = np.where(keep, ids.astype(np.int32), np.int32(2**31 - 1))
        order = (np.argsort(key, axis=1) + (np.arange(P) * K)[:, None]).ravel()
        order = order[keep.ravel()[order]]
        sid = ids.ravel()[order].astype(np.int64)
        counts = keep.sum(1)
        prev = np.empty_like(sid)
        prev[1:] = sid[:-1]
        prev[_starts(counts)[counts > 0]] = -1  # a position's first id is coded from 0
        return order, counts, sid - prev - 1

    def _ids_from_gaps(self, counts: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        """Flat ids (position-major, ascending within a position) from counts and gaps."""
        g = gaps.astype(np.int64) + 1
        csum = np.cumsum(g)
        # Each position's running sum restarts: subtract the total before its first entry.
        before = np.concatenate([[0], csum])[_starts(counts)]
        return csum - np.repeat(before, counts) - 1

    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray) -> bytes:
        """ids int [P, K] and float32 log-probs [P, K] in rank order (entry 0 = top-1);
        entries with log-prob -inf are not kept (adaptive k). Every position keeps >= 1."""
        P, K = ids.shape
        keep = np.isfinite(logprobs)
        keep[:, 0] = True
        order, counts, gaps = self._sorted_ids(ids, keep)
        # The top-1 (rank 0) is stored apart, finely: the levels cover the other kept entries.
        rank = order % K
        lp_sorted = logprobs.ravel()[order]
        levels = np.floor(np.exp(lp_sorted[rank != 0] * 0.5) / self.step)
        levels = np.clip(levels, 0, 65535).astype(np.uint32)
        top1_at = (np.flatnonzero(rank == 0) - _starts(counts)).astype(np.uint8)
        top1 = np.clip(np.rint(-logprobs[:, 0].astype(np.float64) / TOP1_STEP), 0, 65535).astype(np.uint32)
        tail = 1.0 - np.exp(np.where(keep, logprobs, -np.inf).astype(np.float64)).sum(1)
        tail_code = np.where(tail > 0, np.clip(np.rint(-np.log(np.maximum(tail, 1e-300)) / TAIL_STEP), 0, NO_TAIL - 1), NO_TAIL)
        return self._frame([
            counts.astype(np.uint8).tobytes(), _planes(gaps, self.id_bytes), _planes(levels, 2),
            top1_at.tobytes(), _planes(top1, 2), _planes(tail_code.astype(np.uint32), 2),
        ], [3, self.level, 3, 3, 3, 3])

    def decode_topk(self, blob: bytes | memoryview, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [P, K], log-probs float32 [P, K]): kept entries in ascending id order,
        then padding (id 0, log-prob -inf)."""
        s_counts, s_gaps, s_levels, s_top1_at, s_top1, s_tail = self._unframe(blob)
        P, K = positions, self.max_entries
        counts = np.frombuffer(s_counts, np.uint8).astype(np.int64)
        total = int(counts.sum())
        flat_ids = self._ids_from_gaps(counts, _unplanes(s_gaps, total, self.id_bytes))
        starts = _starts(counts)
        top1_flat = starts + np.frombuffer(s_top1_at, np.uint8)
        is_rest = np.ones(total, bool)
        is_rest[top1_flat] = False
        flat_lp = np.zeros(total, np.float64)
        flat_lp[is_rest] = self._level_logp[_unplanes(s_levels, total - P, 2)]
        top1_lp = -_unplanes(s_top1, P, 2).astype(np.float64) * TOP1_STEP
        tail_code = _unplanes(s_tail, P, 2)
        mass = np.where(tail_code == NO_TAIL, 1.0, -np.expm1(-tail_code.astype(np.float64) * TAIL_STEP))
        # Rescale the non-top-1 entries so the kept mass is the stored one: the tail bucket
        # is then exact, and quantisation errors stay inside the kept entries.
        flat_p = np.exp(flat_lp)
        flat_p[top1_flat] = 0.0
        pos = np.repeat(np.arange(P), counts)
        rest = np.bincount(pos, flat_p, minlength=P)
        want = mass - np.exp(top1_lp)
        scale = np.where((rest > 0) & (want > 0), want / np.where(rest > 0, rest, 1.0), 1.0)
        flat_lp = flat_lp + np.log(scale)[pos]
        flat_lp[top1_flat] = top1_lp
        return self._scatter(P, K, counts, pos, starts, flat_ids, flat_lp)

    @staticmethod
    def _scatter(P: int, K: int, counts: np.ndarray, pos: np.ndarray, starts: np.ndarray, flat_ids: np.ndarray, flat_lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        col = np.arange(len(pos)) - np.repeat(starts, counts)
        ids = np.zeros((P, K), np.int64)
        lps = np.full((P, K), -np.inf, np.float32)
        ids[pos, col] = flat_ids
        lps[pos, col] = flat_lp
        return ids, lps

    def encode_sampled(self, ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray | None) -> bytes:
        """Unique sampled ids int [P, K] with their draw counts [P, K] (0 = padding) and, for
        a sampling temperature != 1, their teacher log-probs [P, K]."""
        order, n, gaps = self._sorted_ids(ids, counts > 0)
        streams = [n.astype(np.uint8).tobytes(), _planes(gaps, self.id_bytes), counts.ravel()[order].astype(np.uint8).tobytes()]
        if logprobs is not None:
            lp = logprobs.ravel()[order].astype(np.float64)
            streams.append(_planes(np.clip(np.rint(-lp / LOGP_STEP), 0, 65535).astype(np.uint32), 2))
        return self._frame(streams, [3, self.level, 3, 3])

    def decode_sampled(self, blob: bytes | memoryview, positions: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [P, K], log target weights float32 [P, K]): weights sum to 1 per position;
        counts/N at temperature 1, else counts * p^(1 - 1/temperature), normalised."""
        streams = self._unframe(blob)
        counts = np.frombuffer(streams[0], np.uint8).astype(np.int64)
        total = int(counts.sum())
        flat_ids = self._ids_from_gaps(counts, _unplanes(streams[1], total, self.id_bytes))
        w = np.frombuffer(streams[2], np.uint8).astype(np.float64)
        if temperature != 1.0:
            logp = -_unplanes(streams[3], total, 2).astype(np.float64) * LOGP_STEP
            w = w * np.exp(logp * (1.0 - 1.0 / temperature))
        pos = np.repeat(np.arange(positions), counts)
        w = w / np.bincount(pos, w, minlength=positions)[pos]
        starts = _starts(counts)
        return self._scatter(positions, self.max_entries, counts, pos, starts, flat_ids, np.log(w))
