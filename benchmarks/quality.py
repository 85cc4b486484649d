"""Quality of distillation: CE, KD (natural / uniform mix), DDK (with / without smoothing),
RKL + DDK, and dense online KD, for two student sizes and several seeds, at equal tokens.

    python benchmarks/quality.py --corpus ../shared/corpora/dev --work /tmp/quality

Everything is the tool's own commands, run as subprocesses (so runs go in parallel, one
thread each): `init-model` (BPE tokenizer + random Llama), `build --top-k 0` (a tokens-only cache) and
`distill --kd-loss none` to train the teacher, `build --top-k 64` for the teacher's cache,
then one `distill` per method x size x seed from that one cache (online KD: the same
command with `--online-teacher`). Every stage is skipped when its output exists, so an
interrupted benchmark continues where it stopped. Prints markdown tables (per-domain
validation PPL, mean, worst student/teacher ratio; mean +- sample std over seeds) and
plots the DDK weights over time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from common import machine, print_table

from ddk_cache.train.report import read_metrics

# name -> distill flags; every method gets the same steps, batch and schedule (equal tokens).
METHODS = {
    "CE only (CPT)": ["--kd-loss", "none", "--mixing", "natural"],
    "KD, natural mix": ["--kd-loss", "fkl", "--mixing", "natural"],
    "KD, uniform mix": ["--kd-loss", "fkl", "--mixing", "uniform"],
    "DDK": ["--kd-loss", "fkl", "--mixing", "ddk"],
    "DDK, no smoothing": ["--kd-loss", "fkl", "--mixing", "ddk-nosmooth"],
    "RKL + DDK": ["--kd-loss", "rkl", "--mixing", "ddk"],
    "online dense KD + DDK": ["--kd-loss", "fkl", "--mixing", "ddk", "--online-teacher", "{teacher}"],
    # Two more, to tell the loss's fidelity apart from DDK's feedback (weights follow evaluations).
    "online dense KD, natural mix": ["--kd-loss", "fkl", "--mixing", "natural", "--online-teacher", "{teacher}"],
    "DDK, tail renorm": ["--kd-loss", "fkl", "--mixing", "ddk", "--tail", "renorm"],
}
SIZES = {"small": (64, 2, 2), "large": (128, 4, 4)}  # hidden, layers, heads


def sh(args: list[str], log: Path, threads: int | None = None) -> None:
    """Run one ddk-cache command, its output to `log`; raise with the log's tail on failure."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "ddk_cache", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({log}): ddk-cache {' '.join(args)}\n{log.read_text()[-2000:]}")


