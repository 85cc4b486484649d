"""The build at corpus scale: memory, initialization, objects, listing, engine idle share.

    python benchmarks/scale.py corpus --source ../shared/corpora/dev --work /tmp/scale --tokens 10000000 100000000
    python benchmarks/scale.py init   --work /tmp/scale --tokens 100000000 --workers 1 2
    python benchmarks/scale.py build  --work /tmp/scale --tokens 10000000 --workers 2
    python benchmarks/scale.py build  --work /tmp/scale --tokens 100000000 --workers 2
    python benchmarks/scale.py objects --work /tmp/scale --tokens 100000000
    python benchmarks/scale.py idle   --work /tmp/scale --tokens 10000000 --max-tokens-per-domain 400000

`corpus` writes corpora of at least N tokens each: distinct copies of the source domains,
every document of copy c prefixed with "[copy c]", so no two documents are equal. The
teacher is a fast 1-layer Llama with a 512-id BPE vocabulary trained on the source (random
weights: throughput, memory and objects do not depend on them). `build` runs the real CLI,
one process per worker, and reports each worker's peak RSS (ru_maxrss). `init` runs the
workers until the first shard can be scored (the "store_created" event) and reports the
time. `objects` counts objects per GB of a finished cache and times finding pending shards
(one listing of the build logs). `idle` builds a capped cache with each backend and reports
the engine idle share the build prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, teacher  # noqa: E402

TEACHER = dict(vocab_size=512, hidden_size=64, layers=1, heads=2, context=2048)
COMMON = ["--seq-len", "1024", "--top-k", "64", "--backend", "hf", "--device", "cpu", "--dtype", "float32", "--batch-size", "8", "--quiet"]


def corpus_dir(work: Path, tokens: int) -> Path:
    return work / f"corpus-{tokens // 1_000_000}M"


def make_corpus(source: Path, work: Path, tokens: int, tok_per_copy: int) -> Path:
    out = corpus_dir(work, tokens)
    if out.exists():
        return out
    copies = -(-tokens // tok_per_copy)
    tmp = out.with_suffix(".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.glob("*.jsonl")):
        with open(tmp / f.name, "w") as dst:
            for c in range(copies):
                for line in open(f):
                    doc = json.loads(line)
                    dst.write(json.dumps({"text": f"[copy {c}] " + doc["text"]}) + "\n")
    tmp.rename(out)
    return out


def cmd_corpus(args: argparse.Namespace) -> None:
    from ddk_cache.capture.corpus import discover_domains, iter_documents
    from ddk_cache.capture.tokenization import load_tokenizer

    work = Path(args.work)
    t = teacher(args.source, work, **TEACHER)
    tok = load_tokenizer(str(t))
    per_copy = sum(len(tok(text)["input_ids"]) + 1 for d in discover_domains(args.source) for text in iter_documents(d))
    print(f"teacher {t}; one copy of the source = {per_copy:,} tokens")
    for n in args.tokens:
        out = make_corpus(Path(args.source), work, n, per_copy)
        size = sum(f.stat().st_size for f in out.glob("*.jsonl"))
        print(f"{out}: {size / 2**20:,.0f} MiB, >= {n:,} tokens ({-(-n // per_copy)} copies)")


def worker_argv(work: Path, tokens: int, out: Path, workers: int, index: int, extra: list[str], backend: str = "hf") -> list[str]:
    common = [c if c != "hf" else backend for c in COMMON]
    argv = [sys.executable, str(Path(__file__).parent / "rss_run.py"), "build", "--teacher", str(work / "teacher-v512-h64-l1"),
            "--data", str(corpus_dir(work, tokens)), "--out", str(out), *common, *extra]
    if workers > 1:
        argv += ["--num-shards", str(workers), "--shard-index", str(index)]
    return argv


def run_workers(work: Path, tokens: int, out: Path, workers: int, extra: list[str], backend: str = "hf",
                env: dict[str, str] | None = None) -> list[dict]:
    """Run the CLI as `workers` processes; each reports its wall time and peak RSS."""
    procs = [subprocess.Popen(worker_argv(work, tokens, out, workers, i, extra, backend), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})})
             for i in range(workers)]
    results = []
    for i, p in enumerate(procs):
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker {i} failed:\n{stdout}\n{stderr}")
        stats = json.loads(stderr.strip().splitlines()[-1])
        results.append({"worker": i, **stats, "output": stdout.strip()})
    return results


def cmd_build(args: argparse.Namespace) -> None:
    work = Path(args.work)
    rows = []
    for n in args.tokens:
        out = work / f"cache-{n // 1_000_000}M-w{args.workers}.zarr"
        if out.exists() and not args.keep:
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        results = run_workers(work, n, out, args.workers, args.extra)
        wall = time.perf_counter() - t0
        for r in results:
            rows.append((f"{n / 1e6:.0f}M", r["worker"], f"{r['max_rss_mib']:,.0f}", f"{r['seconds']:,.0f}", f"{wall:,.0f}"))
        print("\n".join(r["output"] for r in results), file=sys.stderr)
    print(f"machine: {machine()}")
    print_table(("corpus tokens", "worker", "peak RSS (MiB)", "worker seconds", "wall seconds"), rows)


def cmd_init(args: argparse.Namespace) -> None:
    """Workers run until the first shard can be scored; the slowest worker's time counts."""
    work = Path(args.work)
    rows = []
    for n in args.tokens:
        for threads in args.tokenizer_threads:
            for w in args.workers:
                out = work / f"init-{n // 1_000_000}M-w{w}.zarr"
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                env = {"RAYON_NUM_THREADS": str(threads)} if threads else {}
                results = run_workers(work, n, out, w, ["--stop-after-init", *args.extra], env=env)
                slowest = max(r["seconds"] for r in results)
                rows.append((f"{n / 1e6:.0f}M", w, threads or f"auto ({os.cpu_count()})", f"{slowest:,.1f}",
                             ", ".join(f"{r['max_rss_mib']:,.0f}" for r in results)))
    print(f"machine: {machine()}")
    print_table(("corpus tokens", "workers", "tokenizer threads per worker", "seconds to the first shard", "peak RSS per worker (MiB)"), rows)


