"""Time to read one sequence's row: zarr's `array[i]` vs `ddk_cache.store.shard_rows` (the loader's path).

    python benchmarks/row_read.py --cache C.zarr --rows 300

Per array of the training split of the first domain: median over random rows (the first
read of each kind not counted). Rows are checked equal. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from common import machine, print_table

from ddk_cache.store.shard_rows import ShardRows
from ddk_cache.store.cache import TOKENS, Cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--rows", type=int, default=300)
    args = p.parse_args()
    cache = Cache(args.cache)
    domain = cache.domains[0]
    print(f"machine: {machine()}")
    print(f"{args.cache}, {domain}/train, {args.rows} random rows, median per read\n")
    rows = []
    for name in (TOKENS, *cache.target_arrays):
        array = cache.root[f"{domain}/train/{name}"]
        direct = ShardRows.open(array)
        assert direct is not None, f"{name}: not the layout shard_rows reads"
        picks = np.random.default_rng(0).integers(0, array.shape[0], args.rows)
        times: dict[str, list[float]] = {"zarr": [], "shard_rows": []}
        for i in picks:
            i = int(i)
            for label, read in (("zarr", lambda: array[i]), ("shard_rows", lambda: direct.row(i))):
                start = time.perf_counter()
                read()
                times[label].append(time.perf_counter() - start)
            np.testing.assert_array_equal(direct.row(i), array[i])
        z, d = (statistics.median(times[k][1:]) * 1e3 for k in ("zarr", "shard_rows"))
        rows.append((name, f"{array.nbytes / array.shape[0]:,.0f}", f"{z:.3f}", f"{d:.3f}", f"{z / d:.1f}x"))
    print_table(("array", "row bytes (decoded)", "zarr ms", "shard_rows ms", "speed-up"), rows)


if __name__ == "__main__":
    main()
