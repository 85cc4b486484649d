"""Knowledge-distillation divergences on sparse (cached top-k) and dense teacher targets.

Every function returns one value per token (shape [N]); callers sum over tokens and scale
by 1/tokens at the optimizer step. Inputs are flattened positions: N tokens, vocabulary V,
k cached entries per token. Arithmetic is float32 (float64 for float64 student logits: the
reference tests run that way); tails are computed in log space without floors.

Sparse targets (the cache): the teacher's top-k ids S and log-probs log p_S at temperature 1.
At temperature T:
  teacher  p^T_S = a * softmax(log p_S / T)   where a = sum_S p (the kept mass at T = 1;
                                             exact within S, the tail mass at T != 1 is not
                                             recoverable, so it keeps its T = 1 value)
  student  q^T   = softmax(z / T) over the whole vocabulary, q^T_S its entries at S
Tail handling (`tail`):
  "bucket" (default): both distributions get one extra category for everything outside S:
           teacher 1 - a, student 1 - sum_S q^T. With k = V there is no tail and the sparse
           loss equals the dense one.
  "renorm": both are renormalised over S: p^T_S / a and q^T_S / sum_S q^T.
Cached ids that are >= the student's vocabulary, or negative (a teacher id with no student id:
cross-tokenizer targets, crosstok.py), are dropped (their mass joins the tail), and entries
with log-prob -inf are padding (adaptive k, sampled targets). A position with no finite
entry at all carries no teacher information: every divergence gives 0 there. Sampled targets are
weights summing to 1 (a = 1): their tail bucket is empty, and forward KL against them is the
unbiased sampled-KD loss.

Divergences D(P, Q) over the resulting categories (MiniLLM arXiv 2306.08543; DistiLLM arXiv
2402.03898; GKD arXiv 2306.13649; AKL arXiv 2404.02657):
  fkl   sum P (log P - log Q)                              forward KL
  rkl   sum Q (log Q - log P)                              reverse KL (MiniLLM's single-step term)
  skl   KL(P || a P + (1-a) Q),        a = skew_alpha      DistiLLM skew KL
  srkl  KL(Q || (1-a) P + a Q)                             DistiLLM skew reverse KL
  jsd   b KL(P || M) + (1-b) KL(Q || M), M = b P + (1-b) Q  generalised JSD, b = jsd_beta
  akl   g_h/(g_h+g_t) KL(P||Q) + g_t/(g_h+g_t) KL(Q||P)     adaptive KL: head = the categories,
        by P descending, whose cumulative P (themselves included) is <= akl_mu, and always the
        top-1 (the authors' released code); g = sum |P - Q| over head / tail, Q detached
  uld   sum_r |P_(r) - Q_(r)|                               Universal Logit Distillation (arXiv
        2402.12030): the L1 (Wasserstein-1) distance between the two distributions sorted in
        descending order, ids ignored, so it needs no shared vocabulary. Sparse: the teacher's
        kept entries (all of them, mapped to the student or not) and the student's top-k, each
        with its tail as one more category; with k = V it is the authors' formula
        (`abs(student_sorted - teacher_sorted).sum(-1)`), with k < V a lower bound of it.

Cross-tokenizer hybrid (`KDConfig.unmatched`, GOLD's hybrid loss in TRL): the divergence above
on the teacher entries mapped to student ids (unmapped mass in the tail bucket), plus ULD
between the teacher's unmapped entries and the student's probabilities on `unmatched` ids
(those no teacher token maps to), both sorted, over k ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

TAILS = ("bucket", "renorm")


@dataclass(frozen=True)
class KDConfig:
    """Which divergence, at which temperature, with which tail rule and constants."""

    kind: str = "fkl"
    temperature: float = 1.0
    tail: str = "bucket"
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    akl_mu: float = 0.5
    # Multiply the divergence by T^2 (Hinton et al., arXiv 1503.02531), so its gradient keeps
    # its scale as T grows. Off by default: at T = 1 it changes nothing, and implementations
    # differ (torchtune's KD loss does not scale; DistillKit's does).
    t2_scale: bool = False
    # Cross-tokenizer hybrid: bool [student vocabulary], True at student ids no teacher token
    # maps to (crosstok.CrossTokenizer.unmatched); None: no unmatched term.
    unmatched: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kd loss must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if not 0 < self.temperature <= 100:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if self.unmatched is not None and (self.temperature != 1.0 or self.tail != "bucket" or self.kind == "uld"):
            raise ValueError("the cross-tokenizer hybrid loss is defined at temperature 1 with the tail bucket, on a divergence "
                             f"(not uld); got temperature {self.temperature}, tail {self.tail}, kd loss {self.kind}")
        for name in ("skew_alpha", "jsd_beta", "akl_mu"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")


def _dtype(x: torch.Tensor) -> torch.dtype:
    """The loss's arithmetic: float32, or float64 for float64 inputs (the reference tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the last axis, with 0 * anything = 0."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _finite(logx: torch.Tensor) -> torch.Tensor:
    """-inf (a category of zero probability) as a finite stand-in: exp() of it is still 0, and
    no 0 * inf reaches a gradient (torch.where does not stop NaN in the branch it drops)."""
    return torch.where(torch.isfinite(logx), logx, torch.full_like(logx, -1e30))


