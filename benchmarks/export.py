"""Export and import throughput and size: a cache written as plain Parquet (`ddk-cache
export`) and read back into a cache (`ddk-cache import`), issue #28.

    python benchmarks/export.py --cache /tmp/quality-real/cache.zarr --out /tmp/export-bench \
        --tokenizer ~/.cache/ddk-cache/smollm2-135m-instruct

Exports the whole cache once per Parquet compression (one process, one core for the
encoding work; pyarrow may use a second thread to compress), and prints tokens/s, the
cache's bytes per token and the export's, and the export's reading rate with plain pyarrow
(tokens/s, all columns decoded to Arrow); then imports the first export back into a cache
(tokens/s, its bytes per token); then the same for axolotl's KD rows (`export --format
axolotl`, then `import --from axolotl`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.export import export_parquet  # noqa: E402
from ddk_cache.importer import import_capture  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True, help="scratch directory (replaced)")
    ap.add_argument("--compression", nargs="+", default=["zstd", "snappy", "none"])
    ap.add_argument("--tokenizer", required=True, help="the teacher's tokenizer directory (the axolotl import needs it)")
    args = ap.parse_args()
    from ddk_cache.capture.tokenization import load_tokenizer

    load_tokenizer(args.tokenizer)  # transformers' import (~8 s, once per process) is not the import's rate
    cache = Cache(args.cache)
    tokens = sum(cache.num_sequences(d, s) for d in cache.domains for s in ("train", "val")) * cache.seq_len
    cache_bytes = sum(p.stat().st_size for p in Path(args.cache).rglob("*") if p.is_file())
    print(f"machine: {machine()}; cache {args.cache}: {cache.meta.targets.describe()}, {cache.meta.encoding.name}, "
          f"{tokens:,} tokens, {cache_bytes / tokens:.1f} B/token on disk\n")
    rows = []
    for comp in args.compression:
        out = Path(args.out) / comp
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        m = export_parquet(args.cache, str(out), compression=comp)
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        t0 = time.perf_counter()
        for rel in m["files"]:
            pq.read_table(out / rel)
        rt = time.perf_counter() - t0
        rows.append((comp, f"{tokens / dt:,.0f}", f"{size / tokens:.1f}", f"{size / cache_bytes:.2f}x", f"{tokens / rt:,.0f}"))
    print_table(("parquet compression", "export tokens/s", "export B/token", "vs the cache", "read tokens/s (pyarrow)"), rows)
    back = Path(args.out) / "imported.zarr"
    shutil.rmtree(back, ignore_errors=True)
    t0 = time.perf_counter()
    import_capture(str(Path(args.out) / args.compression[0]), str(back))
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in back.rglob("*") if p.is_file())
    imports = [(f"--from ddk ({args.compression[0]} export)", f"{tokens / dt:,.0f}", f"{size / tokens:.1f}",
                f"{size / cache_bytes:.2f}x")]
    # axolotl's KD rows: exported in that layout, then imported back (renormalised top-k, no tail).
    ax, back = Path(args.out) / "axolotl", Path(args.out) / "imported-axolotl.zarr"
    shutil.rmtree(ax, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    t0 = time.perf_counter()
    export_parquet(args.cache, str(ax), layout="axolotl")
    ax_dt = time.perf_counter() - t0
    ax_size = sum(p.stat().st_size for p in ax.rglob("*.parquet"))
    t0 = time.perf_counter()
    import_capture(str(ax), str(back), layout="axolotl", tokenizer=args.tokenizer, vocab_size=cache.meta.vocab_size)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in back.rglob("*") if p.is_file())
    imports.append((f"--from axolotl (its KD rows: {ax_size / tokens:.1f} B/token, exported at {tokens / ax_dt:,.0f} tokens/s)",
                    f"{tokens / dt:,.0f}", f"{size / tokens:.1f}", f"{size / cache_bytes:.2f}x"))
    print()
    print_table(("import", "tokens/s", "cache B/token", "vs the source cache"), imports)


if __name__ == "__main__":
    main()
