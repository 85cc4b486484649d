"""Aligned text tables for the command line: columns sized to their widest cell, whatever
the magnitude of the numbers in them."""

from __future__ import annotations

import math
from typing import Sequence


def number(x: float | None, digits: int = 3) -> str:
    """A perplexity or ratio for a table: fixed point while short, scientific beyond 1e6,
    'inf' / 'nan' / '-' as they are."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.{digits}e}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Rows of strings as text: the first `left` columns left-aligned, the rest right-aligned,
    two spaces between columns, a rule under the header."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
