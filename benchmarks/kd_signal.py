"""How close is the cache's KD gradient to dense online KD's, at fixed student weights?

Training-run comparisons (benchmarks/quality.py) mix the loss's fidelity with path noise:
at this scale a few percent of final PPL moves with when a run leaves its early plateau.
This isolates the first: for each student checkpoint and each cache, on the same batches,
it compares the gradient of the cached top-k forward KL (tail bucket and tail renorm) with
the gradient of the dense forward KL against the teacher's full distribution, and the
same for the training loss CE + gamma * KD. Prints a table.

    python benchmarks/kd_signal.py --teacher T --cache C64.zarr C255.zarr \
        --student random:STUDENT_CONFIG_DIR trained:RUN/final --batches 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import machine, print_table
from transformers import AutoConfig, AutoModelForCausalLM

from ddk_cache.train.data import CacheLoader
from ddk_cache.train.losses import KDLoss, ce_and_dense_kd, ce_and_sparse_kd
from ddk_cache.store.cache import Cache


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--cache", nargs="+", required=True, help="caches of the same teacher and corpus (e.g. different k)")
    p.add_argument("--student", nargs="+", required=True, metavar="NAME:DIR")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gamma", type=float, default=0.2)
    args = p.parse_args()
    torch.set_grad_enabled(True)

    caches = [Cache(c) for c in args.cache]
    weights = np.full(len(caches[0].domains), 1 / len(caches[0].domains))
    batches = []
    for cache in caches:
        loader = CacheLoader(cache, batch_size=args.batch_size, weights=weights, seed=0)
        batches.append([loader.next() for _ in range(args.batches)])
        loader.close()
    for other in batches[1:]:  # same corpus, same draws: the same token batches
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(batches[0], other)), "caches hold different sequences"
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    print(f"machine: {machine()}")
    print(f"{args.batches} batches of {args.batch_size} x {caches[0].seq_len} tokens, uniform over domains; gamma {args.gamma}; "
          "cosine and relative error of the gradient (all student parameters) against dense online KD\n")

    rows = []
    for spec in args.student:
        name, model = load_student(spec)
        sums: dict[tuple[str, str], list[float]] = {}
        for i in range(args.batches):
            x = batches[0][i].tokens
            labels = x[:, 1:].reshape(-1)
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits[:, :-1].reshape(labels.numel(), -1)

            def logits() -> torch.Tensor:
                out = model(input_ids=x, use_cache=False).logits[:, :-1]
                return out.reshape(labels.numel(), -1)

            ce, kd = ce_and_dense_kd(logits(), labels, t_logits, KDLoss("fkl"))
            ref_kd = flat_grad(model, kd.mean())
            ce, kd = ce_and_dense_kd(logits(), labels, t_logits, KDLoss("fkl"))
            ref_total = flat_grad(model, ce.mean() + args.gamma * kd.mean())
            for cache, cb in zip(caches, batches):
                b = cb[i]
                ids = b.topk_ids.reshape(labels.numel(), -1)
                lps = b.topk_logprobs.reshape(labels.numel(), -1)
                for tail in ("bucket", "renorm"):
                    cfg = KDLoss("fkl", tail=tail)
                    _, kd = ce_and_sparse_kd(logits(), labels, ids, lps, cfg)
                    g_kd = flat_grad(model, kd.mean())
                    ce, kd = ce_and_sparse_kd(logits(), labels, ids, lps, cfg)
                    g_total = flat_grad(model, ce.mean() + args.gamma * kd.mean())
                    acc = sums.setdefault((f"top-{cache.top_k}", tail), [])
                    acc.append((
                        float(torch.nn.functional.cosine_similarity(g_kd, ref_kd, dim=0)),
                        float((g_kd - ref_kd).norm() / ref_kd.norm()),
                        float(torch.nn.functional.cosine_similarity(g_total, ref_total, dim=0)),
                        float((g_total - ref_total).norm() / ref_total.norm()),
                    ))
        for (cache_name, tail), values in sums.items():
            m = np.mean(values, axis=0)
            rows.append((name, cache_name, tail, f"{m[0]:.4f}", f"{m[1]:.3f}", f"{m[2]:.4f}", f"{m[3]:.3f}"))
    print_table(("student", "cache", "tail", "KD grad cosine", "KD grad rel. error", "CE+gamma*KD grad cosine", "CE+gamma*KD rel. error"), rows)


if __name__ == "__main__":
    main()
