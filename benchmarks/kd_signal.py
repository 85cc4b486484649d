"""Which cached targets train closest to dense KD, per byte: the gradient at fixed weights.

Training-run comparisons (benchmarks/quality.py) mix the loss's fidelity with path noise:
at this scale a few percent of final PPL moves with when a run leaves its early plateau.
This isolates the first. For each student and each batch it computes the gradient (all
student parameters, float64) of dense forward KL against the teacher's full distribution,
and of the training loss CE + gamma * KD, then the same with sparse targets derived from
the same teacher output exactly as the build derives them (targets.py) and packed and
unpacked with pack-v2 (what training reads): top-k for each --targets k (tail bucket and
tail renorm), and sampled targets (N draws from the whole distribution; tail bucket is the
unbiased loss, renorm is shown to measure its bias). Sampled targets are random: their
rows average --draws independent draws per batch ("1 draw": the mean of each draw's
cosine/error; "mean of draws": the gradient averaged over the draws, which converges to
the dense gradient only if the loss is unbiased). Bytes per position: pack-v2's, for
these targets on this teacher.

    python benchmarks/kd_signal.py --tokens /tmp/codec-bench/tokens.zarr --teacher /tmp/codec-bench/peaked/x8 \\
        --student init:/tmp/codec-bench/student-init trained:/tmp/codec-bench/student-run/final \\
        --targets topk:16 topk:64 topk:256 sampled:16 sampled:50 --batches 4 --draws 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.store.encodings import Layout, PackV2, RowScores  # noqa: E402
from ddk_cache.store.targets import TargetSpec, sample_from_logprobs  # noqa: E402
from ddk_cache.train.data import CacheLoader  # noqa: E402
from ddk_cache.train.losses import KDConfig, ce_and_dense_kd, ce_and_sparse_kd  # noqa: E402


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


def targets_for(logp: torch.Tensor, nxt: torch.Tensor, spec: TargetSpec, codec_enc: PackV2, layout: Layout,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids [P, K], log-probs [P, K], packed bytes) of one sequence, through pack-v2."""
    target = logp.gather(-1, nxt[:, None]).squeeze(-1).numpy()
    if spec.kind == "sampled":
        ids, counts, lps = sample_from_logprobs(logp, spec, gen)
        row = RowScores(ids.astype(np.int32), lps, target, nxt.numpy(), counts)
    else:
        lp, ids = logp.topk(spec.k, -1)
        row = RowScores(ids.numpy().astype(np.int32), lp.numpy(), target, nxt.numpy())
    blob = codec_enc.encode(row, layout)["targets"]
    decoded = codec_enc.decode({"targets": [blob]}, layout)
    return torch.from_numpy(decoded.ids[0]).long(), torch.from_numpy(decoded.logprobs[0]), len(blob)


def stats(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return float(torch.nn.functional.cosine_similarity(g, ref, dim=0)), float((g - ref).norm() / ref.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--tokens", required=True, help="a cache of the teacher's corpus (its tokens are the batches)")
    p.add_argument("--student", nargs="+", required=True, metavar="NAME:DIR")
    p.add_argument("--targets", nargs="+", default=["topk:16", "topk:64", "topk:256", "sampled:16", "sampled:50"])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--draws", type=int, default=8, help="independent draws per batch for sampled targets")
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--kl-budget", type=float, default=1e-4)
    args = p.parse_args()
    torch.set_grad_enabled(True)
    cache = Cache(args.tokens)
    weights = np.full(len(cache.domains), 1 / len(cache.domains))
    with CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=0, targets=False) as loader:
        batches = [loader.next().tokens for _ in range(args.batches)]
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    V = teacher.config.vocab_size
    P = batches[0].shape[1] - 1
    specs = []
    for t in args.targets:
        kind, n = t.split(":")
        specs.append(TargetSpec(kind="sampled", k=1, samples=int(n)) if kind == "sampled" else TargetSpec(k=int(n)))
    enc = PackV2(kl_budget=args.kl_budget)
    print(f"machine: {machine()}")
    print(f"teacher {args.teacher}; {args.batches} batches of {args.batch_size} x {P + 1} tokens, uniform over domains; gamma {args.gamma}; "
          f"pack-v2 budget {args.kl_budget}; sampled: {args.draws} draws per batch\n")

    rows = []
    for student in args.student:
        name, model = load_student(student)
        acc: dict[tuple, list] = {}
        nbytes: dict[str, list[float]] = {}
        for x in batches:
            labels = x[:, 1:].reshape(-1)
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1].float()
            t_logp = torch.log_softmax(t_logits, -1)
            flat_t = t_logits.reshape(labels.numel(), -1)

            def logits() -> torch.Tensor:
                return model(input_ids=x, use_cache=False).logits[:, :-1].reshape(labels.numel(), -1)

            ce, kd = ce_and_dense_kd(logits(), labels, flat_t, KDConfig("fkl"))
            ref_kd = flat_grad(model, kd.mean())
            ce, kd = ce_and_dense_kd(logits(), labels, flat_t, KDConfig("fkl"))
            ref_total = flat_grad(model, ce.mean() + args.gamma * kd.mean())
            for spec in specs:
                label = f"sampled N={spec.samples}" if spec.kind == "sampled" else f"top-{spec.k}"
                layout = Layout(positions=P, entries=spec.entries, vocab_size=V, targets=spec)
                draws = args.draws if spec.kind == "sampled" else 1
                per_tail: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"bucket": [], "renorm": []}
                for d in range(draws):
                    gen = torch.Generator().manual_seed(1000 * d + 7)
                    parts = [targets_for(t_logp[b], x[b, 1:], spec, enc, layout, gen) for b in range(len(x))]
                    ids = torch.cat([p[0] for p in parts]).reshape(labels.numel(), -1)
                    lps = torch.cat([p[1] for p in parts]).reshape(labels.numel(), -1)
                    nbytes.setdefault(label, []).append(sum(p[2] for p in parts) / labels.numel())
                    for tail in ("bucket", "renorm"):
                        cfg = KDConfig("fkl", tail=tail)
                        _, kd = ce_and_sparse_kd(logits(), labels, ids, lps, cfg)
                        g_kd = flat_grad(model, kd.mean())
                        ce, kd = ce_and_sparse_kd(logits(), labels, ids, lps, cfg)
                        per_tail[tail].append((g_kd, flat_grad(model, ce.mean() + args.gamma * kd.mean())))
                for tail, gs in per_tail.items():
                    single = np.mean([stats(g, ref_kd) + stats(gt, ref_total) for g, gt in gs], axis=0)
                    mean_kd = torch.stack([g for g, _ in gs]).mean(0)
                    mean_total = torch.stack([gt for _, gt in gs]).mean(0)
                    acc.setdefault((label, tail, "1 draw" if draws > 1 else "-"), []).append(single)
                    if draws > 1:
                        acc.setdefault((label, tail, f"mean of {draws}"), []).append(stats(mean_kd, ref_kd) + stats(mean_total, ref_total))
        for (label, tail, how), values in acc.items():
            m = np.mean(values, axis=0)
            rows.append((name, label, f"{np.mean(nbytes[label]):.1f}", tail, how, f"{m[0]:.4f}", f"{m[1]:.3f}", f"{m[2]:.5f}", f"{m[3]:.4f}"))
    print_table(("student", "targets", "pack-v2 B/pos", "tail", "sampled", "KD grad cosine", "KD grad rel. error",
                 "CE+gamma*KD cosine", "CE+gamma*KD rel. error"), rows)


if __name__ == "__main__":
    main()
