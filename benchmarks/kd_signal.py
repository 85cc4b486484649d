"""Which cached targets train closest to dense KD, per byte, and whether every loss is exact from them.

For each student, batch, kind of cached target (top-k, adaptive, sampled), encoding and
`--kd-loss`, two comparisons:

  * **vs exact values** (the codec's fidelity): the gradient w.r.t. the student's logits, in
    float64, of the loss on the decoded cache against the same loss on the teacher's exact
    log-probs at the same ids (and its exact tail). What `tests/test_exact.py` bounds: a loss
    is "exact from the cache" when this cosine is >= 0.9999 and the relative error <= 1e-3.
  * **vs dense KD** (what the targets carry): the gradient w.r.t. every student parameter
    (float64) of the KD term with the cached targets against the same divergence on the
    teacher's full distribution; and of CE + gamma * KD. Truncation (top-k), the tail rule
    and the codec all show here.

Targets are derived from the teacher's output exactly as the build derives them
(targets.py; the tail from the full distribution, as the transformers backend does),
encoded and decoded as training reads them. Sampled targets are random: their rows average
--draws independent draws ("1 draw": the mean of each draw's numbers; "mean of draws": the
gradient averaged over the draws, which converges to the dense one only if the loss is
unbiased). Sampled targets are forward KL only (distill refuses the others on them).

    python benchmarks/kd_signal.py --tokens /tmp/codec-bench/tokens.zarr --teacher /tmp/codec-bench/peaked/x8 \\
        --student init:/tmp/minillm-bench/student-init trained:/tmp/minillm-bench/student0/final \\
        --targets topk:16 topk:64 topk:256 adaptive:0.99 sampled:50 --losses fkl rkl skl srkl jsd akl \\
        --encodings pack-v2 pack-v3 --batches 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, real_teacher  # noqa: E402

from ddk_cache.capture.fidelity import coarse_kl  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.store.encodings import Layout, PackV2, PackV3, RowScores  # noqa: E402
from ddk_cache.store.targets import TargetSpec, adaptive_cut, sample_from_logprobs  # noqa: E402
from ddk_cache.train.data import CacheLoader  # noqa: E402
from ddk_cache.train.losses import KDConfig, ce_and_dense_kd, ce_and_sparse_kd, sparse_kd  # noqa: E402

ENCODINGS = {"pack-v3": PackV3, "pack-v2": PackV2}


def load_student(spec: str) -> tuple[str, torch.nn.Module]:
    """`name:DIR`: DIR holds weights (a saved model) or only a config.json (random init, seed 0)."""
    name, path = spec.split(":", 1)
    try:
        return name, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError:
        torch.manual_seed(0)
        return name, AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)


def flat_grad(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads]).double()  # float64: cosines near 1 stay <= 1


def parse_targets(items: list[str]) -> list[tuple[str, TargetSpec]]:
    out = []
    for t in items:
        kind, n = t.split(":")
        if kind == "sampled":
            out.append((f"sampled N={n}", TargetSpec(kind="sampled", k=1, samples=int(n))))
        elif kind == "adaptive":
            out.append((f"adaptive min-mass {n}", TargetSpec(k=256, min_mass=float(n))))
        else:
            out.append((f"top-{n}", TargetSpec(k=int(n))))
    return out


def targets_for(logp: torch.Tensor, nxt: torch.Tensor, spec: TargetSpec, encoding, layout: Layout, gen: torch.Generator) -> dict:
    """One sequence through the build's path: targets, the exact tail, encode, decode. Returns
    the decoded ids / log-probs / tail, the exact log-probs at those ids and the exact tail,
    and the bytes."""
    lp64 = logp.double()
    target = logp.gather(-1, nxt[:, None]).squeeze(-1).numpy()
    if spec.kind == "sampled":
        ids, counts, lps = sample_from_logprobs(logp, spec, gen)
        row = RowScores(ids.astype(np.int32), lps, target, nxt.numpy(), counts)
    else:
        values, ids = logp.topk(spec.k, -1)
        kept = adaptive_cut(values.numpy(), spec)
        outside = torch.ones_like(lp64, dtype=torch.bool).scatter(-1, ids, torch.from_numpy(~np.isfinite(kept)))
        tail = torch.logsumexp(lp64.masked_fill(~outside, float("-inf")), -1).numpy()
        row = RowScores(ids.numpy().astype(np.int32), kept, target, nxt.numpy(), tail_logprob=tail)
    blob = encoding.encode(row, layout)["targets"]
    t = encoding.decode({"targets": [blob]}, layout)
    d_ids = torch.from_numpy(t.ids[0]).long()
    d_lps = torch.from_numpy(t.logprobs[0])
    valid = torch.isfinite(d_lps)
    exact = torch.where(valid, lp64.gather(-1, d_ids), torch.full_like(d_lps, float("-inf"), dtype=torch.float64))
    ex_tail = torch.logsumexp(lp64.scatter(-1, torch.where(valid, d_ids, d_ids[:, :1]), float("-inf")), -1)
    d_tail = None if t.tail_logprob is None else torch.from_numpy(t.tail_logprob[0])
    # The codec's coarse KL per position: the teacher's exact kept entries + tail vs the decoded ones.
    if d_tail is None:
        kl = np.full(len(d_ids), np.nan)
    else:
        kl = coarse_kl(exact.exp().numpy(), d_lps.double().exp().numpy(), ex_tail.exp().numpy(), d_tail.double().exp().numpy())
    return {"ids": d_ids, "lps": d_lps, "tail": d_tail, "exact": exact, "exact_tail": ex_tail, "bytes": len(blob), "kl": kl}


def stats(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), float((g - ref).norm() / ref.norm())


def logit_grad(kind: str, z: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    z = z.detach().double().requires_grad_(True)
    sparse_kd(z, ids, lps.double(), KDConfig(kind), tail_logprob=None if tail is None else tail.double()).sum().backward()
    return z.grad.reshape(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a model directory, or 'smollm2'")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the teacher's logits (final-norm stress test, labelled so)")
    p.add_argument("--tokens", required=True, help="a cache of the teacher's corpus (its tokens are the batches)")
    p.add_argument("--student", nargs="+", required=True, metavar="NAME:DIR")
    p.add_argument("--targets", nargs="+", default=["topk:16", "topk:64", "topk:256", "adaptive:0.99", "sampled:50"])
    p.add_argument("--losses", nargs="+", default=["fkl", "rkl", "skl", "srkl", "jsd", "akl"])
    p.add_argument("--encodings", nargs="+", default=["pack-v3"], choices=list(ENCODINGS))
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--draws", type=int, default=4, help="independent draws per batch for sampled targets")
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--no-dense", action="store_true", help="only the codec's fidelity (vs exact values), not the parameter gradients vs dense KD")
    p.add_argument("--pareto", metavar="PNG", help="also plot bytes/position against the worst KD-gradient cosine vs dense KD "
                                                  "(over --losses) and the codec's KL p99, per target and encoding, with DistillKit's formula")
    p.add_argument("--replot", metavar="OUTPUT", help="with --pareto: remake the Pareto table and plot from a saved run's output, running nothing")
    args = p.parse_args()
    if args.replot:
        rows, kl_p99, vocab = read_output(args.replot)
        pareto(rows, kl_p99, vocab, args.pareto or "pareto.png")
        return
    torch.set_grad_enabled(True)
    cache = Cache(args.tokens)
    weights = np.full(len(cache.domains), 1 / len(cache.domains))
    with CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=0, targets=False) as loader:
        batches = [loader.next().tokens for _ in range(args.batches)]
    teacher_path = real_teacher(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    V = teacher.get_output_embeddings().weight.shape[0]
    P = batches[0].shape[1] - 1
    specs = parse_targets(args.targets)
    print(f"machine: {machine()}")
    stress = f", logits x {args.scale:g} (a stress test: a stand-in for a peaked teacher)" if args.scale != 1 else ""
    print(f"vocabulary {V}")
    print(f"teacher {teacher_path}{stress}; {args.batches} batches of {args.batch_size} x {P + 1} tokens, uniform over domains; "
          f"gamma {args.gamma}; sampled: {args.draws} draws per batch\n")

    rows = []
    kl_p99: dict[tuple, float] = {}
    for student in args.student:
        name, model = load_student(student)
        acc: dict[tuple, list] = {}
        nbytes: dict[tuple, list[float]] = {}
        kls: dict[tuple, list[np.ndarray]] = {}
        for x in batches:
            labels = x[:, 1:].reshape(-1)
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1].float() * args.scale
            t_logp = torch.log_softmax(t_logits, -1)
            flat_t = t_logits.reshape(labels.numel(), -1)

            def logits() -> torch.Tensor:
                return model(input_ids=x, use_cache=False).logits[:, :-1].reshape(labels.numel(), -1)

            with torch.no_grad():
                z = logits()
            dense = {}
            if not args.no_dense:
                for kind in args.losses:
                    _, kd = ce_and_dense_kd(logits(), labels, flat_t, KDConfig(kind))
                    g_kd = flat_grad(model, kd.mean())
                    ce, kd = ce_and_dense_kd(logits(), labels, flat_t, KDConfig(kind))
                    dense[kind] = (g_kd, flat_grad(model, ce.mean() + args.gamma * kd.mean()))
            for label, spec in specs:
                layout = Layout(positions=P, entries=spec.entries, vocab_size=V, targets=spec)
                draws = args.draws if spec.kind == "sampled" else 1
                kinds = ["fkl"] if spec.kind == "sampled" else args.losses
                for enc_name in args.encodings:
                    enc = ENCODINGS[enc_name]()
                    per_draw: dict[str, list] = {k: [] for k in kinds}
                    for d in range(draws):
                        gen = torch.Generator().manual_seed(1000 * d + 7)
                        parts = [targets_for(t_logp[b], x[b, 1:], spec, enc, layout, gen) for b in range(len(x))]
                        cat = {key: None if parts[0][key] is None else torch.cat([q[key] for q in parts]).reshape(labels.numel(), *parts[0][key].shape[1:])
                               for key in ("ids", "lps", "tail", "exact", "exact_tail")}
                        nbytes.setdefault((label, enc_name), []).append(sum(q["bytes"] for q in parts) / labels.numel())
                        kls.setdefault((label, enc_name), []).append(np.concatenate([q["kl"] for q in parts]))
                        for kind in kinds:
                            fid = (stats(logit_grad(kind, z, cat["ids"], cat["lps"], cat["tail"]),
                                         logit_grad(kind, z, cat["ids"], cat["exact"], cat["exact_tail"]))
                                   if spec.kind != "sampled" else (float("nan"), float("nan")))
                            if args.no_dense:
                                per_draw[kind].append((fid, None, None))
                                continue
                            tail = None if cat["tail"] is None else cat["tail"].float()
                            _, kd = ce_and_sparse_kd(logits(), labels, cat["ids"], cat["lps"], KDConfig(kind), tail_logprob=tail)
                            g_kd = flat_grad(model, kd.mean())
                            ce, kd = ce_and_sparse_kd(logits(), labels, cat["ids"], cat["lps"], KDConfig(kind), tail_logprob=tail)
                            per_draw[kind].append((fid, g_kd, flat_grad(model, ce.mean() + args.gamma * kd.mean())))
                    for kind, gs in per_draw.items():
                        fid = np.mean([f for f, _, _ in gs], axis=0)
                        if args.no_dense:
                            acc.setdefault((label, enc_name, kind, "-"), []).append((*fid, np.nan, np.nan, np.nan, np.nan))
                            continue
                        ref_kd, ref_total = dense[kind]
                        single = np.mean([stats(g, ref_kd) + stats(gt, ref_total) for _, g, gt in gs], axis=0)
                        acc.setdefault((label, enc_name, kind, "1 draw" if draws > 1 else "-"), []).append((*fid, *single))
                        if draws > 1:
                            mean_kd = torch.stack([g for _, g, _ in gs]).mean(0)
                            mean_total = torch.stack([gt for _, _, gt in gs]).mean(0)
                            acc.setdefault((label, enc_name, kind, f"mean of {draws}"), []).append(
                                (*fid, *stats(mean_kd, ref_kd), *stats(mean_total, ref_total)))
        for (label, enc_name, kind, how), values in acc.items():
            m = np.nanmean(np.array(values, dtype=np.float64), axis=0) if not np.isnan(values).all() else np.full(6, np.nan)
            fmt = lambda v, f: "-" if np.isnan(v) else format(v, f)  # noqa: E731
            rows.append((name, label, enc_name, f"{np.mean(nbytes[(label, enc_name)]):.1f}", kind, how,
                         fmt(m[0], ".6f"), fmt(m[1], ".1e"), fmt(m[2], ".5f"), fmt(m[3], ".4f"), fmt(m[4], ".5f"), fmt(m[5], ".4f")))
        for (label, enc_name), v in kls.items():
            flat = np.concatenate(v)
            kl_p99[(name, label, enc_name)] = float("nan") if np.isnan(flat).all() else float(np.nanpercentile(flat, 99))
    print_table(("student", "targets", "encoding", "B/pos", "loss", "sampled", "vs exact values: logit-grad cosine", "rel. error",
                 "vs dense: KD grad cosine", "rel. error", "CE+gamma*KD cosine", "rel. error"), rows)
    if args.pareto:
        pareto(rows, kl_p99, V, args.pareto)


def pareto(rows: list[tuple], kl_p99: dict[tuple, float], vocab_size: int, path: str) -> None:
    """Per student, target and encoding: bytes/position against each loss's KD-gradient cosine
    vs dense KD (sampled rows: one draw, as a cache holds; forward KL only) and the codec's KL p99;
    printed and plotted, with DistillKit's formula at the same k."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos: dict[tuple, dict[str, float]] = {}
    size: dict[tuple, float] = {}
    for name, label, enc, nbytes, kind, how, *_, dense_cos, _, _, _ in rows:
        if how.startswith("mean of") or dense_cos == "-":  # a cache holds one draw per position
            continue
        cos.setdefault((name, label, enc), {})[kind] = float(dense_cos)
        size[(name, label, enc)] = float(nbytes)
    formula = lambda k: 56 + k * math.ceil(math.log2(vocab_size)) / 8  # noqa: E731
    kinds = [k for k in ("fkl", "skl", "srkl", "jsd", "akl", "rkl") if any(k in c for c in cos.values())]
    fmt = lambda c, k: f"{c[k]:.4f}" if k in c else "-"  # noqa: E731
    table = []
    for key in sorted(cos, key=lambda key: size[key]):
        name, label, enc = key
        k = int(label[4:]) if label.startswith("top-") else None
        table.append((name, label, enc, f"{size[key]:.1f}", f"{formula(k):.0f}" if k else "-", *(fmt(cos[key], kd) for kd in kinds),
                      f"{kl_p99.get(key, float('nan')):.1e}"))
    print("\nPareto: bytes vs each loss's KD-gradient cosine vs dense KD, and the codec's KL p99 (kept + tail vs exact)\n")
    print_table(("student", "targets", "encoding", "B/pos", "DistillKit formula B/pos", *(f"{k} cosine" for k in kinds), "codec KL p99"), table)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    markers = dict(zip(kinds, "osD^vx"))
    for kind in kinds:
        pts = sorted((size[key], c[kind], key[1]) for key, c in cos.items() if kind in c)
        axes[0].plot([b for b, _, _ in pts], [1 - v for _, v, _ in pts], marker=markers[kind], linestyle="none", label=kind)
    for b, v, lb in sorted((size[key], c["fkl"], key[1]) for key, c in cos.items() if "fkl" in c):
        axes[0].annotate(lb.replace("adaptive min-mass ", "mm ").replace("sampled ", ""), (b, 1 - v), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    tops = sorted((int(key[1][4:]), c["fkl"]) for key, c in cos.items() if key[1].startswith("top-") and "fkl" in c)
    if tops:
        axes[0].plot([formula(k) for k, _ in tops], [1 - c for _, c in tops], "k--", label="fkl top-k at DistillKit's formula bytes")
    axes[0].set(xscale="log", yscale="log", xlabel="bytes / position", ylabel="1 - KD-gradient cosine vs dense KD (lower is better)",
                title="what the targets carry, per loss")
    kx = sorted((size[key], v, key[1]) for key, v in kl_p99.items() if key in size and not math.isnan(v))
    axes[1].plot([b for b, _, _ in kx], [v for _, v, _ in kx], "o")
    for b, v, lb in kx:
        axes[1].annotate(lb.replace("adaptive min-mass ", "mm "), (b, v), fontsize=7)
    axes[1].set(xscale="log", yscale="log" if kx else "linear", xlabel="bytes / position", ylabel="codec coarse KL, p99",
                title="what the codec loses (top-k, adaptive)")
    from matplotlib.ticker import ScalarFormatter

    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def read_output(path: str) -> tuple[list[tuple], dict[tuple, float], int]:
    """The rows, KL p99 and V back from a saved run's output (`--replot`): the main table's
    rows, and the Pareto table's last column."""
    rows, kl, vocab, table = [], {}, 49152, None
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("vocabulary "):
            vocab = int(line.split()[1])
        elif not line.startswith("|"):
            continue
        elif cells[0] == "student":  # a header: which table follows
            table = "pareto" if cells[-1] == "codec KL p99" else "main"
        elif set(cells[0]) <= {"-"}:
            continue
        elif table == "main":
            rows.append(tuple(cells))
        elif table == "pareto":
            kl[(cells[0], cells[1], cells[2])] = float(cells[-1])
    return rows, kl, vocab


if __name__ == "__main__":
    main()
