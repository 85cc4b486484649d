"""DistillKit captures, side by side with this cache, and imported (issue #28).

    python benchmarks/distillkit_import.py --cache /tmp/quality-real/cache.zarr --distillkit /tmp/dk \
        --tokenizer ~/.cache/ddk-cache/smollm2-135m-instruct --sequences 64 --work /tmp/dk-bench

`--distillkit` is a checkout of arcee-ai/DistillKit (its `distillkit/` package): its own
`LogprobCompressor` writes the captures and its own `decompress_to_sparse` decodes them;
it is imported from there, never installed (it is not a dependency, and not on PyPI).

For each DistillKit compression config (k <= the cache's k), the teacher's top-k rows of
the first `--sequences` sequences of each domain of `--cache` (a SmolLM2 top-64 cache, its
pack-v3 values within 2^-9 of the teacher's) are compressed by DistillKit and written in
its schema (`compressed_logit_schema`: input_ids list<uint64>, compressed_logprobs and
bytepacked_indices list<list<uint8>>, pyarrow's default Snappy, as its
StreamingParquetWriter writes), one directory per domain. Then, per config:

* bytes/token of the capture, and of this cache's pack-v3 top-64 of the same sequences;
* `ddk-cache import --from distillkit` (pack-v3 and plain): tokens/s on one core, and the
  imported cache's bytes/token;
* the decode: ids equal and the largest log-prob difference between this project's decoder
  and DistillKit's decompressor;
* the loss: forward KL (sparse, tail bucket) of a random student against the targets read
  from the imported caches and against DistillKit's decompressed targets, mean over every
  position of 8 train rows per domain; the relative difference is what "the same loss" means here. The
  teacher's own top-k (the source rows before DistillKit's compression) gives the loss both
  should approach; where DistillKit's polynomial decodes log-probs above 0 (p > 1), the
  import clamps them to 0, and the column says at what share of positions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.importer import import_capture  # noqa: E402
from ddk_cache.sources import decode_distillkit  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.train.losses import KDConfig, sparse_kd  # noqa: E402

CONFIGS = {
    # 56 + k ceil(log2 V) / 8 bytes: the formula the README compares with (its recommended
    # settings at k = 64: 16 exact bf16 values, 6 polynomial terms).
    "k64 16 bf16 + poly6": {"k": 64, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
                            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False},
    # Its README's "budget pick" (~114 B/token).
    "k50 1 bf16 + poly3 (budget)": {"k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
                                    "term_dtype": "float32", "residual_bins": [], "delta_encoding": False},
    # Residual bins and delta coding: k = 64, 8 exact float32, the rest in 4-bit residuals.
    "k64 8 f32 + delta + 4-bit bins": {"k": 64, "exact_k": 8, "exact_dtype": "float32", "polynomial_terms": [0, 1, 2],
                                       "term_dtype": "float32", "delta_encoding": True,
                                       "residual_bins": [{"scale_dtype": "float16", "element_bits": 4, "num_elements": 56}]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--distillkit", required=True, help="a DistillKit checkout (the directory holding distillkit/)")
    ap.add_argument("--tokenizer", required=True, help="the teacher's tokenizer directory")
    ap.add_argument("--sequences", type=int, default=64, help="per domain")
    ap.add_argument("--work", required=True, help="scratch directory (replaced)")
    args = ap.parse_args()
    sys.path.insert(0, args.distillkit)
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    torch.set_num_threads(1)
    from ddk_cache.capture.tokenization import load_tokenizer

    load_tokenizer(args.tokenizer)  # transformers' import (~8 s, once per process) is not the import's rate
    cache = Cache(args.cache)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    V = cache.meta.vocab_size
    rows = {d: cache.read(d, "train", 0, min(args.sequences, cache.num_sequences(d, "train"))) for d in cache.domains}
    tokens = sum(b.tokens.size for b in rows.values())
    print(f"machine: {machine()}; source {args.cache}: {cache.meta.targets.describe()}, V = {V:,}; "
          f"{len(rows)} domains x {args.sequences} sequences = {tokens:,} tokens\n")
    out_rows, agree_rows = [], []
    for name, raw_cfg in CONFIGS.items():
        cfg = DistributionQuantizationConfig.model_validate({"d": V, "error_diffusion": False, "normalize_t": False, **raw_cfg})
        comp = LogprobCompressor(config=cfg)
        src = work / name.split()[0] / name.replace(" ", "_").replace("(", "").replace(")", "")
        t0 = time.perf_counter()
        captured = {}
        for d, b in rows.items():
            (src / d).mkdir(parents=True)
            ids = torch.from_numpy(b.topk_ids[..., : cfg.k].astype(np.int64))
            lps = torch.from_numpy(b.topk_logprobs[..., : cfg.k].copy())
            packed = comp.compress_from_sparse(ids, lps)
            lp_bytes, id_bytes = packed["compressed_logprobs"].numpy(), packed["bytepacked_indices"].numpy()
            captured[d] = (lp_bytes, id_bytes)
            schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                                pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                                pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
            table = pa.table({"input_ids": b.tokens.astype(np.uint64).tolist(), "compressed_logprobs": lp_bytes.tolist(),
                              "bytepacked_indices": id_bytes.tolist()}, schema=schema)
            pq.write_table(table, src / d / "data_0.parquet")
        (src / "compression_config.yaml").write_text(__import__("yaml").safe_dump(cfg.model_dump(mode="json")))
        capture_s = time.perf_counter() - t0
        capture_bytes = sum(p.stat().st_size for p in src.rglob("*.parquet"))
        # The decoders side by side, per position.
        worst, ids_equal = 0.0, True
        for d, (lp_bytes, id_bytes) in captured.items():
            theirs_ids, theirs = comp.decompress_to_sparse({"compressed_logprobs": torch.from_numpy(lp_bytes),
                                                            "bytepacked_indices": torch.from_numpy(id_bytes)})
            mine_ids, mine = decode_distillkit(raw_cfg | {"d": V}, lp_bytes.reshape(-1, lp_bytes.shape[-1]),
                                               id_bytes.reshape(-1, id_bytes.shape[-1]))
            ids_equal &= bool(np.array_equal(mine_ids, theirs_ids.reshape(-1, cfg.k).numpy()))
            worst = max(worst, float(np.abs(mine - theirs.float().reshape(-1, cfg.k).numpy()).max()))
        agree_rows.append((name, "yes" if ids_equal else "NO", f"{worst:.1e}"))
        results = {}
        for enc in ("pack", "plain"):
            dest = work / f"{src.name}-{enc}.zarr"
            t0 = time.perf_counter()
            import_capture(str(src), str(dest), layout="distillkit", tokenizer=args.tokenizer, encoding=enc, val_fraction=0.05)
            dt = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            results[enc] = (Cache(str(dest)), tokens / dt, size / tokens)
        # The same loss from each: forward KL of a random student, every position of every domain's train rows.
        gen = torch.Generator().manual_seed(0)
        losses = {"DistillKit's decompressor": [], "import, plain": [], "import, pack-v3": [], "teacher": []}
        for d, (lp_bytes, id_bytes) in captured.items():
            theirs_ids, theirs = comp.decompress_to_sparse({"compressed_logprobs": torch.from_numpy(lp_bytes),
                                                            "bytepacked_indices": torch.from_numpy(id_bytes)})
            n_train = min(8, results["plain"][0].num_sequences(d, "train"))  # [positions, V] logits: 8 x 255 x V floats
            P = theirs.shape[1]
            logits = torch.randn(n_train * P, V, generator=gen) * 2
            kd = KDConfig("fkl")
            losses["DistillKit's decompressor"].append(sparse_kd(
                logits, theirs_ids[:n_train].reshape(-1, cfg.k), theirs[:n_train].float().reshape(-1, cfg.k), kd).double())
            b = rows[d]
            losses["teacher"].append(sparse_kd(logits, torch.from_numpy(b.topk_ids[:n_train, :, : cfg.k].reshape(-1, cfg.k)).long(),
                                               torch.from_numpy(b.topk_logprobs[:n_train, :, : cfg.k].reshape(-1, cfg.k)), kd).double())
            for enc, key in (("plain", "import, plain"), ("pack", "import, pack-v3")):
                got = results[enc][0].read(d, "train", 0, n_train)
                tail = None if got.tail_logprob is None else torch.from_numpy(got.tail_logprob.reshape(-1))
                losses[key].append(sparse_kd(logits, torch.from_numpy(got.topk_ids.reshape(-1, got.topk_ids.shape[-1])).long(),
                                             torch.from_numpy(got.topk_logprobs.reshape(-1, got.topk_ids.shape[-1])), kd,
                                             tail_logprob=tail).double())
        mean = {k: float(torch.cat(v).mean()) for k, v in losses.items()}
        ref = mean["DistillKit's decompressor"]
        out_rows.append((name, f"{capture_bytes / tokens:.1f}", f"{results['pack'][2]:.1f}", f"{results['plain'][2]:.1f}",
                         f"{results['pack'][1]:,.0f}", f"{results['plain'][1]:,.0f}", f"{tokens / capture_s:,.0f}",
                         f"{mean['teacher']:.6f}", f"{ref:.6f}", f"{mean['import, plain']:.6f}",
                         f"{abs(mean['import, plain'] - ref) / ref:.1e}",
                         f"{abs(mean['import, pack-v3'] - ref) / ref:.1e}",
                         f"{results['plain'][0].meta.corpus['capture'].get('clamped', 0):.2%}"))
    print_table(("DistillKit config", "capture B/token", "imported, pack-v3 B/token", "imported, plain B/token",
                 "import tok/s (pack-v3)", "import tok/s (plain)", "DistillKit compress+write tok/s",
                 "fkl mean (teacher's top-k)", "fkl mean (DistillKit's decode)", "fkl mean (import, plain)", "rel. diff, import plain",
                 "rel. diff, import pack-v3", "positions clamped (log-prob > 0)"), out_rows)
    print()
    print_table(("DistillKit config", "ids equal", "max |log-prob difference|, this decoder vs DistillKit's"), agree_rows)
    source_bytes = sum(p.stat().st_size for d in cache.domains for p in (Path(args.cache) / d / "train").rglob("*")
                       if p.is_file()) / max(1, sum(cache.num_sequences(d, "train") for d in cache.domains) * cache.seq_len)
    print(f"\nthe source cache (pack-v3 top-{cache.top_k}, built by `ddk-cache build`), train splits: {source_bytes:.1f} B/token")


if __name__ == "__main__":
    main()
