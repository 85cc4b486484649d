"""How well a cache's teacher positions line up with another tokenizer's (issue #26), and
what turning rows into the other tokenizer's costs a reader.

    python benchmarks/crosstok_alignment.py --cache /tmp/qs5/cache.zarr --tokenizer /tmp/codec-bench/teacher-run/final

For each domain's training rows (up to --rows): the row as text in the other tokenizer
(crosstok.RowText.student_row), the alignment of its positions with the teacher's (a
student position is paired with the teacher position that has read the same bytes), and
the vocabulary map (teacher ids whose bytes are one student id). Reports the student's
tokens per teacher token, the share of student positions with a partner, and over paired
positions the share of the teacher's probability (its stored top-k; the tail is unmapped by
definition) on ids that map to a student id: what an exact-vocabulary loss can use. Speed:
the distill loader's read of a batch (data.SequenceReader: tokens, loss masks, targets
decoded), plain and with the batch converted to the student's tokens (crosstok.CrossTokenizer:
re-tokenizing, pairing, mapping; `paired` for hybrid and uld, `prefix`), one process, in
tokens of the cache per second, after one warm-up pass (prefix fills its table of first
pieces on first sight).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.capture.tokenization import cache_tokenizer, load_tokenizer  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.train.crosstok import RowText  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--tokenizer", required=True, help="the other tokenizer (a model directory)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    cache = Cache(args.cache)
    rt = RowText(cache_tokenizer(cache), load_tokenizer(args.tokenizer))
    vmap = rt.vocab_map()
    table, speed = [], []
    for d in cache.domains:
        n = min(args.rows, cache.num_sequences(d, "train"))
        t0 = time.perf_counter()
        batches = [cache.read(d, "train", s, min(n, s + args.batch)) for s in range(0, n, args.batch)]
        read = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = {"t": 0, "s": 0, "s_pos": 0, "paired": 0, "mass": 0.0, "mapped": 0.0, "unusable": 0}
        for b in batches:
            for r, srow in enumerate(rt.student_rows(b.tokens)):
                row = b.tokens[r]
                if srow is None:
                    stats["unusable"] += 1
                    continue
                j = rt.align(row, srow)
                stats["t"] += len(row)
                stats["s"] += len(srow.ids) - srow.prefix
                stats["s_pos"] += len(j)
                pj = j[j >= 0]
                stats["paired"] += len(pj)
                ids, lps = b.topk_ids[r, pj], b.topk_logprobs[r, pj].astype(np.float64)
                p = np.exp(lps)
                stats["mass"] += float(p.sum())
                stats["mapped"] += float(p[vmap[ids] >= 0].sum())
        both = read + time.perf_counter() - t0
        tokens = n * cache.seq_len
        table.append((d, n, stats["unusable"], f"{stats['s'] / stats['t']:.3f}", f"{stats['paired'] / stats['s_pos']:.3f}",
                      f"{stats['mapped'] / stats['mass']:.3f}"))
        speed.append((d, f"{tokens / read:,.0f}", f"{tokens / both:,.0f}", f"{read / both:.2f}"))
    print(f"machine: {machine()}; cache {args.cache}; other tokenizer {args.tokenizer} "
          f"({len(rt.s_lengths):,} ids; {int((vmap >= 0).sum()):,} of the teacher's {len(vmap):,} ids map to one of its ids)")
    print_table(("domain", "rows", "unusable", "student tokens per teacher token", "student positions paired",
                 "teacher top-k mass on mapped ids (paired positions)"), table)
    print()
    from ddk_cache.train.crosstok import CrossTokenizer
    from ddk_cache.train.data import SequenceReader

    student = load_tokenizer(args.tokenizer)
    readers = {"plain": SequenceReader(cache, True)}
    for mode in CrossTokenizer.MODES:
        readers[mode] = SequenceReader(cache, True, crosstok=CrossTokenizer(rt_teacher := cache_tokenizer(cache), student, len(student), mode=mode))
    speed = []
    for i, d in enumerate(cache.domains):
        n = min(args.rows, cache.num_sequences(d, "train"))
        batches = [[(i, s) for s in range(b, min(n, b + args.batch))] for b in range(0, n, args.batch)]
        rate = {}
        for name, reader in readers.items():
            for b in batches:  # warm-up: file handles, the prefix table
                reader.read(b)
            t0 = time.perf_counter()
            for b in batches:
                reader.read(b)
            rate[name] = n * cache.seq_len / (time.perf_counter() - t0)
        speed.append((d, f"{rate['plain']:,.0f}", *(f"{rate[m]:,.0f} ({rate[m] / rate['plain']:.2f}x)" for m in CrossTokenizer.MODES)))
    del rt_teacher
    print_table(("domain", "loader read (cache tokens/s)", *(f"converted: {m}" for m in CrossTokenizer.MODES)), speed)


if __name__ == "__main__":
    main()