@dataclass(frozen=True)
class Divergence:
    """One registered divergence: `fn(logp, logq, p, q, cfg)` -> D(P, Q) per row (P the
    teacher, Q the student; log-probs finite, zero-probability categories at -1e30)."""

    name: str
    summary: str  # one line: `distill --help` lists it
    fn: Callable[..., torch.Tensor]


DIVERGENCES: dict[str, Divergence] = {}


def register(name: str, summary: str) -> Callable:
    """Add a divergence to `--kd-loss` (a new one is this decorator on one function, plus its test)."""
    def add(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        DIVERGENCES[name] = Divergence(name, summary, fn)
        return fn
    return add


@register("fkl", "forward KL")
def _fkl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    return _xlogy_diff(p, logp, logq)


@register("rkl", "token-level reverse KL: MiniLLM's single-step term")
def _rkl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    return _xlogy_diff(q, logq, logp)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w P + (1 - w) Q), in log space so tiny probabilities stay exact."""
    return torch.logaddexp(logp + math.log(w), logq + math.log(1 - w))


@register("skl", "DistiLLM skew KL")
def _skl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    return _xlogy_diff(p, logp, _log_mixture(logp, logq, cfg.skew_alpha))


@register("srkl", "DistiLLM skew reverse KL")
def _srkl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    return _xlogy_diff(q, logq, _log_mixture(logp, logq, 1 - cfg.skew_alpha))


@register("jsd", "generalised JSD")
def _jsd(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    w = cfg.jsd_beta
    logm = _log_mixture(logp, logq, w)
    return w * _xlogy_diff(p, logp, logm) + (1 - w) * _xlogy_diff(q, logq, logm)


@register("akl", "adaptive KL")
def _akl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor, q: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    # The AKL authors' rule (arXiv 2404.02657, their released code): sort by P, a category
    # is in the head when the cumulative P *including* it is <= mu; the top-1 always is.
    # The category whose cumulative mass crosses mu is in the tail.
    order = torch.argsort(p, dim=-1, descending=True, stable=True)
    p_sorted = p.gather(-1, order)
    head_sorted = torch.cumsum(p_sorted, -1) <= cfg.akl_mu
    head_sorted[..., 0] = True
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    gap = (p - q.detach()).abs()
    g_h = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)
    g_t = torch.where(head, torch.zeros_like(gap), gap).sum(-1)
    total = (g_h + g_t).clamp_min(1e-12)
    return g_h / total * _xlogy_diff(p, logp, logq) + g_t / total * _xlogy_diff(q, logq, logp)


ULD_SUMMARY = "Universal Logit Distillation: L1 between sorted distributions, for any two vocabularies"
KINDS = (*DIVERGENCES, "uld", "none")  # `uld`: not over shared categories (sparse_kd/dense_kd); `none`: CE only


def divergence(kind: str, logp: torch.Tensor, logq: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """D(P, Q) per row for categorical log-distributions [N, C] (P the teacher, Q the student;
    -inf: a category of zero probability)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}")
    logp, logq = _finite(logp), _finite(logq)
    return DIVERGENCES[kind].fn(logp, logq, logp.exp(), logq.exp(), cfg)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); -inf at x >= 0 (no
    mass left). No floor: a tail of 1e-12 stays 1e-12."""
    x = torch.clamp(x, max=0.0)
    safe = torch.where(x < 0, x, torch.full_like(x, -1.0))  # keeps inf out of the gradient at x = 0
    out = torch.where(safe > -0.6931, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(x < 0, out, torch.full_like(out, float("-inf")))


def _student_tail(logq_all: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, logq_kept: torch.Tensor) -> torch.Tensor:
    """log of the student's probability outside the kept ids [N, 1]. From the kept mass where
    that leaves a tail float32 resolves (1 - sum), and exactly, as a log-sum-exp over the
    ids outside S, where the student holds nearly all its mass on S (a peaked student: there
    1 - sum would round to 0 or to noise)."""
    log_kept = torch.logsumexp(logq_kept, -1, keepdim=True)
    tail = _log1mexp(log_kept.double()).to(logq_all.dtype)
    close = (log_kept > -1e-2).squeeze(-1)  # tail < ~1%: computed exactly below
    if bool(close.any()):
        rows = close.nonzero().squeeze(-1)
        inside = torch.zeros(len(rows), logq_all.shape[-1], dtype=torch.int32, device=logq_all.device)
        inside.scatter_add_(-1, ids[rows], valid[rows].int())
        exact = torch.logsumexp(logq_all[rows].masked_fill(inside > 0, float("-inf")), -1, keepdim=True)
        tail = tail.index_put((rows,), exact)
    return tail


def sparse_kd(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, cfg: KDConfig,
    *, student_logprobs: torch.Tensor | None = None, tail_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token divergence between cached top-k teacher targets and the student.

    student_logits [N, V] (any float dtype), topk_ids [N, k] int, topk_logprobs [N, k] float
    (teacher log-probs at temperature 1). `student_logprobs`, if given, is the float32
    log_softmax(student_logits / T) already computed (see `ce_and_sparse_kd`).
    `tail_logprob` [N], if the cache stores it (pack-v3), is the log of the teacher's mass
    outside the kept ids, exact where 1 - sum(kept) would round away (-inf: none); otherwise
    it is 1 - sum(kept) in float64. A row whose teacher tail is empty gets no tail category
    on either side. Returns [N] float32.
    """
    if cfg.kind == "none":
        return student_logits.new_zeros(student_logits.shape[0], dtype=_dtype(student_logits))
    vocab = student_logits.shape[-1]
    dt = _dtype(student_logits)
    T = cfg.temperature
    # Padding entries (adaptive k, sampled ids) carry log-prob -inf; ids outside the student's
    # vocabulary (>= vocab, or -1: no student id) are dropped into the tail.
    finite = torch.isfinite(topk_logprobs)
    valid = (topk_ids >= 0) & (topk_ids < vocab) & finite
    logq_all = student_logprobs if student_logprobs is not None else torch.log_softmax(student_logits.to(dt) / T, dim=-1)
    informed = finite.any(-1)  # a position with no finite entry has no teacher target: D = 0
    if cfg.kind == "uld":
        d = _uld_sparse(topk_logprobs.to(dt), finite, logq_all, tail_logprob, T)
        return _scaled(torch.where(informed, d, torch.zeros_like(d)), cfg)
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()
    lp = torch.where(valid, topk_logprobs.to(dt), torch.full_like(topk_logprobs, float("-inf"), dtype=dt))
    logq = torch.where(valid, logq_all.gather(-1, ids), torch.full_like(lp, float("-inf")))
    # The teacher's tail mass at T = 1, in log space: stored, or 1 - kept mass (float64).
    if tail_logprob is not None:
        log_tail = tail_logprob.reshape(-1, 1).to(lp.device, dt)
        dropped = finite & ~valid
        if bool(dropped.any()):  # the mass of dropped ids joins the stored tail
            extra = torch.logsumexp(torch.where(dropped, topk_logprobs.to(dt), torch.full_like(lp, float("-inf"))), -1, keepdim=True)
            log_tail = torch.logaddexp(log_tail, extra)
        log_a = _log1mexp(log_tail.double()).to(dt)
    else:
        log_a64 = torch.logsumexp(lp.double(), -1, keepdim=True).clamp(max=0.0)
        log_tail, log_a = _log1mexp(log_a64).to(dt), log_a64.to(dt)
    # Teacher at T: exact within S (softmax of log p / T), scaled to the kept mass a.
    logp = torch.log_softmax(lp / T, -1) + log_a if T != 1.0 else lp
    # k = V: S is the whole vocabulary (top-k of all V ids), so there is no tail at all.
    full = topk_ids.shape[-1] == vocab and bool(valid.all())
    if cfg.tail == "renorm":
        logp = logp - torch.logsumexp(logp, -1, keepdim=True)
        logq = logq - torch.logsumexp(logq, -1, keepdim=True)
    elif not full:
        # One more category for the mass outside S, on both sides (none where the teacher has none).
        q_tail = _student_tail(logq_all, ids, valid, logq)
        q_tail = torch.where(torch.isfinite(log_tail), q_tail, torch.full_like(q_tail, float("-inf")))
        logp = torch.cat([logp, log_tail], -1)
        logq = torch.cat([logq, q_tail], -1)
    d = divergence(cfg.kind, logp, logq, cfg)
    if cfg.unmatched is not None:
        d = d + _uld_unmatched(topk_logprobs.to(dt), finite & ~valid, logq_all, cfg.unmatched)
    return _scaled(torch.where(informed, d, torch.zeros_like(d)), cfg)


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_r |p_(r) - q_(r)| of two [N, *] probability rows each sorted descending (the
    shorter padded with zeros): ULD's distance."""
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def _uld_sparse(lp: torch.Tensor, finite: torch.Tensor, logq_all: torch.Tensor, tail_logprob: torch.Tensor | None,
                T: float) -> torch.Tensor:
    """ULD from cached entries: the teacher's finite entries at T (ids ignored) and its tail
    vs the student's top-k at T and its tail, sorted. [N]"""
    lp = torch.where(finite, lp, torch.full_like(lp, float("-inf")))
    log_kept = torch.logsumexp(lp, -1, keepdim=True)
    if tail_logprob is not None:  # the stored tail; the entries' own mass otherwise
        log_kept = torch.minimum(log_kept, _log1mexp(tail_logprob.reshape(-1, 1).to(lp.device, torch.float64)).to(lp.dtype))
    p = (torch.log_softmax(_finite(lp) / T, -1) + log_kept).exp() if T != 1.0 else lp.exp()
    p = torch.where(finite, p, torch.zeros_like(p)).sort(-1, descending=True).values
    k = min(lp.shape[-1], logq_all.shape[-1])
    q = logq_all.topk(k, -1).values.exp()
    full = k == logq_all.shape[-1]
    p_tail = (1 - p.sum(-1, keepdim=True)).clamp_min(0)
    q_tail = torch.zeros_like(p_tail) if full else (1 - q.sum(-1, keepdim=True)).clamp_min(0)
    return _sorted_l1(torch.cat([p, p_tail], -1), torch.cat([q, q_tail], -1))


