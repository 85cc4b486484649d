"""MiniLLM's sequence-level reverse KL (arXiv 2306.08543) on cached teacher targets.

MiniLLM minimises KL(q_θ ‖ p) over the student's own samples of a prompt x, by policy
gradient. The samples y were drawn from r: the round's starting student q_old, or with
teacher-mixed sampling r = α·p + (1 − α)·q_old (α = 0.2 in the paper), and `ddk-cache
generate` records log r(y_t) for each drawn token (the cache's `sample_logprob`). For one
sampled response y_1..y_T (positions with mask 1; the teacher's scores come from a cache
built over the samples, so no teacher is resident):

    r_t      = log p(y_t | y_<t) - log q_θ(y_t | y_<t)          per-token reward, detached
    R_t      = (1/N_t) Σ_{t' > t} r_t'                           long-horizon return; N_t = the
                                                                 number of terms (length
                                                                 normalisation; without it N_t = 1)
    ρ_t      = q_θ(y_t | y_<t) / r(y_t | y_<t)                   importance weight (the paper's
                                                                 single-token approximation of
                                                                 the sequence ratio)
    long_t   = -min(ρ_t R_t, clip(ρ_t, 1-ε, 1+ε) R_t)            PPO-style clipped surrogate: its
                                                                 gradient is -ρ_t R_t ∇log q_θ(y_t)
    single_t = clip(ρ_t, 1-ε, 1+ε)·Σ_v q_θ(v)(log q_θ(v) - log p(v))  the single-step term: the
                                                                 exact token-level reverse KL of
                                                                 the next-token distributions,
                                                                 over the cached top-k + a tail
                                                                 bucket (weight detached)

    loss = Σ_t mask_t (long_t + single_t) / Σ_t mask_t

With `single_step=False` (the paper's ablation) the single-step term is dropped and the
return includes the current token: R_t = (1/N_t) Σ_{t' ≥ t} r_t'. The reward uses the
cache's log p of each sampled token (`target_logprob`, stored exactly).

This is the paper's formulation (the default, `variant="paper"`). The authors' released
code (microsoft/LMOps, minillm/: `losses.py`, `sampler.py`) differs in five choices,
which `variant="lmops"` reproduces (tested equal to a transcription of its loss on fixed
inputs, tests/reference):

  1. the reward's log q is the one fixed when the sample was drawn, r_t = log p(y_t) -
     log q_old(y_t) (here: the recorded sampling log-prob), not the current q_θ;
  2. rewards are divided by a scale (0.5 in its scripts) and clipped to ±100;
  3. returns are discounted (γ = 0.95) and start at the current token even with the
     single-step term on: R_t = Σ_{t' ≥ t} γ^(t'-t) r_t', divided by the number of
     remaining tokens with length normalisation;
  4. the returns are whitened (mean 0, variance 1) before the policy-gradient term; LMOps
     whitens over its whole [batch, response length] tensor, padding included and across
     data-parallel ranks; here over one micro-batch's response tokens;
  5. the single-step term is not weighted by the importance ratio.

The paper's variant is the default: its terms are the ones the paper derives, and with
rewards that move with the student it needs no reward scale. With teacher-mixed samples
the LMOps variant takes the recorded log r (the mixture) for log q_old, as no separate
q_old is recorded.

`distill --kd-loss minillm` calls this loss (student.py) with `old_logprob` = log r from the
cache, or, for samples without recorded log-probs, log q_old from a frozen copy of the
starting student; the paper's pre-training LM term is distill's `--pretrain-cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .losses import FusedHead, KDConfig, sparse_kd


VARIANTS = ("paper", "lmops")


@dataclass(frozen=True)
class MiniLLMConfig:
    clip: float = 0.2  # ε of the clipped importance weight
    length_norm: bool = True
    single_step: bool = True
    variant: str = "paper"  # or "lmops": the released code's choices (module docstring)
    gamma: float = 0.95  # lmops: discount of the returns
    reward_scale: float = 0.5  # lmops: rewards are divided by this (its scripts' --reward-scaling)
    reward_clip: float = 100.0  # lmops: rewards are clipped to +- this (its scripts' --cliprange-reward)

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1:
            raise ValueError(f"the MiniLLM clip must be in (0, 1), got {self.clip}")
        if self.variant not in VARIANTS:
            raise ValueError(f"minillm variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0 < self.gamma <= 1 or self.reward_scale <= 0 or self.reward_clip <= 0:
            raise ValueError("minillm gamma must be in (0, 1], reward_scale and reward_clip > 0")


def lmops_advantages(teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, mask: torch.Tensor, cfg: MiniLLMConfig) -> torch.Tensor:
    """LMOps' advantages [B, T] (detached): rewards log p - log q_old, scaled and clipped;
    discounted returns from the current token, over the remaining tokens with length
    normalisation; whitened over the response tokens."""
    m = mask.double()
    r = ((teacher_logprob.double() - old_logprob.double()) / cfg.reward_scale).clamp(-cfg.reward_clip, cfg.reward_clip) * m
    T = r.shape[-1]
    # Σ_{t' >= t} γ^(t'-t) r_t' = γ^-t · Σ_{t' >= t} γ^t' r_t' (a suffix sum: no cancellation).
    g = cfg.gamma ** torch.arange(T, dtype=torch.float64, device=r.device)
    ret = (r * g).flip(-1).cumsum(-1).flip(-1) / g
    if cfg.length_norm:
        ret = ret / m.flip(-1).cumsum(-1).flip(-1).clamp_min(1)
    keep = mask.bool()
    if int(keep.sum()) > 1:
        var, mean = torch.var_mean(ret[keep])
        ret = (ret - mean) * torch.rsqrt(var + 1e-8)
    return (ret * m).to(torch.promote_types(teacher_logprob.dtype, torch.float32)).detach()


def returns(rewards: torch.Tensor, mask: torch.Tensor, *, include_current: bool, length_norm: bool) -> torch.Tensor:
    """R_t = Σ_{t' > t} (or ≥ t) mask·r over each row [B, T], divided by the number of terms
    when `length_norm` (0 where there are none)."""
    r = rewards * mask
    suffix = r.flip(-1).cumsum(-1).flip(-1)  # Σ_{t' ≥ t}
    count = mask.flip(-1).cumsum(-1).flip(-1)
    if not include_current:
        suffix, count = suffix - r, count - mask
    return suffix / count.clamp_min(1) if length_norm else suffix


def minillm_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, cfg: MiniLLMConfig = MiniLLMConfig(),
                 return_parts: bool = False, tail_logprob: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniLLM's loss (module docstring) per predicted position, all [B, T, ...]: the student's
    `logits` [B, T, V] at the positions predicting `tokens` [B, T]; `mask` [B, T] 1 on the
    response; the cached teacher top-k `topk_ids`/`topk_logprobs` [B, T, K] and log p of each
    sampled token `teacher_logprob` [B, T]; `old_logprob` [B, T] log r of each sampled token
    under the distribution that drew it. Returns the mean over masked positions (and, with `return_parts`, the per-position
    long-horizon and single-step terms)."""
    B, T, V = logits.shape
    m = mask.to(logits.dtype)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64: the reference tests
    logq = torch.log_softmax(logits.to(dt), -1)
    logq_y = logq.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if cfg.variant == "lmops":
        R = lmops_advantages(teacher_logprob, old_logprob, m, cfg)
    else:
        reward = (teacher_logprob.to(dt) - logq_y).detach()
        R = returns(reward, m, include_current=not cfg.single_step, length_norm=cfg.length_norm)
    ratio = torch.exp(logq_y - old_logprob.to(dt))
    clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
    long = -torch.minimum(ratio * R, clipped * R)
    if cfg.single_step:
        rkl = sparse_kd(logits.reshape(B * T, V), topk_ids.reshape(B * T, -1).long(), topk_logprobs.reshape(B * T, -1),
                        KDConfig("rkl"), tail_logprob=None if tail_logprob is None else tail_logprob.reshape(B * T)).view(B, T)
        single = rkl if cfg.variant == "lmops" else clipped.detach() * rkl
    else:
        single = torch.zeros_like(long)
    loss = ((long + single) * m).sum() / m.sum().clamp_min(1)
    return (loss, long * m, single * m) if return_parts else loss


def chunked_minillm(hidden: torch.Tensor, head: Any, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, cfg: MiniLLMConfig, *, chunk: int,
                    softcap: float | None = None, ignore_index: int = -100,
                    tail_logprob: torch.Tensor | None = None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`minillm_loss` from the decoder's output without a [tokens, vocabulary] tensor: hidden
    [B, T, H] at the positions predicting `labels` [B, T] (ignore_index: not a response token);
    the other arguments as in `minillm_loss`. Returns (CE sum, objective sum, per-position CE
    [B*T]; both sums over response positions, the CE detached: it is logged, not trained).

    Only response positions are computed, `chunk` at a time. The returns R_t need every later
    reward, and a reward needs log q_θ of its token, so a first pass without gradient computes
    log q_θ(y_t) chunk by chunk; the second computes each chunk's terms with gradient: with
    `fused`, the head's and hidden states' gradients in the forward pass (losses.FusedHead),
    otherwise recomputing its logits in backward (activation checkpointing). Equal to
    `minillm_loss` in value and gradient (tests/test_minillm.py); the cost is one more head
    forward (the first pass: the returns must be known before any chunk's gradient)."""
    B, T = labels.shape
    mask = labels != ignore_index
    where = mask.reshape(-1).nonzero().squeeze(-1)  # response positions, row-major
    h = hidden.reshape(B * T, -1)[where]
    y = labels.reshape(-1)[where].long()

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        z = head(x).float()
        return torch.tanh(z / softcap) * softcap if softcap else z

    with torch.no_grad():
        logq_y = torch.cat([torch.log_softmax(logits_of(h[a: a + chunk]), -1).gather(-1, y[a: a + chunk, None]).squeeze(-1)
                            for a in range(0, len(where), chunk)]) if len(where) else h.new_zeros(0, dtype=torch.float32)
        if cfg.variant == "lmops":
            R = lmops_advantages(teacher_logprob, old_logprob, mask.float(), cfg).reshape(-1)[where]
        else:
            reward = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
            reward[where] = teacher_logprob.reshape(-1)[where].float() - logq_y
            R = returns(reward.view(B, T), mask.float(), include_current=not cfg.single_step, length_norm=cfg.length_norm).reshape(-1)[where]
    old = old_logprob.reshape(-1)[where].float()
    ids, lps = topk_ids.reshape(B * T, -1)[where].long(), topk_logprobs.reshape(B * T, -1)[where]
    tails = None if tail_logprob is None else tail_logprob.reshape(-1)[where]

    def terms(logits: torch.Tensor, y: torch.Tensor, R: torch.Tensor, old: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor,
              tail: torch.Tensor | None = None) -> torch.Tensor:
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lq = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
        ratio = torch.exp(lq - old)
        clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
        term = -torch.minimum(ratio * R, clipped * R)
        if cfg.single_step:
            rkl = sparse_kd(logits, ids, lps, KDConfig("rkl"), tail_logprob=tail)
            term = term + (rkl if cfg.variant == "lmops" else clipped.detach() * rkl)
        return term.sum()

    def chunk_args(a: int, z: int) -> tuple:
        return (y[a:z], R[a:z], old[a:z], ids[a:z], lps[a:z], None if tails is None else tails[a:z])

    if fused and torch.is_grad_enabled() and isinstance(getattr(head, "weight", None), torch.Tensor):
        # The head's gradients computed in the forward pass (losses.FusedHead): no third head matmul.
        total = FusedHead.apply(h, head.weight, getattr(head, "bias", None),
                                lambda logits, a, z: terms(logits, *chunk_args(a, z)), chunk)
    else:
        piece = lambda x, *rest: terms(head(x).float(), *rest)  # noqa: E731
        total = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, len(where), chunk):
            args = (h[a: a + chunk], *chunk_args(a, a + chunk))
            total = total + (torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False) if torch.is_grad_enabled() else piece(*args))
    ce_tok = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
    ce_tok[where] = -logq_y
    return ce_tok.sum(), total, ce_tok


__all__ = ["MiniLLMConfig", "chunked_minillm", "minillm_loss", "returns"]
