"""How peaked a teacher is on a tokens cache: per domain, the share of positions whose top-1
probability exceeds 0.99 and 0.9, the median top-1 and the mean top-64 mass.

    python benchmarks/teacher_shape.py /tmp/rt/tokens.zarr [TEACHER_DIR]   # default: SmolLM2

The tokens cache is any cache of the teacher's tokenizer (`build --top-k 0 --tokenizer DIR`);
its first 12 validation sequences per domain are scored.
"""

from __future__ import annotations

import sys

import numpy as np

from ddk_cache.capture.teachers.hf import HFTeacher
from ddk_cache.models import smollm2
from ddk_cache.store.cache import Cache


def main() -> None:
    cache = Cache(sys.argv[1])
    teacher = HFTeacher(sys.argv[2] if len(sys.argv) > 2 else str(smollm2()), device="cpu", dtype="float32", batch_size=4)
    print("| domain | positions | top-1 > 0.99 | top-1 > 0.9 | top-1 p median | top-64 mass mean |")
    print("|---|---|---|---|---|---|")
    for d in cache.domains:
        tokens = cache.tokens(d, "val", np.arange(min(12, cache.num_sequences(d, "val"))))
        p1, m64 = [], []
        for _, logp, _ in teacher.rows(tokens):
            top = logp.double().exp().topk(64, -1).values
            p1.append(top[:, 0].numpy())
            m64.append(top.sum(-1).numpy())
        p1, m64 = np.concatenate(p1), np.concatenate(m64)
        print(f"| {d} | {len(p1):,} | {np.mean(p1 > 0.99):.1%} | {np.mean(p1 > 0.9):.1%} | {np.median(p1):.3f} | {m64.mean():.3f} |")


if __name__ == "__main__":
    main()