def _uld_unmatched(lp: torch.Tensor, unmapped: torch.Tensor, logq_all: torch.Tensor, unmatched: Any) -> torch.Tensor:
    """The hybrid's ULD term: the teacher's unmapped entries vs the student's probabilities on
    ids no teacher token maps to, both sorted, over k ranks (0 where both sides are empty,
    as they are for a student of the teacher's own tokenizer). [N]"""
    mask = torch.as_tensor(unmatched, dtype=torch.bool, device=logq_all.device)  # no copy when already there (the trainer's)
    p = torch.where(unmapped, lp.exp(), torch.zeros_like(lp)).sort(-1, descending=True).values
    # The student's top-k over the unmatched ids; matched ids at -inf rank last with probability
    # 0, which is the zero padding of fewer than k unmatched ids (no count, no device sync).
    q = logq_all.masked_fill(~mask, float("-inf")).topk(min(lp.shape[-1], logq_all.shape[-1]), -1).values.exp()
    return _sorted_l1(p, q)


def _scaled(d: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    return d * cfg.temperature**2 if cfg.t2_scale and cfg.temperature != 1.0 else d


def dense_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: KDConfig, *, student_logprobs: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token divergence between full teacher and student distributions, both at temperature T.

    The reference for `sparse_kd` and the loss of online KD. [N, V] logits each; returns [N].
    `student_logprobs`, if given, is log_softmax(student_logits / T) in float32, already computed.
    """
    if cfg.kind == "none":
        return student_logits.new_zeros(student_logits.shape[0], dtype=_dtype(student_logits))
    dt = _dtype(student_logits)
    logp = torch.log_softmax(teacher_logits.to(dt) / cfg.temperature, -1)
    logq = student_logprobs if student_logprobs is not None else torch.log_softmax(student_logits.to(dt) / cfg.temperature, -1)
    if cfg.kind == "uld":  # the authors' formula on the whole vocabularies
        return _scaled(_sorted_l1(logp.exp().sort(-1, descending=True).values, logq.exp().sort(-1, descending=True).values), cfg)
    return _scaled(divergence(cfg.kind, logp, logq, cfg), cfg)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy at temperature 1: [N, V], [N] -> [N] float32."""
    return torch.nn.functional.cross_entropy(student_logits.to(_dtype(student_logits)), labels.long(), reduction="none")


IGNORE_INDEX = -100  # a label that carries no loss (PyTorch's and Hugging Face's convention)
DEFAULT_CHUNK = 1024  # positions per loss chunk (~V * 12 bytes each at the peak)


def auto_chunk(vocab_size: int) -> int:
    """Positions per loss chunk for a vocabulary: the largest power of two (128 to 1,024)
    whose [chunk, vocabulary] float32 tensor stays within 256 MiB: 1,024 up to V = 65,536,
    512 up to 131,072, 256 at 151,936 (Qwen) up to 262,144. A chunk's logits, log-softmax
    and their gradients (about five such tensors at the peak) are what the loss adds beyond
    the head's gradient; at this size the fused loss adds <= 1/8 of the unchunked loss's
    memory at 8k tokens (BENCHMARKS.md, *the loss's memory*)."""
    fit = (1 << 26) // max(1, vocab_size)
    return max(128, min(DEFAULT_CHUNK, 1 << max(0, fit.bit_length() - 1)))


def _ce(student_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE [N], the float32 log-softmax [N, V] it came from), for the KD term to share.
    Positions labelled IGNORE_INDEX get CE 0."""
    logq = torch.log_softmax(student_logits.to(_dtype(student_logits)), dim=-1)
    keep = labels != IGNORE_INDEX
    ce = -logq.gather(-1, torch.where(keep, labels, 0).long()[:, None]).squeeze(-1)
    return torch.where(keep, ce, torch.zeros_like(ce)), logq


def ce_and_sparse_kd(
    student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, cfg: KDConfig,
    *, tail_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE [N], KD [N]) sharing one float32 log-softmax over the vocabulary when T = 1.

    The [N, V] float32 log-softmax is the largest tensor of a training step after the logits;
    computing it once instead of twice is what keeps cache KD's memory near plain CE's.
    Positions labelled IGNORE_INDEX get 0 in both.
    """
    ce, logq = _ce(student_logits, labels)
    if cfg.kind == "none":
        return ce, torch.zeros_like(ce)
    shared = logq if cfg.temperature == 1.0 else None  # CE is always at T = 1
    kd = sparse_kd(student_logits, topk_ids, topk_logprobs, cfg, student_logprobs=shared, tail_logprob=tail_logprob)
    return ce, torch.where(labels != IGNORE_INDEX, kd, torch.zeros_like(kd))


def ce_and_dense_kd(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, cfg: KDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE [N], KD [N]) of online KD: the teacher's full [N, V] logits are the target."""
    ce, logq = _ce(student_logits, labels)
    if cfg.kind == "none":
        return ce, torch.zeros_like(ce)
    shared = logq if cfg.temperature == 1.0 else None
    kd = dense_kd(student_logits, teacher_logits, cfg, student_logprobs=shared)
    return ce, torch.where(labels != IGNORE_INDEX, kd, torch.zeros_like(kd))


def _shift(logits: torch.Tensor, labels: torch.Tensor, targets: list[torch.Tensor | None], shift: bool) -> tuple:
    """Flatten to positions: logits [N, V], labels [N] and targets [N, ...]. With `shift`, logits
    and labels are aligned with the input (Hugging Face's convention: position t's logits
    predict labels[t + 1]) and the cache's targets are already per predicted position."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    N = labels.numel()
    return (logits.reshape(N, logits.shape[-1]), labels.reshape(N), *[None if t is None else t.reshape(N, *t.shape[-1:]) for t in targets])


def kd_loss(
    logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None = None, topk_logprobs: torch.Tensor | None = None,
    *, teacher_logits: torch.Tensor | None = None, config: KDConfig = KDConfig(), kd_weight: float = 0.2,
    reduction: str = "mean", shift: bool = True, return_parts: bool = False, tail_logprob: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE + kd_weight * D(teacher || student) over the positions whose label is not IGNORE_INDEX.

    logits [B, L, V] and labels [B, L] as a Hugging Face model sees them (`shift=True`: the
    logits at t predict labels[t+1]), or already per predicted position ([N, V], [N],
    `shift=False`). Teacher targets: a cache's top-k or sampled targets (topk_ids int and
    topk_logprobs float, [B, L-1, K] or [N, K]; padding: log-prob -inf), or a teacher's
    logits ([B, L-1, V] or [N, V]), or neither (CE only); `tail_logprob` ([B, L-1] or [N]) the
    teacher's stored tail log-mass (pack-v3 caches), if any. `reduction`: "mean" over
    positions with a label, "sum", or "none" (per position, 0 where ignored). With
    `return_parts`, also the CE and KD terms (each reduced the same way)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    flat, y, ids, lps, t_logits = _shift(logits, labels, [topk_ids, topk_logprobs, teacher_logits], shift)
    if t_logits is not None:
        ce, kd = ce_and_dense_kd(flat, y, t_logits, config)
    elif ids is not None and config.kind != "none":
        tail = None if tail_logprob is None else tail_logprob.reshape(-1)
        ce, kd = ce_and_sparse_kd(flat, y, ids.long(), lps, config, tail_logprob=tail)
    else:
        ce, kd = ce_and_sparse_kd(flat, y, None, None, KDConfig("none"))
    total = ce + kd_weight * kd
    if reduction != "none":
        denom = (y != IGNORE_INDEX).sum().clamp_min(1) if reduction == "mean" else 1
        total, ce, kd = (t.sum() / denom for t in (total, ce, kd))
    return (total, ce, kd) if return_parts else total


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, cfg: KDConfig, *,
                 topk_ids: torch.Tensor | None = None, topk_logprobs: torch.Tensor | None = None,
                 teacher_logits: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK, softcap: float | None = None,
                 checkpoint: bool = True, tail_logprob: torch.Tensor | None = None, per_token: bool = False,
                 fused: bool = False, kd_weight: float = 1.0) -> tuple[torch.Tensor, ...]:
    """CE + KD over positions in chunks: (CE sum, KD sum, per-position CE detached [N]); with
    `per_token`, also the per-position CE and KD with their gradients (CE + KD [N] each).

    hidden [N, H] (the decoder's output at the positions that predict `labels` [N]); the
    targets are sparse (topk_ids/topk_logprobs [N, K]) or dense (teacher_logits [N, V]) or
    none (CE only); `tail_logprob` [N] the teacher's stored tail (pack-v3). Each chunk's
    logits = head(hidden chunk) in float32. Two ways to get the gradients without keeping
    any chunk's logits:
      * `fused` (a `torch.nn.Linear`-like head with `weight` and `bias`): the gradients of
        CE + kd_weight * KD w.r.t. the hidden states and the head are computed chunk by chunk
        in the forward pass (`FusedHead`); the sums must then be combined with exactly
        that weight (the trainer's and `KDLoss`'s loss). Not with `per_token`.
      * otherwise, with `checkpoint`, each chunk's logits are recomputed in the backward pass.
    Both equal the unchunked loss and its gradients (tests/test_chunked_loss.py)."""
    N = hidden.shape[0]
    # (ids, log-probs, tail, teacher logits): sparse targets, or dense ones, or none.
    targets = (topk_ids, topk_logprobs, tail_logprob if topk_ids is not None else None, teacher_logits if topk_ids is None else None)
    if fused and not per_token and torch.is_grad_enabled():  # evaluation: the plain loop, no gradients
        return _fused_kd(hidden, head, labels, cfg, targets, chunk, softcap, kd_weight)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    ce_detached, ce_parts, kd_parts = [], [], []
    has = tuple(t is not None for t in targets)
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        args = [hidden[start:stop], labels[start:stop]]
        args += [t[start:stop] for t in targets if t is not None]  # checkpoint() takes tensors, not None

        def piece(h: torch.Tensor, y: torch.Tensor, *t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            it = iter(t)
            targets = tuple(next(it) if on else None for on in has)
            return _chunk_loss(head(h).float(), y, cfg, softcap, targets)

        if checkpoint and torch.is_grad_enabled():
            ce, kd = torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False)
        else:
            ce, kd = piece(*args)
        ce_sum = ce_sum + ce.sum()
        kd_sum = kd_sum + kd.sum()
        ce_detached.append(ce.detach())
        if per_token:
            ce_parts.append(ce)
            kd_parts.append(kd)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    out = (ce_sum, kd_sum, torch.cat(ce_detached) if ce_detached else empty)
    if per_token:
        out += (torch.cat(ce_parts) if ce_parts else empty, torch.cat(kd_parts) if kd_parts else empty)
    return out


def _chunk_loss(logits: torch.Tensor, y: torch.Tensor, cfg: KDConfig, softcap: float | None,
                targets: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE [n], KD [n]) of one chunk from its float32 logits: the loss both chunked paths share."""
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ids, lps, tail, t_logits = targets
    if ids is not None:
        return ce_and_sparse_kd(logits, y, ids, lps, cfg, tail_logprob=tail)
    if t_logits is not None:
        return ce_and_dense_kd(logits, y, t_logits, cfg)
    return ce_and_sparse_kd(logits, y, None, None, KDConfig("none"))


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` computes the head in here: autocast's where it is on for the
    weight's device (bf16 students), else the weight's own."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class FusedHead(torch.autograd.Function):
    """sum over chunks of `fn(logits, start, stop)` (a differentiable scalar of one chunk's
    float32 logits = hidden[start:stop] @ weight.T + bias), with its gradients w.r.t. the
    hidden states, the head's weight and its bias computed chunk by chunk in the forward
    pass: the idea of Liger-Kernel's fused linear cross-entropy, for any loss on the logits.
    Each chunk's logits exist only while that chunk is processed, and the backward pass only
    scales the stored gradients: three matmuls with the head per chunk, not the four of a
    checkpoint that recomputes the logits. The head's matmuls run in autocast's dtype where
    autocast is on (as `head(h)` would), the weight's gradient accumulates in float32.

    `FusedHead.apply(hidden [N, H], weight [V, H], bias [V] or None, fn, chunk)` -> the sum
    (float32 scalar). One backward pass per forward (the stored gradients are scaled in
    place); call it with gradients enabled (for evaluation, run the chunks without it)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk):  # noqa: ANN001
        N = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need = need_h or need_w or (bias is not None and need_b)
        mdt = _matmul_dtype(weight)
        # Detached: the graph built per chunk below ends at the logits (this function is the
        # autograd node for the weight and the hidden states).
        w = weight.detach().to(mdt)
        b = None if bias is None else bias.detach().to(mdt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            h = hidden[start:stop].detach().to(mdt)
            with torch.enable_grad():
                logits = torch.nn.functional.linear(h, w, b).float().requires_grad_(need)
                value = fn(logits, start, stop)
                g = torch.autograd.grad(value, logits)[0] if need and value.requires_grad else None
            total += value.detach()
            if g is not None:
                g = g.to(mdt)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).to(hidden.dtype)
                if grad_w is not None:  # in place: no second vocabulary x hidden temporary
                    if mdt == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w.add_(g.t() @ h)
                if grad_b is not None:
                    grad_b += g.float().sum(0)
            elif grad_h is not None:
                grad_h[start:stop] = 0
            del logits, g
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, g_total):  # noqa: ANN001
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # In place: a second copy of the head's gradient (vocabulary x hidden, float32) is the
        # memory this exists to save.
        out_h = None if grad_h is None else grad_h.mul_(g_total.to(grad_h.dtype))
        out_w = None if grad_w is None else grad_w.mul_(g_total).to(ctx.dtypes[0])
        out_b = None if grad_b is None else grad_b.mul_(g_total).to(ctx.dtypes[1])
        return out_h, out_w, out_b, None, None


class _SplitSums(torch.autograd.Function):
    """(CE sum, KD sum) whose gradients flow into `total` = CE + kd_weight * KD, for callers
    that combine the two sums themselves (the trainer's objectives). The combination must be
    a multiple of CE + kd_weight * KD: any other would need another gradient, so the
    backward pass refuses it rather than return a wrong one."""

    @staticmethod
    def forward(ctx, total, ce_sum, kd_sum, kd_weight, kd_active):  # noqa: ANN001
        ctx.kd_weight, ctx.kd_active = kd_weight, kd_active
        return ce_sum.clone(), kd_sum.clone()

    @staticmethod
    def backward(ctx, g_ce, g_kd):  # noqa: ANN001
        want = float(g_ce) * ctx.kd_weight
        if ctx.kd_active and abs(float(g_kd) - want) > 1e-6 * max(abs(want), abs(float(g_kd)), 1e-30):
            raise RuntimeError(f"the fused head loss was set up for CE + {ctx.kd_weight} * KD; its CE and KD sums were "
                               f"combined with other weights (gradients {float(g_ce)} and {float(g_kd)}). Combine them as "
                               "CE + kd_weight * KD, or use the recomputing path (fused=False, --loss-impl recompute)")
        return g_ce, None, None, None, None


def _fused_kd(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, cfg: KDConfig, targets: tuple,
              chunk: int, softcap: float | None, kd_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked_loss's fused path: (CE sum, KD sum, per-position CE detached)."""
    N = hidden.shape[0]
    sums = hidden.new_zeros(2, dtype=torch.float32)
    ce_tok = hidden.new_zeros(N, dtype=torch.float32)

    def fn(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        ce, kd = _chunk_loss(logits, labels[start:stop], cfg, softcap, tuple(None if t is None else t[start:stop] for t in targets))
        sums[0] += ce.detach().sum()
        sums[1] += kd.detach().sum()
        ce_tok[start:stop] = ce.detach()
        return ce.sum() + kd_weight * kd.sum()

    total = FusedHead.apply(hidden, head.weight, getattr(head, "bias", None), fn, chunk)
    kd_active = targets[0] is not None or targets[3] is not None
    ce_sum, kd_sum = _SplitSums.apply(total, sums[0], sums[1], kd_weight, kd_active)
    return ce_sum, kd_sum, ce_tok


class KDLoss(torch.nn.Module):
    """The distillation loss as a module: `KDLoss("fkl", kd_weight=0.2)(logits, labels,
    topk_ids, topk_logprobs)`; see `kd_loss` for the shapes. Every divergence (KINDS), both
    tail rules, temperature, ignore index -100, reduction mean/sum/none; `forward_hidden`
    is the chunked path (from hidden states and the output head: no [tokens, vocabulary]
    tensor, equal loss and gradients)."""

    def __init__(self, kind: str = "fkl", *, kd_weight: float = 0.2, temperature: float = 1.0, tail: str = "bucket",
                 skew_alpha: float = 0.1, jsd_beta: float = 0.5, akl_mu: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        self.config = KDConfig(kind, temperature, tail, skew_alpha, jsd_beta, akl_mu)
        self.kd_weight, self.reduction = kd_weight, reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_logprobs: torch.Tensor | None = None, *, teacher_logits: torch.Tensor | None = None, shift: bool = True,
                tail_logprob: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(logits, labels, topk_ids, topk_logprobs, teacher_logits=teacher_logits, config=self.config,
                       kd_weight=self.kd_weight, reduction=self.reduction, shift=shift, tail_logprob=tail_logprob)

    def forward_hidden(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, topk_ids: torch.Tensor | None = None,
                       topk_logprobs: torch.Tensor | None = None, *, chunk: int = 1024, tail_logprob: torch.Tensor | None = None,
                       fused: bool = True) -> torch.Tensor:
        """The same loss from the decoder's last hidden states [B, L, H] and the output head,
        `chunk` positions at a time, with the module's reduction (none: per predicted position
        [B*(L-1)], 0 where the label is IGNORE_INDEX, as `forward` returns). With `fused` (mean
        and sum reductions, a head with a `weight`), the head's and the hidden states'
        gradients are computed in the forward pass (`chunked_loss`): backpropagate the
        returned loss, or a multiple of it, and nothing else."""
        h, y, ids, lps = _shift(hidden, labels, [topk_ids, topk_logprobs], True)
        tail = None if tail_logprob is None else tail_logprob.reshape(-1)
        fused = fused and self.reduction != "none" and isinstance(getattr(head, "weight", None), torch.Tensor)
        ce, kd, _, *parts = chunked_loss(h, head, y, self.config, topk_ids=None if ids is None else ids.long(), topk_logprobs=lps,
                                         chunk=chunk, tail_logprob=tail, per_token=not fused, fused=fused, kd_weight=self.kd_weight)
        if self.reduction == "none":
            return parts[0] + self.kd_weight * parts[1]
        total = ce + self.kd_weight * kd
        return total / (y != IGNORE_INDEX).sum().clamp_min(1) if self.reduction == "mean" else total
