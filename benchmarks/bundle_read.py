"""What reading a batch costs per cache layout: the same rows from caches that hold the same
data in different layouts (format 3: an object per array; format 5: one bundle per shard).

    ddk-cache export /tmp/quality-real/cache.zarr --out /tmp/ab5/export          # a format-3 cache's rows
    ddk-cache import /tmp/ab5/export --out /tmp/ab5/v5.zarr --shard-sequences 3044
    OMP_NUM_THREADS=1 python benchmarks/bundle_read.py format-3=/tmp/quality-real/cache.zarr format-5=/tmp/ab5/v5.zarr

Per repeat, 8 random training rows of one domain (domains in turn) are read from every
cache in turn (a different cache first each time), in one process: their tokens alone, then tokens + decoded targets, as the
loader reads them. Reports medians; checks that every cache gives the same tokens and ids.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", help="NAME=PATH, caches of the same rows")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    caches = {name: Cache(path) for name, path in (c.split("=", 1) for c in args.caches)}
    first = next(iter(caches.values()))
    rng = np.random.default_rng(0)
    times = {name: ([], []) for name in caches}
    for rep in range(args.repeats):
        domain = first.domains[rep % len(first.domains)]
        rows = np.sort(rng.choice(first.num_sequences(domain, "train"), args.rows, replace=False))
        got = []
        order = list(caches.items())
        order = order[rep % len(order):] + order[: rep % len(order)]  # each cache first in turn: no order bias
        for name, cache in order:
            t0 = time.perf_counter()
            tokens = cache.tokens(domain, "train", rows)
            t1 = time.perf_counter()
            targets = cache.targets_of(domain, "train", rows)
            t2 = time.perf_counter()
            times[name][0].append(t1 - t0)
            times[name][1].append(t2 - t0)
            got.append((tokens, targets.ids))
        assert all((g[0] == got[0][0]).all() and (g[1] == got[0][1]).all() for g in got), "the caches hold different rows"
    P = first.seq_len - 1
    table = []
    for name, (tok, both) in times.items():
        c = caches[name]
        table.append((name, c.meta.format_version, "yes" if c.meta.bundled else "no", f"{np.median(tok) * 1e3:.3f}",
                      f"{np.median(both) * 1e3:.2f}", f"{args.rows * P / np.median(both):,.0f}"))
    print(f"machine: {machine()}; {args.repeats} repeats of {args.rows} rows x {P} positions")
    print_table(("cache", "format", "bundled", f"tokens of {args.rows} rows (ms)", "tokens + targets decoded (ms)",
                 "positions/s (tokens + targets)"), table)


if __name__ == "__main__":
    main()
