"""`build --engine ray` against the native build: same teacher, corpus and config.

    python benchmarks/ray_build.py --teacher /tmp/codec-bench/teacher-run/final --corpus ../shared/corpora/dev \
        --work /tmp/ray-bench --max-tokens-per-domain 60000

Builds the same cache four times, each from scratch, in fresh processes (the CLI): native
with 1 worker, native with 2 workers (`--num-shards 2`, two processes), `--engine ray`
with 2 actors on a local cluster (started by the build), and `--engine ray` with 2 actors
where one actor's process is SIGKILLed once half the shards are recorded. Prints wall time,
tokens/s (the cache's tokens over the wall time, teacher load and tokenization included),
the peak RSS of the processes, the engine idle share the build reports (the largest over
its processes: the share of scoring time the teacher waited for input or writers), and
whether each cache's arrays equal the first one's.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.store.cache import Cache  # noqa: E402


def argv(args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, "-m", "ddk_cache", "build", "--teacher", args.teacher, "--data", args.corpus, "--out", str(out),
            "--top-k", "64", "--seq-len", str(args.seq_len), "--backend", "hf", "--device", "cpu", "--dtype", "float32",
            "--batch-size", "8", "--quiet", "--max-tokens-per-domain", str(args.max_tokens_per_domain), "--shard-sequences", "8"]


def logged(out: Path) -> int:
    return sum(line.endswith("}") for f in glob.glob(str(out / "_build" / "log" / "*.jsonl")) for line in open(f).read().splitlines())


def run(cmds: list[list[str]], kill_at: float | None = None, out: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS GiB summed over the commands' process trees, sampled; the
    largest engine idle share any command reported)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    peak = [0.0]
    killed = [False]

    def sample() -> None:
        while any(p.poll() is None for p in procs):
            rss = 0
            for line in subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout.splitlines()[1:]:
                if "ddk_cache" in line or "ray::ScoringActor" in line:
                    rss += int(line.split()[0])
            peak[0] = max(peak[0], rss / 2**20)
            if kill_at is not None and not killed[0] and out is not None and (out / "_build" / "plan.json").exists():
                total = len(Cache(str(out), require_complete=False).shards())
                if total and logged(out) >= kill_at * total:
                    pids = subprocess.run(["pgrep", "-f", "ray::ScoringActor"], capture_output=True, text=True).stdout.split()
                    if pids:
                        os.kill(int(pids[0]), signal.SIGKILL)
                        killed[0] = True
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    outputs = [p.communicate() for p in procs]
    watcher.join()
    for p, (_, e) in zip(procs, outputs):
        if p.returncode != 0:
            raise SystemExit(f"build failed: {e[-2000:]}")
    # The build's own summary line: "engine busy Xs, idle Y% of the scoring time".
    idle = max((float(m) for o, _ in outputs for m in re.findall(r"idle ([0-9.]+)% of the scoring time", o)), default=float("nan"))
    if kill_at is not None and not killed[0]:
        print("note: the build ended before an actor could be killed")
    return time.perf_counter() - t0, peak[0], idle


def arrays(path: Path) -> dict:
    cache = Cache(str(path))
    out = {}
    for d in cache.domains:
        for split in ("train", "val"):
            rows = np.arange(cache.num_sequences(d, split))
            targets = cache.targets_of(d, split, rows)
            out[(d, split)] = (cache.tokens(d, split, rows), targets.ids, targets.logprobs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens-per-domain", type=int, default=60000)
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows, reference = [], None
    runs = [
        ("native, 1 worker", lambda out: [argv(args, out)], None),
        ("native, 2 workers", lambda out: [argv(args, out) + ["--num-shards", "2", "--shard-index", str(i)] for i in range(2)], None),
        ("ray, 2 actors", lambda out: [argv(args, out) + ["--engine", "ray", "--ray-actors", "2"]], None),
        ("ray, 2 actors, one SIGKILLed at 50%", lambda out: [argv(args, out) + ["--engine", "ray", "--ray-actors", "2"]], 0.5),
    ]
    for i, (name, cmds, kill_at) in enumerate(runs):
        out = work / f"c{i}.zarr"
        seconds, rss, idle = run(cmds(out), kill_at, out)
        cache = Cache(str(out))
        tokens = sum(cache.num_sequences(d, s) for d in cache.domains for s in ("train", "val")) * cache.seq_len
        got = arrays(out)
        if reference is None:
            reference, same = got, "reference"
        else:
            same = "yes" if all(all(np.array_equal(a, b) for a, b in zip(got[k], reference[k])) for k in reference) else "NO"
        rows.append((name, f"{seconds:.1f}", f"{tokens / seconds:,.0f}", f"{rss:.2f}", f"{idle:.1f}%", same))
    print(f"machine: {machine()}; teacher {args.teacher}; {args.max_tokens_per_domain:,} tokens per domain, seq-len {args.seq_len}, top-64 pack-v3")
    print_table(("build", "wall s", "tokens/s", "peak RSS GiB (all processes)", "engine idle (worst worker)", "arrays equal"), rows)


if __name__ == "__main__":
    main()
