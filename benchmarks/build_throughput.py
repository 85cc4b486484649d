"""Build throughput on a real corpus: make (or reuse) a local Llama-style teacher, build its cache, print a table.

    python benchmarks/build_throughput.py --corpus ../shared/corpora/dev --work /tmp/ddk-bench

Prints the machine, the teacher, tokens/s of the whole build, the teacher's share and the
writer's (encode + write, in a background thread overlapping the teacher), then `inspect`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddk_cache.build import BuildConfig, build
from ddk_cache.corpus import discover_domains, iter_documents
from ddk_cache.models import ModelSpec, make_model_dir


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} x {cpu}{gpu}; torch {torch.__version__}"


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
    args = p.parse_args()

    work = Path(args.work)
    teacher = work / f"teacher-v{args.vocab_size}-h{args.hidden_size}-l{args.layers}"
    if not teacher.exists():
        t0 = time.perf_counter()
        texts = itertools.chain.from_iterable(iter_documents(d) for d in discover_domains(args.corpus))
        spec = ModelSpec(vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                         max_position_embeddings=max(2048, args.seq_len))
        make_model_dir(texts, teacher, spec)
        print(f"made teacher {teacher} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    out = work / "cache.zarr"
    shutil.rmtree(out, ignore_errors=True)
    config = BuildConfig(teacher=str(teacher), data=args.corpus, out=str(out), top_k=args.top_k, seq_len=args.seq_len,
                         batch_size=args.batch_size, device=args.device, dtype=args.dtype, backend="hf",
                         max_tokens_per_domain=args.max_tokens_per_domain)
    r = build(config, progress=sys.stderr.isatty())
    t = r.meta["teacher"]
    rows = [
        ("machine", machine()),
        ("teacher", f"{t['architecture']} {t['num_parameters'] / 1e6:.1f}M params, vocab {r.meta['vocab_size']}, {t['dtype']}, {t['backend']}"),
        ("settings", f"seq-len {args.seq_len}, top-k {args.top_k}, batch {args.batch_size}, shards of {r.meta['shard_sequences']} seqs"),
        ("tokens scored", f"{r.tokens_scored:,}"),
        ("build wall time", f"{r.seconds:.1f} s (tokenize + score + write + finalize)"),
        ("build throughput", f"{r.tokens_per_second:,.0f} tokens/s"),
        ("teacher time", f"{r.teacher_seconds:.1f} s ({r.tokens_scored / r.teacher_seconds:,.0f} tokens/s)"),
        ("encode + write time", f"{r.write_seconds:.1f} s = {r.write_seconds / r.teacher_seconds:.1%} of teacher time (background thread)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print()
    subprocess.run([sys.executable, "-m", "ddk_cache", "inspect", str(out)], check=True)


if __name__ == "__main__":
    main()
