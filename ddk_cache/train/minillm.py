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
cache's log p of each sampled token (`target_logprob`: exact with `--encoding plain`).

`distill --kd-loss minillm` calls this loss (student.py) with `old_logprob` = log r from the
cache, or, for samples without recorded log-probs, log q_old from a frozen copy of the
starting student; the paper's pre-training LM term is distill's `--pretrain-cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    sampled token `teacher_logprob` [B, T]; `old_logprob` [B, T] log r of each sampled token
    under the distribution that drew it. Returns the mean over masked positions (and, with `return_parts`, the per-position
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


def chunked_minillm(hidden: torch.Tensor, head: Any, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, cfg: MiniLLMConfig, *, chunk: int,
                    softcap: float | None = None, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`minillm_loss` from the decoder's output without a [tokens, vocabulary] tensor: hidden
    [B, T, H] at the positions predicting `labels` [B, T] (ignore_index: not a response token);
    the other arguments as in `minillm_loss`. Returns (CE sum, objective sum, per-position CE
    [B*T]; both sums over response positions, the CE detached: it is logged, not trained).

    Only response positions are computed, `chunk` at a time. The returns R_t need every later
    reward, and a reward needs log q_θ of its token, so a first pass without gradient computes
    log q_θ(y_t) chunk by chunk; the second computes each chunk's terms with gradient,
    recomputing its logits in backward (activation checkpointing). Equal to `minillm_loss`
    in value and gradient (tests/test_minillm.py); the cost is one more head forward."""
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
        reward = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        reward[where] = teacher_logprob.reshape(-1)[where].float() - logq_y
        R = returns(reward.view(B, T), mask.float(), include_current=not cfg.single_step, length_norm=cfg.length_norm).reshape(-1)[where]
    old = old_logprob.reshape(-1)[where].float()
    ids, lps = topk_ids.reshape(B * T, -1)[where].long(), topk_logprobs.reshape(B * T, -1)[where]

    def piece(x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, old: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> torch.Tensor:
        logits = logits_of(x)
        lq = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
        ratio = torch.exp(lq - old)
        clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
        term = -torch.minimum(ratio * R, clipped * R)
        if cfg.single_step:
            term = term + clipped.detach() * sparse_kd(logits, ids, lps, KDConfig("rkl"))
        return term.sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, len(where), chunk):
        args = (h[a: a + chunk], y[a: a + chunk], R[a: a + chunk], old[a: a + chunk], ids[a: a + chunk], lps[a: a + chunk])
        total = total + (torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False) if torch.is_grad_enabled() else piece(*args))
    ce_tok = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
    ce_tok[where] = -logq_y
    return ce_tok.sum(), total, ce_tok


__all__ = ["MiniLLMConfig", "chunked_minillm", "minillm_loss", "returns"]
