"""How faithful a cache is to its teacher: re-run the teacher on a sample and compare.

Per sampled position, with p the teacher's full distribution (transformers, float32) and
S the stored ids:
  covered mass   sum_{v in S} p(v)
  coarse KL      KL(P || T) over the categories (ids in S, one tail bucket):
                 P = p coarsened (p on S, 1 - covered mass), T = the stored targets
                 (decoded log-probs on S, 1 - their sum). Includes truncation to S and
                 the codec's quantisation; 0 for exact top-V.
  sampled caches: T has no tail (the weights sum to 1), so the coarse KL is reported the
                 other way, KL(T || P), the divergence of the sampled target from the teacher.
Plus the bytes per token of every stored array (whole cache).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .store import SPLITS, Cache


def fidelity(cache: Cache, *, sequences: int = 4, device: str = "auto", teacher: str | None = None) -> dict[str, Any]:
    """Re-score the first `sequences` validation sequences of each domain with the teacher
    (`teacher` overrides the recorded path) and compare with the stored targets."""
    import torch

    from .teachers.hf import HFTeacher

    t = HFTeacher(teacher or cache.meta["teacher"]["name_or_path"], device=device, dtype=cache.meta["teacher"]["dtype"])
    sampled = cache.targets.kind == "sampled"
    mass, kl = [], []
    for domain in cache.domains:
        n = min(sequences, cache.num_sequences(domain, "val"))
        batch = cache.read(domain, "val", 0, n)
        with torch.inference_mode():
            for row in range(n):
                x = torch.from_numpy(batch.tokens[row]).long()[None].to(t.device)
                logp = torch.log_softmax(t.model(input_ids=x).logits[0, :-1].double(), -1).cpu().numpy()
                ids, lps = batch.topk_ids[row], batch.topk_logprobs[row].astype(np.float64)
                valid = np.isfinite(lps)
                p = np.where(valid, np.exp(np.take_along_axis(logp, ids, 1)), 0.0)
                q = np.where(valid, np.exp(lps), 0.0)
                pt, qt = np.clip(1 - p.sum(1), 0, 1), np.clip(1 - q.sum(1), 0, 1)
                if sampled:
                    kl.append(_kl(q, p) + _kl(qt, pt))
                else:
                    kl.append(_kl(p, q) + _kl(pt, qt))
                mass.append(p.sum(1))
    t.close()
    tokens = sum(cache.num_sequences(d, s) * cache.seq_len for d in cache.domains for s in SPLITS)
    per_array: dict[str, int] = {}
    for d in cache.domains:
        for s in SPLITS:
            g = cache.root[f"{d}/{s}"]
            for name in g.array_keys():
                per_array[name] = per_array.get(name, 0) + int(g[name].nbytes_stored())
    return {
        "positions": int(sum(len(m) for m in mass)),
        "covered_mass": float(np.concatenate(mass).mean()),
        "coarse_kl": float(np.concatenate(kl).mean()),
        "kl_direction": "KL(target || teacher)" if sampled else "KL(teacher || target)",
        "bytes_per_token": {name: b / tokens for name, b in per_array.items()},
    }


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum a log(a / b) over the last axis of a broadcastable pair, 0 log 0 = 0."""
    a, b = np.atleast_2d(a.T).T if a.ndim == 1 else a, np.atleast_2d(b.T).T if b.ndim == 1 else b
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * (np.log(a) - np.log(np.maximum(b, 1e-300))), 0.0)
    return terms.sum(-1)
