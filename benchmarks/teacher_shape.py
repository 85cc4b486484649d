"""How peaked a teacher is on a tokens cache: per domain, the share of positions whose top-1
probability exceeds 0.99 and 0.9, the median top-1 and the mean top-64 mass.

    python benchmarks/teacher_shape.py /tmp/rt/tokens.zarr [TEACHER_DIR]   # default: SmolLM2

The tokens cache is any cache of the teacher's tokenizer (`build --top-k 0 --tokenizer DIR`);
its first 12 validation sequences per domain are scored (peaked_teacher.peakedness, per domain).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from peaked_teacher import peakedness  # noqa: E402

from ddk_cache.models import smollm2  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402


def main() -> None:
    cache = Cache(sys.argv[1])
    teacher = sys.argv[2] if len(sys.argv) > 2 else str(smollm2())
    print("| domain | positions | top-1 > 0.99 | top-1 > 0.9 | top-1 p median | top-64 mass mean |")
    print("|---|---|---|---|---|---|")
    for d in cache.domains:
        shape = peakedness(teacher, cache, 12, [d])
        p1, m64 = shape["top1"], shape["top64"]
        print(f"| {d} | {len(p1):,} | {np.mean(p1 > 0.99):.1%} | {np.mean(p1 > 0.9):.1%} | {np.median(p1):.3f} | {m64.mean():.3f} |")


if __name__ == "__main__":
    main()