def stage(name: str, out: Path, args: list[str], work: Path) -> None:
    """One preparation step, skipped when `out` exists."""
    if out.exists():
        print(f"{name}: {out} exists, reused", file=sys.stderr)
        return
    t0 = time.perf_counter()
    print(f"{name} ...", file=sys.stderr, flush=True)
    sh(args, work / f"{name.split()[0].replace('-', '_')}.log")
    print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def student_config(teacher: Path, out: Path, hidden: int, layers: int, heads: int) -> Path:
    """config.json of a random-init student sharing the teacher's tokenizer (weights come from --seed)."""
    from ddk_cache.models import ModelSpec, init_model
    from ddk_cache.capture.tokenization import load_tokenizer

    if not (out / "config.json").exists():
        tok = load_tokenizer(str(teacher))
        spec = ModelSpec(vocab_size=len(tok), hidden_size=hidden, layers=layers, heads=heads, max_position_embeddings=512)
        init_model(spec, tok).config.save_pretrained(out)
    return out / "config.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=700, help="batches of 16 sequences")
    p.add_argument("--steps", type=int, default=200, help="student steps of --batch-size sequences")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ddk-interval", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="student runs in parallel, one thread each")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                   help="a subset of the methods, by name (quoted)")
    p.add_argument("--plot", type=Path, help="where the DDK-weights plot goes (default: WORK/quality_weights.png)")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = str(Path(args.corpus).resolve())
    common = ["--data", corpus, "--seq-len", str(args.seq_len), "--val-tokens", str(16 * args.seq_len), "--backend", "hf", "--batch-size", "16", "--quiet"]

    # 1-4: teacher and its cache (the same commands as examples/dev_corpus_ddk.sh).
    stage("tokenizer + random teacher", work / "teacher0", ["init-model", "--corpus", corpus, "--out", str(work / "teacher0"),
          "--vocab-size", str(args.vocab_size), "--hidden-size", "256", "--layers", "4", "--heads", "8", "--max-position-embeddings", "512"], work)
    stage("tokens-only cache", work / "tokens.zarr", ["build", "--tokenizer", str(work / "teacher0"), "--out", str(work / "tokens.zarr"), "--top-k", "0", *common], work)
    teacher = work / "runs" / "teacher" / "final"
    stage("teacher training (CE only)", teacher, ["distill", "--cache", str(work / "tokens.zarr"), "--student", str(work / "teacher0"),
          "--out", str(work / "runs" / "teacher"), "--kd-loss", "none", "--mixing", "natural", "--max-steps", str(args.teacher_steps),
          "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "30", "--ddk-interval", str(args.teacher_steps // 2),
          "--save-every", str(args.teacher_steps // 2), "--quiet"], work)
    cache = work / "cache.zarr"
    stage(f"top-{args.top_k} cache of the trained teacher", cache, ["build", "--teacher", str(teacher), "--out", str(cache), "--top-k", str(args.top_k), *common], work)

    # 5: the students: every method x size x seed, `--jobs` at a time.
    sizes = {size: SIZES[size] for size in args.sizes}
    methods = {m: METHODS[m] for m in METHODS if m in args.methods}
    configs = {size: student_config(teacher, work / f"student-{size}", *dims) for size, dims in sizes.items()}
    runs = [(size, method, seed) for seed in args.seeds for size in sizes for method in methods]

    def run_dir(size: str, method: str, seed: int) -> Path:
        return work / "runs" / size / method.replace(" ", "_").replace(",", "").replace("+", "and").replace("(", "").replace(")", "") / f"seed{seed}"

    def train(size: str, method: str, seed: int) -> float:
        out = run_dir(size, method, seed)
        if (out / "final").exists():
            return 0.0
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        flags = [f.format(teacher=teacher) for f in METHODS[method]]
        t0 = time.perf_counter()
        sh(["distill", "--cache", str(cache), "--student-config", str(configs[size]), "--tokenizer", str(teacher), "--out", str(out),
            *flags, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "20",
            "--ddk-interval", str(args.ddk_interval), "--save-every", str(args.steps), "--eval-batch-size", "16", "--seed", str(seed),
            "--device", "cpu", "--quiet"], out.parent / f"seed{seed}.log", threads=1)
        return time.perf_counter() - t0

    t_all = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train, *r): r for r in runs}
        for i, fut in enumerate(as_completed(futures), 1):
            size, method, seed = futures[fut]
            print(f"[{i}/{len(runs)}] {size} / {method} / seed {seed}: {fut.result():.0f} s", file=sys.stderr, flush=True)
    print(f"student runs: {time.perf_counter() - t_all:.0f} s wall", file=sys.stderr)

    # 6: tables.
    finals = {r: read_metrics(run_dir(*r))[1][-1] for r in runs}
    domains = list(finals[runs[0]]["ppl_student"])
    teacher_ppl = finals[runs[0]]["ppl_teacher"]
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"machine: {machine()}")
    print(f"teacher: 4 x 256 Llama, vocab {args.vocab_size}, {args.teacher_steps} steps of 16 x {args.seq_len} tokens; "
          f"cache top-{args.top_k}; students {', '.join(f'{s} {h}x{l}' for s, (h, l, _) in sizes.items())}; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens each; lr {args.lr}; DDK interval {args.ddk_interval}; "
          f"seeds {args.seeds}; validation: 16 x {args.seq_len} tokens per domain\n")

    def ms(values: list[float], fmt: str = ".1f") -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {sd:{fmt.lstrip('+')}}"

    summary: dict[tuple[str, str], dict[str, list[float]]] = {}
    for size in sizes:
        rows = [("teacher", *(f"{teacher_ppl[d]:.1f}" for d in domains), f"{statistics.mean(teacher_ppl.values()):.1f}", "1.000")]
        for method in methods:
            per_seed = [finals[(size, method, s)]["ppl_student"] for s in args.seeds]
            mean = [statistics.mean(ppl.values()) for ppl in per_seed]
            worst = [max(ppl[d] / teacher_ppl[d] for d in domains) for ppl in per_seed]
            summary[(size, method)] = {"mean": mean, "worst": worst}
            rows.append((method, *(ms([ppl[d] for ppl in per_seed]) for d in domains), ms(mean), ms(worst, ".3f")))
        print(f"### {size} student ({SIZES[size][0]} x {SIZES[size][1]} layers): validation PPL after {tokens:,} tokens\n")
        print_table(("method", *domains, "mean", "worst student/teacher"), rows)
        print()

    print("### cache top-k KD vs dense online KD (fkl), paired by seed\n")
    rows = []
    pairs = (("DDK", "online dense KD + DDK"), ("KD, natural mix", "online dense KD, natural mix"), ("DDK, tail renorm", "online dense KD + DDK"))
    for size in sizes:
        for cached, online in pairs:
            if (size, cached) not in summary or (size, online) not in summary:
                continue
            cache_m, online_m = summary[(size, cached)]["mean"], summary[(size, online)]["mean"]
            rel = [100 * (c / o - 1) for c, o in zip(cache_m, online_m)]
            rows.append((size, f"{cached} vs {online}", ms(cache_m), ms(online_m), ms(rel, "+.2f") + " %"))
    print_table(("student", "cache vs online", "cache mean PPL", "online mean PPL", "cache / online - 1"), rows)

    # 7: DDK weights over time (seed of the first run): with and without smoothing where both ran.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("DDK", "DDK, no smoothing", "DDK, tail renorm") if m in methods][:2]
    if not panels:
        return
    fig, axes = plt.subplots(len(sizes), len(panels), figsize=(5.5 * len(panels), 3.6 * len(sizes)), sharex=True, sharey=True, squeeze=False)
    for row, size in enumerate(sizes):
        for col, method in enumerate(panels):
            evals = read_metrics(run_dir(size, method, args.seeds[0]))[1]
            ax = axes[row][col]
            for d in domains:
                ax.plot([e["step"] for e in evals], [e["weights"][d] for e in evals], marker=".", label=d)
            ax.set_title(f"{size} student: {method} (seed {args.seeds[0]})")
            ax.set_ylabel("sampling weight")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    plot = args.plot or work / "quality_weights.png"
    fig.savefig(plot, dpi=90)
    print(f"\nplot: {plot}")


if __name__ == "__main__":
    main()
