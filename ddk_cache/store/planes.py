"""Byte planes: the integer layout every packed codec (pack-v1, pack-v2, pack-v3) shares.

Non-negative ints stored as little-endian byte planes (all low bytes, then all next
bytes, ...) compress far better under zstd than interleaved ints: the high planes of small
values are runs of zeros. One definition, so the three formats cannot drift apart.
"""

from __future__ import annotations

import numpy as np


def nbytes(max_value: int) -> int:
    """Bytes per value (1-4) that hold every value up to `max_value`."""
    return 1 if max_value < 1 << 8 else 2 if max_value < 1 << 16 else 3 if max_value < 1 << 24 else 4


def planes(values: np.ndarray, nbytes: int) -> bytes:
    """Non-negative ints (< 2**32) as `nbytes` little-endian byte planes."""
    v = np.ascontiguousarray(values, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(v[:, :nbytes].T).tobytes()


def unplanes(buf: memoryview | bytes, count: int, nbytes: int, at: int = 0) -> np.ndarray:
    """Inverse of `planes`: uint32 [count] from `nbytes` planes starting at byte `at`."""
    b = np.frombuffer(buf, np.uint8, count * nbytes, at).reshape(nbytes, count)
    out = b[nbytes - 1].astype(np.uint32)
    for i in range(nbytes - 2, -1, -1):
        out <<= 8
        out |= b[i]
    return out


def starts(counts: np.ndarray) -> np.ndarray:
    """Index of each position's first entry in the flat, position-major entry arrays."""
    return np.cumsum(counts) - counts
