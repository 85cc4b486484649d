"""Build throughput on a real corpus: make (or reuse) a local Llama-style teacher, build its cache, print a table.

    python benchmarks/build_throughput.py --corpus ../shared/corpora/dev --work /tmp/ddk-bench

Prints the machine, the teacher, tokens/s of the whole build, the teacher's share and the
writer's (encode + write, in a background thread overlapping the teacher), then `inspect`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import transformers  # noqa: F401  imported up front: its first import takes seconds and is not build time
from common import machine, teacher as make_teacher

from ddk_cache.capture.build import BuildConfig, build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True, help="folder for the teacher and the cache (the cache is rebuilt)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens-per-domain", type=int, default=None)
    p.add_argument("--writer-threads", type=int, default=0, help="0 = automatic (half the cores, 1 to 8)")
    p.add_argument("--clevel", type=int, default=5)
    args = p.parse_args()

    work = Path(args.work)
    teacher = make_teacher(args.corpus, work, vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers,
                           heads=args.heads, context=max(2048, args.seq_len + 1))
    out = work / "cache.zarr"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(teacher=str(teacher), data=args.corpus, out=str(out), top_k=args.top_k, seq_len=args.seq_len,
                         batch_size=args.batch_size, device=args.device, dtype=args.dtype, backend="hf",
                         max_tokens_per_domain=args.max_tokens_per_domain, writer_threads=args.writer_threads, clevel=args.clevel)
    r = build(config, progress=sys.stderr.isatty())
    t = r.meta["teacher"]
    rows = [
        ("machine", machine()),
        ("teacher", f"{t['architecture']} {t['num_parameters'] / 1e6:.1f}M params, vocab {r.meta['vocab_size']}, {t['dtype']}, {t['backend']}"),
        ("settings", f"seq-len {args.seq_len}, top-k {args.top_k}, batch {args.batch_size}, shards of {r.meta['shard_sequences']} seqs, "
                     f"{args.writer_threads or 'auto'} writer threads, zstd level {args.clevel}"),
        ("tokens scored", f"{r.tokens_scored:,}"),
        ("build wall time", f"{r.seconds:.1f} s (tokenize + score + write + finalize)"),
        ("build throughput", f"{r.tokens_per_second:,.0f} tokens/s"),
        ("teacher time", f"{r.teacher_seconds:.1f} s ({r.tokens_scored / r.teacher_seconds:,.0f} tokens/s)"),
        ("encode + write time", f"{r.write_seconds:.1f} s summed over writer threads = {r.write_seconds / r.teacher_seconds:.1%} of teacher time"),
        ("phases", ", ".join(f"{k} {v:.1f} s" for k, v in r.phase_seconds.items())),
        ("teacher stalled on writers", f"{r.stall_seconds:.1f} s = {r.stall_seconds / r.teacher_seconds:.1%} of teacher time"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print()
    subprocess.run([sys.executable, "-m", "ddk_cache", "inspect", str(out)], check=True)


if __name__ == "__main__":
    main()
