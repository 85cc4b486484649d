"""How faithful a cache is to its teacher: re-run the teacher on a sample and compare.

Per sampled position, with p the teacher's full distribution (transformers, float32) and
S the stored ids:
  covered mass   sum_{v in S} p(v)
  coarse KL      KL(P || T) over the categories (ids in S, one tail bucket):
                 P = p coarsened (p on S, 1 - covered mass), T = the stored targets
                 (decoded log-probs on S, 1 - their sum). Includes truncation to S and
                 the codec's quantisation; 0 for exact top-V. Reported as mean, p99 and
                 max over positions: pack-v2 bounds every position by its KL budget.
  invalid        positions whose decoded targets are not a distribution (kept mass > 1,
                 non-finite values); must be 0.
  sampled caches: T has no tail (the weights sum to 1), so the coarse KL is reported the
                 other way, KL(T || P), the divergence of the sampled target from the teacher.
Plus the bytes per token of every stored array (whole cache, from one listing).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..store.cache import SPLITS, Cache
from ..store.verify import MASS_SLACK


def coarse_kl(p: np.ndarray, q: np.ndarray, pt: np.ndarray | None = None, qt: np.ndarray | None = None) -> np.ndarray:
    """KL(P || Q) per row, where P and Q are [n, c] probabilities of the same kept ids
    (0 = not kept) plus one tail bucket each: `pt`/`qt` where known exactly (the teacher's
    full distribution, a pack-v3 cache's stored tail), else 1 - the row's sum. 0 log 0 = 0."""
    pt = np.clip(1 - p.sum(1), 0, 1) if pt is None else pt
    qt = np.clip(1 - q.sum(1), 0, 1) if qt is None else qt
    with np.errstate(divide="ignore", invalid="ignore"):
        body = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0).sum(1)
        tail = np.where(pt > 0, pt * (np.log(pt) - np.log(np.maximum(qt, 1e-300))), 0.0)
    return body + tail


def fidelity(cache: Cache, *, sequences: int = 4, device: str = "auto", teacher: str | None = None) -> dict[str, Any]:
    """Re-score the first `sequences` validation sequences of each domain with the teacher
    (`teacher` overrides the recorded path) and compare with the stored targets."""
    import torch

    from .teachers.hf import HFTeacher

    from pathlib import Path

    from ..errors import ConfigError
    from .teachers.base import model_fingerprint

    if not cache.has_targets:
        raise ValueError(f"{cache.path} is a tokens-only cache: it stores no teacher targets to compare")
    recorded = cache.meta.teacher
    path = teacher or recorded["name_or_path"]
    if not teacher and not Path(path).is_absolute() and not Path(path).exists() and Path(path).parent != Path("."):
        # A relative directory recorded by an older build, not found from here: never a hub lookup.
        raise ConfigError(f"the cache's teacher {path!r} (a path relative to where it was built) is not found here; "
                          "pass --teacher with its location")
    if recorded.get("fingerprint") and model_fingerprint(path, recorded.get("revision")) != recorded["fingerprint"]:
        raise ConfigError(f"the model at {path} is not the teacher this cache was built with (its weights or config "
                          "differ): the fidelity numbers would be another model's; pass --teacher with the cache's teacher")
    t = HFTeacher(path, device=device, dtype=recorded.get("dtype") or "float32")  # imports may not record it
    sampled = cache.targets.kind == "sampled"
    mass, kl, invalid = [], [], 0
    for domain in cache.domains:
        batch = cache.read(domain, "val", 0, min(sequences, cache.num_sequences(domain, "val")))
        for row, logprobs, _ in t.rows(batch.tokens):
            ids, lps = batch.topk_ids[row].astype(np.int64), batch.topk_logprobs[row].astype(np.float64)
            valid = np.isfinite(lps)
            ids_t = torch.from_numpy(ids).to(logprobs.device)
            full = torch.gather(logprobs, -1, ids_t).double().cpu().numpy()
            p = np.where(valid, np.exp(full), 0.0)
            q = np.where(valid, np.exp(lps), 0.0)
            invalid += int(((q.sum(1) > 1 + MASS_SLACK) | np.isnan(lps).any(1)).sum())
            # The teacher's exact tail (outside the kept ids) and, where stored, the cache's.
            kept_ids = torch.where(torch.from_numpy(valid).to(logprobs.device), ids_t, ids_t[:, :1])
            pt = torch.logsumexp(logprobs.double().scatter(-1, kept_ids, float("-inf")), -1).exp().cpu().numpy()
            qt = None if batch.tail_logprob is None else np.exp(batch.tail_logprob[row].astype(np.float64))
            kl.append(coarse_kl(q, p) if sampled else coarse_kl(p, q, pt, qt))
            mass.append(p.sum(1))
    t.close()
    kl_all = np.concatenate(kl)
    tokens = sum(cache.num_sequences(d, s) * cache.seq_len for d in cache.domains for s in SPLITS)
    per_array = cache.array_bytes()
    return {
        "positions": int(len(kl_all)),
        "covered_mass": float(np.concatenate(mass).mean()),
        "coarse_kl": float(kl_all.mean()),
        "coarse_kl_p99": float(np.quantile(kl_all, 0.99)),
        "coarse_kl_max": float(kl_all.max()),
        "invalid_share": invalid / max(1, len(kl_all)),
        "kl_direction": "KL(target || teacher)" if sampled else "KL(teacher || target)",
        "kl_budget": cache.encoding.to_dict().get("kl_budget"),
        "logprob_step": cache.encoding.to_dict().get("step"),
        "targets": cache.targets.describe(),
        "capture": cache.meta.describe_capture(),  # an imported capture: what it lacks
        "bytes_per_token": {name: b / tokens for name, b in sorted(per_array.items())},
    }
