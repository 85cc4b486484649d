"""MiniLLM's sequence-level reverse KL (arXiv 2306.08543) on cached teacher targets.

MiniLLM minimises KL(q_θ ‖ p) over the student's own samples y ~ q_old(·|x) of a prompt x,
by policy gradient. For one sampled response y_1..y_T (positions with mask 1; the teacher's
scores come from a cache built over the samples, so no teacher is resident):

    r_t      = log p(y_t | y_<t) - log q_θ(y_t | y_<t)          per-token reward, detached
    R_t      = (1/N_t) Σ_{t' > t} r_t'                           long-horizon return; N_t = the
                                                                 number of terms (length
                                                                 normalisation; without it N_t = 1)
    ρ_t      = q_θ(y_t | y_<t) / q_old(y_t | y_<t)               importance weight (the samples
                                                                 were drawn by q_old)
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
cache's log p of each sampled token (`target_logprob`: exact with `--encoding plain`).

Not here (yet): teacher-mixed sampling (it needs the teacher at generation time) and the
optional pre-training LM term; distill does not call this loss yet (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import KDConfig, sparse_kd


@dataclass(frozen=True)
class MiniLLMConfig:
    clip: float = 0.2  # ε of the clipped importance weight
    length_norm: bool = True
    single_step: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1:
            raise ValueError(f"the MiniLLM clip must be in (0, 1), got {self.clip}")


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
                 return_parts: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniLLM's loss (module docstring) per predicted position, all [B, T, ...]: the student's
    `logits` [B, T, V] at the positions predicting `tokens` [B, T]; `mask` [B, T] 1 on the
    response; the cached teacher top-k `topk_ids`/`topk_logprobs` [B, T, K] and log p of each
    sampled token `teacher_logprob` [B, T]; `old_logprob` [B, T] log q_old of each sampled
    token. Returns the mean over masked positions (and, with `return_parts`, the per-position
    long-horizon and single-step terms)."""
    B, T, V = logits.shape
    m = mask.to(logits.dtype)
    logq = torch.log_softmax(logits.float(), -1)
    logq_y = logq.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    reward = (teacher_logprob.float() - logq_y).detach()
    R = returns(reward, m, include_current=not cfg.single_step, length_norm=cfg.length_norm)
    ratio = torch.exp(logq_y - old_logprob.float())
    clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
    long = -torch.minimum(ratio * R, clipped * R)
    if cfg.single_step:
        rkl = sparse_kd(logits.reshape(B * T, V), topk_ids.reshape(B * T, -1).long(), topk_logprobs.reshape(B * T, -1),
                        KDConfig("rkl")).view(B, T)
        single = clipped.detach() * rkl
    else:
        single = torch.zeros_like(long)
    loss = ((long + single) * m).sum() / m.sum().clamp_min(1)
    return (loss, long * m, single * m) if return_parts else loss


__all__ = ["MiniLLMConfig", "minillm_loss", "returns"]
