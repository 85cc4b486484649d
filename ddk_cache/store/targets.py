"""Which teacher targets a cache keeps per position: top-k, adaptive top-k, sampled ids, or none.

  none      tokens only (`--top-k 0`): no teacher at all; for plain language modelling.
  topk      the k most probable ids and their log-probs; the rest is one tail bucket.
  adaptive  top-k cut short per position (`min_mass`: stop once the kept probability
            reaches it; `min_prob`: drop entries below it), capped at k, top-1 always kept.
  sampled   N ids drawn from the teacher (at `sample_temperature` tau), stored as unique
            ids with counts; the trainer's target is counts/N, or with tau != 1 the
            importance-weighted counts * p^(1 - 1/tau), normalised (Sparse Logit Sampling,
            arXiv 2503.16870). Unbiased, E[counts/N] = p, only when the draws come
            from the whole distribution at tau = 1 (`unbiased`); drawn from a top-k
            pool (vLLM) or at tau != 1 (self-normalised weights) the estimate is only
            consistent. Every unique id is kept: a position holds up to N of them.

The backends score; this module turns their output into targets, so both backends feed one
encoder. Dropped entries are marked by a log-prob of -inf (and count 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

KINDS = ("none", "topk", "sampled")
MAX_SAMPLES = 4096
# vLLM returns at most this many log-probs per position; sampling there draws from them.
DEFAULT_SAMPLE_POOL = 256


@dataclass(frozen=True)
class TargetSpec:
    """What to keep per position. Stored in the cache's metadata as `targets`."""

    kind: str = "topk"  # topk (with min_mass/min_prob: adaptive) or sampled
    k: int = 64  # most entries kept per position (topk), or unique ids (sampled: <= samples)
    min_mass: float | None = None  # adaptive: keep entries until their probability sums to this
    min_prob: float | None = None  # adaptive: drop entries below this probability
    samples: int = 50  # sampled: draws per position
    sample_temperature: float = 1.0  # sampled: draw from softmax(logits / tau)
    sample_pool: int | None = None  # sampled: drawn from the top-`pool` only (vLLM); None = full distribution
    seed: int = 0  # sampled: draws are a function of (seed, domain, split, shard)

    def __post_init__(self) -> None:
        checks = [
            (self.kind in KINDS, f"--targets must be one of {', '.join(KINDS)}, got {self.kind!r}"),
            (self.k >= 1 or self.kind == "none", f"--top-k must be >= 1 (0: a tokens-only cache), got {self.k}"),
            (self.min_mass is None or 0 < self.min_mass <= 1, f"--min-mass must be in (0, 1], got {self.min_mass}"),
            (self.min_prob is None or 0 < self.min_prob < 1, f"--min-prob must be in (0, 1), got {self.min_prob}"),
            (1 <= self.samples <= MAX_SAMPLES, f"--samples must be in 1..{MAX_SAMPLES}, got {self.samples}"),
            (0.1 <= self.sample_temperature <= 10, f"--sample-temperature must be in 0.1..10, got {self.sample_temperature}"),
            (self.kind == "topk" or (self.min_mass is None and self.min_prob is None), "--min-mass/--min-prob apply to --targets topk only"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def adaptive(self) -> bool:
        return self.min_mass is not None or self.min_prob is not None

    @property
    def entries(self) -> int:
        """Most entries a position can hold: k; for sampled targets every unique id (up to
        `samples`: keeping fewer would bias the estimate); 0 for tokens-only caches."""
        return {"topk": self.k, "sampled": self.samples, "none": 0}[self.kind]

    @property
    def unbiased(self) -> bool:
        """Sampled targets whose expectation is the teacher's distribution: drawn from the
        whole vocabulary at temperature 1 (not from a top-k pool, not reweighted)."""
        return self.kind == "sampled" and self.sample_pool is None and self.sample_temperature == 1.0

    def describe(self) -> str:
        """One line for `inspect` and the README's table."""
        if self.kind == "none":
            return "tokens only (no teacher targets)"
        if self.kind == "topk":
            cut = ([f"min-mass {self.min_mass}"] if self.min_mass is not None else []) + ([f"min-prob {self.min_prob}"] if self.min_prob is not None else [])
            return f"top-{self.k}" + (f" (adaptive: {', '.join(cut)})" if cut else "") + " + tail bucket"
        source = "the whole distribution" if self.sample_pool is None else f"the top-{self.sample_pool} pool, renormalised"
        weight = "counts / N" if self.sample_temperature == 1.0 else f"importance-weighted counts (T = {self.sample_temperature})"
        verdict = "unbiased" if self.unbiased else "consistent but biased (" + ("truncated pool" if self.sample_pool else "self-normalised weights") + ")"
        return f"sampled: {self.samples} draws from {source}, target = {weight}; {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetSpec":
        return cls(**d)


def adaptive_cut(logprobs: np.ndarray, spec: TargetSpec) -> np.ndarray:
    """Top-k log-probs [..., k] in rank order -> the same with dropped entries set to -inf.

    min_mass: entry r is kept while the mass of the entries ranked above it is < min_mass
    (so the kept mass is the first to reach min_mass). min_prob: entries with p < min_prob
    go. Rank 0 always stays.
    """
    if not spec.adaptive:
        return logprobs
    p = np.exp(logprobs.astype(np.float64))
    keep = np.ones(p.shape, bool)
    if spec.min_mass is not None:
        before = np.cumsum(p, -1) - p
        keep &= before < spec.min_mass
    if spec.min_prob is not None:
        keep &= p >= spec.min_prob
    keep[..., 0] = True
    return np.where(keep, logprobs, -np.inf).astype(np.float32)


def _unique_counts(draws: np.ndarray, entries: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws int [M, N] -> (unique ids [M, entries], counts [M, entries]), padded with count 0.

    If a position has more unique ids than `entries`, the most drawn are kept."""
    M, N = draws.shape
    s = np.sort(draws, 1)
    new = np.ones_like(s, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(new, 1) - 1  # which unique id of its row each draw is
    width = int(run[:, -1].max()) + 1
    counts = np.bincount((np.arange(M)[:, None] * width + run).ravel(), minlength=M * width).reshape(M, width)
    ids = np.zeros((M, width), np.int64)
    rows, cols = np.nonzero(new)
    ids[rows, run[rows, cols]] = s[rows, cols]
    if width > entries:  # keep the most drawn ids
        order = np.argsort(-counts, 1, kind="stable")[:, :entries]
        ids, counts = np.take_along_axis(ids, order, 1), np.take_along_axis(counts, order, 1)
    elif width < entries:
        ids = np.pad(ids, ((0, 0), (0, entries - width)))
        counts = np.pad(counts, ((0, 0), (0, entries - width)))
    return ids, counts


def sample_from_logprobs(logprobs: Any, spec: TargetSpec, generator: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-vocabulary teacher log-probs (torch [M, V]) -> (ids, counts, teacher log-probs), each [M, entries].

    Draws `spec.samples` ids per row from softmax(logprobs / tau) with `generator` (a torch
    Generator on the logits' device), so a build is reproducible on one kind of device."""
    import torch

    probs = torch.softmax(logprobs.float() / spec.sample_temperature, -1)
    draws = torch.multinomial(probs, spec.samples, replacement=True, generator=generator).cpu().numpy()
    ids, counts = _unique_counts(draws, spec.entries)
    lps = logprobs.gather(-1, torch.from_numpy(ids).to(logprobs.device)).float().cpu().numpy()
    return ids, counts, np.where(counts > 0, lps, -np.inf).astype(np.float32)


def sample_from_topk(ids: np.ndarray, logprobs: np.ndarray, spec: TargetSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `sample_from_logprobs` from a top-K' pool ([M, K'] ids and log-probs): the pool is
    renormalised, so ids outside it are never drawn (vLLM returns no more)."""
    M, K = ids.shape
    w = np.exp((logprobs.astype(np.float64) - logprobs[:, :1]) / spec.sample_temperature)
    cdf = np.cumsum(w, 1)
    cdf /= cdf[:, -1:]
    # Inverse CDF of every row at once: row r's CDF is shifted to [r, r + 1] in one sorted array.
    offset = np.arange(M, dtype=np.float64)[:, None]
    u = rng.random((M, spec.samples)) + offset
    pick = np.searchsorted((cdf + offset).ravel(), u.ravel(), side="right").reshape(M, -1) - offset.astype(np.int64) * K
    pick = np.clip(pick, 0, K - 1)
    slot, counts = _unique_counts(pick, spec.entries)
    out_ids = np.take_along_axis(ids, slot, 1)
    lps = np.take_along_axis(logprobs, slot, 1)
    return out_ids, counts, np.where(counts > 0, lps, -np.inf).astype(np.float32)


def split_seed(spec: TargetSpec, domain: str, split: str) -> list[int]:
    """The seed sequence of a split's draws; a sequence's own is this plus its row index in
    the split, so the same sequence draws the same ids on any resume, whatever the sharding."""
    import zlib

    return [spec.seed, zlib.crc32(domain.encode()), zlib.crc32(split.encode())]
