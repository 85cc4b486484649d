"""Cost of a training step: CE only vs cache KD (each loss) vs online KD with the teacher resident.

    python benchmarks/cost.py --cache CACHE.zarr --student STUDENT --teacher TEACHER [--batch-size 16]

Same student, same batches (read before timing), one process: every mode starts from the
same weights with a fresh AdamW, runs warm-up steps, then timed steps (forward, backward,
optimizer). Every mode computes its loss as `distill` does (student.StudentLoss: the decoder,
then the loss in chunks of --loss-chunk positions from the hidden states and the head) with
the fused head loss, its default; `cache fkl (recompute)` recomputes each chunk's logits in
the backward pass instead, and `cache fkl (whole logits)` is the model's own [tokens,
vocabulary] logits with the loss on them. On a GPU, CUDA events time the steps and torch.cuda.max_memory_allocated gives
each mode's peak; on a CPU, wall time, and with `--memory` each mode once more in a fresh
process whose peak RSS above the RSS before the models were loaded is its peak (weights,
gradients, AdamW state, activations, the loss: what max_memory_allocated counts on a GPU;
glibc is told to map every allocation past 64 KiB on its own, so that RSS follows the
live tensors).
`--rounds R` runs the modes R times in turn (CE, fkl, ..., CE, fkl, ...) and takes each
mode's median over all its timed steps, so that a slow spell of the machine lands on every
mode alike. Ratios are against CE. Then the loader: batches/s it sustains from the cache
with prefetch vs what the CE step consumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import machine, print_table
from transformers import AutoModelForCausalLM

from ddk_cache.train.data import CacheLoader
from ddk_cache.train.losses import KDConfig, ce_and_sparse_kd
from ddk_cache.train.student import StudentLoss
from ddk_cache.store.cache import Cache


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_run(args: argparse.Namespace, batches: list, initial: torch.nn.Module, teacher: torch.nn.Module | None,
             device: torch.device, cuda: bool, fresh: bool = True):  # noqa: ANN201
    """run(mode) -> (timed step seconds, peak GiB on a GPU): fresh weights (a copy of
    `initial`; with fresh=False `initial` itself, one copy in memory) and AdamW, warm-up
    steps, then timed ones, on the same batches for every mode."""

    def run(mode: str) -> tuple[list[float], float]:
        model = copy.deepcopy(initial) if fresh else initial
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i, b in enumerate(batches):
            x = b.tokens.to(device)
            ids, lps = b.topk_ids.to(device), b.topk_logprobs.to(device)
            tail = None if b.tail_logprob is None else b.tail_logprob.to(device)  # pack-v3 caches store it
            start = time.perf_counter()
            if cuda:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
            with (torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)):
                labels = x[:, 1:]
                kind = "none" if mode == "ce" else mode.split()[1]
                if mode.endswith("(whole logits)"):
                    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
                    flat = logits.reshape(-1, logits.shape[-1])
                    ce, kd = ce_and_sparse_kd(flat, labels.reshape(-1), ids.reshape(flat.shape[0], -1), lps.reshape(flat.shape[0], -1), KDConfig(kind),
                                              tail_logprob=None if tail is None else tail.reshape(-1))
                    loss = (ce.sum() + 0.2 * kd.sum()) / ce.numel()
                else:
                    wrapped = StudentLoss(model, KDConfig(kind), chunk=args.loss_chunk, fused="(recompute)" not in mode, kd_weight=0.2)
                    if mode.startswith("online"):  # the teacher runs every step and its full distribution is the target
                        with torch.no_grad():
                            targets = {"teacher_logits": teacher(input_ids=x, use_cache=False).logits[:, :-1].float()}
                    else:
                        targets = {"topk_ids": ids.long(), "topk_logprobs": lps, "tail_logprob": tail} if kind != "none" else {}
                    ce, kd, _ = wrapped(x, labels, **targets)
                    loss = (ce + 0.2 * kd) / labels.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                ev1.record()
                torch.cuda.synchronize()
                elapsed = ev0.elapsed_time(ev1) / 1000
            else:
                elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times.append(elapsed)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        del model, opt
        return times, peak

    return run


MODES = (["ce"] + [f"cache {k}" for k in ("fkl", "rkl", "skl", "srkl", "jsd", "akl")]
         + ["cache fkl (recompute)", "cache fkl (whole logits)", "online fkl"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True, help="the cache's teacher, resident for online KD")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0], help="reader-process counts to measure (0: the reader thread alone)")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES, metavar="MODE", help=f"of: {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=1, help="run the modes this many times in turn; medians over all rounds")
    p.add_argument("--memory", action="store_true", help="CPU: each mode's peak RSS in a fresh process")
    p.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # the fresh process of --memory
    args = p.parse_args()
    if "ce" not in args.modes:
        args.modes = ["ce", *args.modes]

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cache = Cache(args.cache)
    weights = torch.full((len(cache.domains),), 1 / len(cache.domains)).numpy()
    loader = CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=0)
    batches = [loader.next() for _ in range(args.warmup + args.steps)]
    loader.close()
    base_rss = rss_mib()
    initial = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).to(device)
    online = any(m.startswith("online") for m in ([args.one_mode] if args.one_mode else args.modes))
    teacher = (AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.bfloat16 if cuda else torch.float32).to(device).eval()
               if online else None)
    if args.one_mode:
        t, _ = make_run(args, batches, initial, teacher, device, cuda, fresh=False)(args.one_mode)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"mode": args.one_mode, "peak_mib": peak - base_rss, "seconds": statistics.median(t)}))
        return
    print(f"machine: {machine()}")
    print(f"student {sum(p.numel() for p in initial.parameters()) / 1e6:.1f}M params, teacher {sum(p.numel() for p in teacher.parameters()) / 1e6 if teacher else 0:.1f}M, "
          f"batch {args.batch_size} x {cache.seq_len} tokens, top-{cache.top_k} cache, {args.steps} timed steps after {args.warmup}\n")

    run = make_run(args, batches, initial, teacher, device, cuda)
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for m in args.modes:
            t, peak = run(m)
            times[m] += t
            peaks[m] = max(peaks.get(m, 0.0), peak)
    if args.memory and not cuda:  # each mode alone in a fresh process: its peak RSS
        for m in args.modes:
            cmd = [sys.executable, __file__, "--cache", args.cache, "--student", args.student, "--teacher", args.teacher,
                   "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", "1",
                   "--loss-chunk", str(args.loss_chunk), "--one-mode", m]
            # Every allocation past 64 KiB its own mapping, returned on free: the peak RSS then
            # follows the live tensors (glibc's heap keeps freed pages, which moved the
            # same mode's peak by ±15% between runs; with this, by under 0.1 MiB).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            peaks[m] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"] / 1024
    measured = cuda or args.memory
    base_t, base_m = statistics.median(times["ce"]), peaks["ce"]
    rows = []
    for m in args.modes:
        t, mem = statistics.median(times[m]), peaks[m]
        rows.append((m, f"{t * 1000:.1f}", f"{t / base_t:.3f}", f"{mem * 1024:,.0f}" if measured else "n/a",
                     f"{mem / base_m:.4f}" if measured else "n/a"))
    what = "peak MiB" if cuda else "peak RSS MiB (fresh process)"
    print(f"{args.rounds} round(s) of {args.steps} timed steps per mode")
    print_table(("mode", "median step ms", "step / CE", what, "peak / CE"), rows)

    tokens_per_step = args.batch_size * cache.seq_len
    demand = tokens_per_step / base_t
    rows = []
    for workers in args.loader_workers:
        loader = CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=1, prefetch=4, workers=workers)
        loader.next()  # reader processes started and warm
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            loader.next()
        elapsed = time.perf_counter() - start
        loader.close()
        supply = args.loader_batches * tokens_per_step / elapsed
        rows.append((workers, f"{supply:,.0f}", f"{demand:,.0f}", f"{supply / demand:.1f}x"))
    print()
    print_table(("reader processes", "loader tokens/s (prefetch 4)", "CE step consumes tokens/s", "supply / demand"), rows)

if __name__ == "__main__":
    main()
