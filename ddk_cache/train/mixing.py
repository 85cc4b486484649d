"""Domain sampling weights: DDK's discrepancy-driven mix (arXiv 2407.16154) and the baselines.

DDK (arXiv 2407.16154): with student and teacher validation perplexities l_S[i], l_T[i],
  discrepancy factor   r[i] = exp(l_S[i]/l_T[i]) / sum_j exp(l_S[j]/l_T[j])
  smooth update        psi[i] = r_prev[i] * exp(l_S[i]/l_T[i]);
                       r[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N
`ddk` starts from uniform weights and applies the smooth update at every evaluation, the
first included (so even the first mix keeps every domain at >= (1 - alpha)/N: an untrained
student's ratio is largest where the teacher is best, and the raw factor put 0.99 of the
data on one domain for the first interval of the quickstart; BENCHMARKS.md, "DDK's first
weights"). `ddk-nosmooth` uses the raw factor every time. Everything is computed in log
space, so ratios in the thousands cannot overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("ddk", "ddk-nosmooth", "uniform", "natural", "static")


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def check_alpha(alpha: float) -> None:
    """DDK's smoothing alpha is a share: ValueError outside [0, 1] (the one check of it)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"--ddk-alpha must be in [0, 1], got {alpha}")


def parse_static(spec: str, domains: list[str]) -> np.ndarray:
    """`dom=w,dom=w` -> weights over `domains` (unlisted domains get 0), normalised.

    Raises ValueError naming an unknown domain, a malformed item or all-zero weights.
    """
    weights = dict.fromkeys(domains, 0.0)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--mixing static: {item!r} is not DOMAIN=WEIGHT")
        if name not in weights:
            raise ValueError(f"--mixing static: the cache has no domain {name!r} (domains: {', '.join(domains)})")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--mixing static: weight {value!r} of {name!r} is not a number") from None
        if w < 0 or not math.isfinite(w):
            raise ValueError(f"--mixing static: weight of {name!r} must be >= 0, got {w}")
        weights[name] = w
    top = max(weights.values())
    if top <= 0:
        raise ValueError("--mixing static: at least one domain needs a positive weight")
    scaled = [weights[d] / top for d in domains]  # by the largest first: weights near 1e308 do not overflow the sum
    return np.array([w / sum(scaled) for w in scaled])


@dataclass
class Mixer:
    """Holds the current weights over `domains` and updates them from perplexities."""

    kind: str
    domains: list[str]
    sizes: list[int]  # training sequences per domain (for `natural`)
    alpha: float = 0.5
    static: str = ""
    weights: np.ndarray = field(init=False)
    updates: int = 0

    def __post_init__(self) -> None:
        kind = self.kind.split(":", 1)[0]
        if kind not in KINDS:
            raise ValueError(f"--mixing must be one of ddk, ddk-nosmooth, uniform, natural, static:DOM=W,...; got {self.kind!r}")
        if kind == "static" and ":" in self.kind:
            self.static = self.kind.split(":", 1)[1]
        self.kind = kind
        check_alpha(self.alpha)
        n = len(self.domains)
        if kind == "natural":
            self.weights = np.asarray(self.sizes, float) / float(sum(self.sizes))
        elif kind == "static":
            self.weights = parse_static(self.static, self.domains)
        else:  # uniform, and DDK until its first evaluation
            self.weights = np.full(n, 1.0 / n)

    @property
    def adaptive(self) -> bool:
        """Whether evaluations change the weights (DDK) or only get logged."""
        return self.kind in ("ddk", "ddk-nosmooth")

    def update(self, ppl_student: list[float], ppl_teacher: list[float]) -> np.ndarray:
        """Apply one DDK step with fresh perplexities (in `domains` order); return the new weights."""
        if not self.adaptive:
            return self.weights
        ratio = np.asarray(ppl_student, float) / np.asarray(ppl_teacher, float)
        if self.kind == "ddk-nosmooth":
            self.weights = _softmax(ratio)
        else:
            # log psi = log r_prev + ratio; normalising in log space keeps huge ratios finite.
            log_psi = np.log(np.maximum(self.weights, 1e-300)) + ratio
            self.weights = self.alpha * _softmax(log_psi) + (1 - self.alpha) / len(self.domains)
        self.updates += 1
        return self.weights

    def state_dict(self) -> dict:
        return {"kind": self.kind, "weights": self.weights.tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], float)
        self.updates = int(state["updates"])