def cmd_objects(args: argparse.Namespace) -> None:
    from ddk_cache.store.cache import Cache, CacheWriter
    from ddk_cache.store.objects import Objects

    work = Path(args.work)
    rows = []
    for n in args.tokens:
        matches = sorted(work.glob(f"cache-{n // 1_000_000}M-w*.zarr"))
        if not matches:
            raise SystemExit(f"no finished cache of {n:,} tokens in {work}: run `scale.py build` first")
        path = str(matches[0])
        objects = Objects.open(path).list("")
        total = sum(objects.values())
        data = {k: v for k, v in objects.items() if "/c/" in k}
        cache = Cache(path)
        t0 = time.perf_counter()
        pending = CacheWriter(path).pending()
        listing = time.perf_counter() - t0
        t0 = time.perf_counter()
        Objects.open(path).list("_build/log")
        one_listing = time.perf_counter() - t0
        # The targets' objects (format 3), or the bundles that hold tokens and targets (format 5).
        biggest = max(v for k, v in data.items() if k.split("/")[2] in ("targets", "rows"))
        gib = total / 2**30
        rows.append((f"{n / 1e6:.0f}M", cache.meta.format_version, f"{gib:.2f}", len(objects), f"{len(objects) / gib:.1f}", len(data),
                     f"{len(data) / gib:.1f}", len(cache.shards()), cache.meta.shard_sequences, f"{biggest / 2**20:.0f}",
                     f"{listing * 1e3:.0f}", f"{one_listing * 1e3:.1f}", len(pending)))
    print(f"machine: {machine()}")
    print_table(("corpus tokens", "format", "cache GiB", "objects", "objects per GiB", "data objects", "data objects per GiB", "shards",
                 "sequences per shard", "largest data object (MiB)", "find pending shards (ms)", "of which the listing (ms)", "pending"), rows)


def cmd_idle(args: argparse.Namespace) -> None:
    work = Path(args.work)
    rows = []
    for backend in args.backends:
        out = work / f"idle-{backend}.zarr"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        # A capped domain cannot hold the default 1M validation tokens: 64 sequences.
        extra = ["--max-tokens-per-domain", str(args.max_tokens_per_domain), "--val-tokens", str(64 * 1024), *args.extra]
        (r,) = run_workers(work, args.tokens[0], out, 1, extra, backend)
        line = next(x for x in r["output"].splitlines() if "engine busy" in x)
        rows.append((backend, line.split("tokens in ")[1].split(" (")[0], line.split("overall")[0].split("(")[-1].strip(" ;"),
                     line.split("idle ")[1].split(" of")[0]))
    print(f"machine: {machine()}")
    print_table(("backend", "tokens / seconds", "throughput", "engine idle share"), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["corpus", "build", "init", "objects", "idle"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--source", default="../shared/corpora/dev")
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--max-tokens-per-domain", type=int, default=400_000)
    ap.add_argument("--keep", action="store_true", help="build: resume an existing cache instead of starting over")
    ap.add_argument("--tokenizer-threads", type=int, nargs="+", default=[0], help="init: RAYON_NUM_THREADS per worker (0: automatic)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `ddk-cache build` flags")
    args = ap.parse_args()
    if args.stage == "build":
        args.workers = args.workers[0]
    {"corpus": cmd_corpus, "build": cmd_build, "init": cmd_init, "objects": cmd_objects, "idle": cmd_idle}[args.stage](args)


if __name__ == "__main__":
    main()
