"""Tokens/s the distill loader supplies from a cache (read, decompress, decode, pin), and
what students on one H100 consume (arithmetic from FLOPs: no GPU was lent).

    python benchmarks/loader.py --cache /tmp/scale/cache-100M-w2.zarr --batch-size 8 --batches 60 --workers 0 1

The loader draws batches by domain weights as `distill` does, prefetching; each row
measures `--batches` batches after a warm-up batch. Consumption: a training step costs about
6 N FLOPs per token (N = parameters, embeddings included; attention adds a few percent at
these sequence lengths), on an H100 at an assumed 40% of its 989 TFLOP/s bf16 dense peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.train.data import CacheLoader  # noqa: E402

H100_BF16 = 989e12
MFU = 0.40
STUDENTS = {"125M": 125e6, "0.5B": 0.5e9, "1.8B": 1.8e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    cache = Cache(args.cache)
    weights = np.full(len(cache.domains), 1 / len(cache.domains))
    tokens = args.batch_size * cache.seq_len
    rows = []
    supply = {}
    for workers in args.workers:
        with CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=0, prefetch=4, workers=workers) as loader:
            loader.next()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                loader.next()
            elapsed = time.perf_counter() - t0
        supply[workers] = args.batches * tokens / elapsed
        rows.append((workers, f"{supply[workers]:,.0f}", f"{elapsed / args.batches * 1e3:.1f}"))
    print(f"machine: {machine()}; cache {args.cache}: {cache.meta.encoding.name}, top-{cache.top_k}, seq-len {cache.seq_len}, "
          f"{args.batch_size} sequences per batch")
    print_table(("reader processes (0: the reader thread)", "tokens/s supplied", "ms per batch"), rows)
    best = max(supply.values())
    print(f"\nH100 consumption at {MFU:.0%} of {H100_BF16 / 1e12:.0f} TFLOP/s, 6 N FLOPs per token (arithmetic):")
    print_table(("student", "tokens/s per GPU", "8 GPUs per node", "loader cores per GPU at the measured rate"),
                [(name, f"{MFU * H100_BF16 / (6 * n):,.0f}", f"{8 * MFU * H100_BF16 / (6 * n):,.0f}",
                  f"{MFU * H100_BF16 / (6 * n) / best:.2f}") for name, n in STUDENTS.items()])


if __name__ == "__main__":
    main()
