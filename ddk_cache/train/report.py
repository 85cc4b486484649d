"""`ddk-cache report`: plots and a markdown summary of a distillation run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run, the last record kept where a step repeats."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; is {run} a `ddk-cache distill` run directory?")
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        (evals if record.get("type") == "eval" else steps)[record["step"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def write_report(run: str | Path) -> list[Path]:
    """Write weights.png, ppl.png, loss.png and report.md into the run; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    steps, evals = read_metrics(run)
    if not evals:
        raise ConfigError(f"{run} has no evaluation records yet")
    domains = list(evals[0]["weights"])
    x = [e["step"] for e in evals]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for d in domains:
        ax.plot(x, [e["weights"][d] for e in evals], marker="o", label=d)
    ax.set(xlabel="step", ylabel="sampling weight", title="Domain weights over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "weights.png", dpi=120)
    written.append(run / "weights.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, d in enumerate(domains):
        color = f"C{i}"
        ax.plot(x, [e["ppl_student"][d] for e in evals], marker="o", color=color, label=f"{d} student")
        ax.axhline(evals[0]["ppl_teacher"][d], color=color, linestyle="--", linewidth=1, label=f"{d} teacher")
    ax.set(xlabel="step", ylabel="validation perplexity", title="Per-domain perplexity (dashed: teacher)", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run / "ppl.png", dpi=120)
    written.append(run / "ppl.png")
    plt.close(fig)

    # Bits per byte (runs since ddk-cache 0.4): the curve that compares across tokenizers.
    bpb = [e for e in evals if any(v is not None for v in (e.get("bpb_student") or {}).values())]
    if bpb:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, d in enumerate(domains):
            color = f"C{i}"
            ax.plot([e["step"] for e in bpb], [e["bpb_student"][d] for e in bpb], marker="o", color=color, label=f"{d} student")
            if (bpb[0].get("bpb_teacher") or {}).get(d) is not None:
                ax.axhline(bpb[0]["bpb_teacher"][d], color=color, linestyle="--", linewidth=1, label=f"{d} teacher")
        ax.set(xlabel="step", ylabel="bits per UTF-8 byte", title="Per-domain bits per byte (dashed: teacher)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(run / "bits_per_byte.png", dpi=120)
        written.append(run / "bits_per_byte.png")
        plt.close(fig)

    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="total")
        ax.plot([s["step"] for s in steps], [s["ce"] for s in steps], label="CE")
        ax.plot([s["step"] for s in steps], [s["kd"] for s in steps], label="KD")
        ax.set(xlabel="step", ylabel="loss per token", title="Training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=120)
        written.append(run / "loss.png")
        plt.close(fig)

    first, last = evals[0], evals[-1]
    lines = [
        f"# Distillation report: {run}",
        "",
        f"Steps: {steps[-1]['step'] if steps else 0}, tokens: {steps[-1]['tokens'] if steps else 0:,}, evaluations: {len(evals)}.",
        "",
        "| domain | teacher PPL | student PPL (start) | student PPL (end) | end / teacher | weight (end) | teacher bits/byte | student bits/byte (end) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def bits(e: dict, key: str, d: str) -> str:
        v = (e.get(key) or {}).get(d)
        return "n/a" if v is None else f"{v:.4f}"

    for d in domains:
        t = last["ppl_teacher"][d]
        lines.append(f"| {d} | {t:.3f} | {first['ppl_student'][d]:.3f} | {last['ppl_student'][d]:.3f} | {last['ppl_student'][d] / t:.3f} | "
                     f"{last['weights'][d]:.3f} | {bits(last, 'bpb_teacher', d)} | {bits(last, 'bpb_student', d)} |")
    worst = max(domains, key=lambda d: last["ppl_student"][d] / last["ppl_teacher"][d])
    lines += ["", f"Worst domain at the end: {worst} (student/teacher PPL {last['ppl_student'][worst] / last['ppl_teacher'][worst]:.3f}).", "",
              "![domain weights](weights.png)", "", "![perplexity](ppl.png)", ""]
    if bpb:
        lines += ["![bits per byte](bits_per_byte.png)", ""]
    if steps:
        lines += ["![loss](loss.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
    written.append(run / "report.md")
    return written
