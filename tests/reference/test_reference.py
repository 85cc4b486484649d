"""Every divergence against an independent transcription of a public implementation, in float64.

Each `ref_*` function below restates, in our own words, what one public implementation
computes (the file is named), so a divergence here means our loss and theirs disagree.
Compared: values and gradients w.r.t. the student's logits, on flat rows and peaked rows
(top-1 up to 1 - 1e-9). Where an implementation makes a different documented choice
(torchtune's "forward KL" is the cross-entropy against the teacher; DistillKit floors its
tail at 1e-8 and treats temperature differently), the test says how the two relate.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddk_cache.train.losses import KDConfig, dense_kd, sparse_kd
from ddk_cache.train.minillm import MiniLLMConfig, minillm_loss

V = 64


def rows(kind: str, n: int = 12, seed: int = 0) -> torch.Tensor:
    """float64 logits [n, V]: flat (N(0, 1.5)), or peaked (one logit 10-25 above the rest)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    if kind == "peaked":
        z[torch.arange(n), torch.randint(0, V, (n,), generator=g)] += torch.linspace(10, 25, n, dtype=torch.float64)
    return z


def grad_of(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_(True)
    value = fn(z)
    value.sum().backward()
    return value.detach(), z.grad


def assert_same(ours, theirs, z: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    v1, g1 = grad_of(ours, z)
    v2, g2 = grad_of(theirs, z)
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1, g2, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- TRL (GKD)


def ref_trl_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0):
    """huggingface/trl, trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss
    (reduction 'none', summed over the vocabulary): log-softmax both at T; the mixture
    log m = logsumexp(log q + log(1 - beta), log p + log beta); beta * KL(p || m) +
    (1 - beta) * KL(q || m), each written as F.kl_div(log m, target, log_target=True)."""
    lq = torch.log_softmax(student_logits / temperature, -1)
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), 0)
    kl_teacher = (lp.exp() * (lp - lm)).sum(-1)  # kl_div(input=lm, target=lp, log_target=True)
    kl_student = (lq.exp() * (lq - lm)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("kind", ["flat", "peaked"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_equals_trl_generalized_jsd(kind, beta):
    t, s = rows(kind, seed=1), rows("flat", seed=2)
    cfg = KDConfig("jsd", jsd_beta=beta)
    assert_same(lambda z: dense_kd(z, t, cfg), lambda z: ref_trl_generalized_jsd(z, t, beta), s)
    # From a cache holding every id (k = V): the sparse loss is the dense one.
    lp = torch.log_softmax(t, -1)
    ids = lp.argsort(-1, descending=True)
    assert_same(lambda z: sparse_kd(z, ids, lp.gather(-1, ids), cfg), lambda z: ref_trl_generalized_jsd(z, t, beta), s)


# ---------------------------------------------------------------------------- torchtune


def ref_torchtune_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """pytorch/torchtune, torchtune/modules/loss/kd_losses.py, ForwardKLLoss per token:
    -sum_v softmax(teacher) * log_softmax(student) (infinite student logits masked to 0).
    This is the cross-entropy against the teacher, not the KL: it omits the teacher's entropy."""
    prod = torch.softmax(teacher_logits, -1) * torch.log_softmax(student_logits, -1)
    return -prod.masked_fill(torch.isinf(student_logits), 0).sum(-1)


def ref_torchtune_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """torchtune's ReverseKLLoss per token: -sum_v q (log p - log q), infinite logits masked."""
    q, lq, lp = torch.softmax(student_logits, -1), torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    inf = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    return -((q * lp).masked_fill(inf, 0) - (q * lq).masked_fill(inf, 0)).sum(-1)


@pytest.mark.parametrize("kind", ["flat", "peaked"])
def test_fkl_is_torchtunes_forward_kl_plus_the_teacher_entropy(kind):
    t, s = rows(kind, seed=3), rows("flat", seed=4)
    lp = torch.log_softmax(t, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    # Values differ by the teacher's entropy (a constant of the student): gradients are equal.
    assert_same(lambda z: dense_kd(z, t, KDConfig("fkl")), lambda z: ref_torchtune_forward_kl(z, t) - entropy, s)


@pytest.mark.parametrize("kind", ["flat", "peaked"])
def test_rkl_equals_torchtunes_reverse_kl(kind):
    t, s = rows(kind, seed=5), rows("flat", seed=6)
    assert_same(lambda z: dense_kd(z, t, KDConfig("rkl")), lambda z: ref_torchtune_reverse_kl(z, t), s)


# ---------------------------------------------------------------------------- DistillKit


def ref_distillkit_sparse_kl(student_logits: torch.Tensor, ids: torch.Tensor, target_logprobs: torch.Tensor, eps: float = 1e-8):
    """arcee-ai/DistillKit, distillkit/lossfuncs/kl.py, sparse_kl_div_inner with
    MissingProbabilityHandling.SYMMETRIC_UNIFORM at temperature 1 (common.py returns the
    log-probs as given): sum over the kept ids of p (log p - log q), plus the missing mass
    as one category on both sides, t_p log(t_p / t_q), each t = 1 - sum kept, clamped to
    [eps, 1 - eps] inside log1p."""
    lq_all = torch.log_softmax(student_logits, -1)
    lq = lq_all.gather(-1, ids)
    p = target_logprobs.exp()
    inner = (p * (target_logprobs - lq)).sum(-1)
    log_tp = torch.log1p(-p.sum(-1).clamp(eps, 1 - eps))
    log_tq = torch.log1p(-lq.exp().sum(-1).clamp(eps, 1 - eps))
    return inner + log_tp.exp() * (log_tp - log_tq)


def ref_distillkit_sparse_jsd(student_logits: torch.Tensor, ids: torch.Tensor, target_logprobs: torch.Tensor, eps: float = 1e-8):
    """DistillKit, distillkit/lossfuncs/jsd.py, sparse_jsd_inner with SYMMETRIC_UNIFORM at
    T = 1: M = (P + Q) / 2 over the kept ids and over the missing mass (both clamped at eps
    before the log), 0.5 KL(P || M) + 0.5 KL(Q || M) (terms of probability <= eps dropped)."""
    lq = torch.log_softmax(student_logits, -1).gather(-1, ids)
    p, q = target_logprobs.exp(), lq.exp()
    log_m = torch.log((0.5 * (p + q)).clamp(min=eps))
    kl_pm = torch.where(p > eps, p * (target_logprobs - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > eps, q * (lq - log_m), torch.zeros_like(q)).sum(-1)
    log_tp = torch.log1p(-p.sum(-1).clamp(eps, 1 - eps))
    log_tq = torch.log1p(-q.sum(-1).clamp(eps, 1 - eps))
    tp, tq = log_tp.exp(), log_tq.exp()
    log_tm = torch.log((0.5 * (tp + tq)).clamp(min=eps))
    kl_pm = kl_pm + torch.where(tp > eps, tp * (log_tp - log_tm), torch.zeros_like(tp))
    kl_qm = kl_qm + torch.where(tq > eps, tq * (log_tq - log_tm), torch.zeros_like(tq))
    return 0.5 * (kl_pm + kl_qm)


def topk(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(t, -1)
    values, ids = lp.topk(k, -1)
    return ids, values


@pytest.mark.parametrize("k", [8, 32])
def test_sparse_fkl_equals_distillkits_symmetric_uniform_kl(k):
    """On rows whose tails are above DistillKit's 1e-8 clamp the two are the same loss; below
    it DistillKit floors the tail, this project does not (test_no_floor_on_peaked_tails)."""
    t, s = rows("flat", seed=7), rows("flat", seed=8)
    ids, lps = topk(t, k)
    assert_same(lambda z: sparse_kd(z, ids, lps, KDConfig("fkl")), lambda z: ref_distillkit_sparse_kl(z, ids, lps), s)


def test_sparse_jsd_equals_distillkits_sparse_jsd():
    t, s = rows("flat", seed=9), rows("flat", seed=10)
    ids, lps = topk(t, 16)
    assert_same(lambda z: sparse_kd(z, ids, lps, KDConfig("jsd", jsd_beta=0.5)), lambda z: ref_distillkit_sparse_jsd(z, ids, lps), s)


def test_no_floor_on_peaked_tails():
    """DistillKit and this project's old loss floor the tail (1e-8, 1e-7); the exact tail of a
    peaked row is far below: reverse KL then differs by several nats. Ours equals the dense
    loss over (top-k, the exact tail) computed in float64."""
    t = rows("peaked", seed=11)
    s = rows("flat", seed=12)
    ids, lps = topk(t, 8)
    lp_full = torch.log_softmax(t, -1)
    tail = torch.logsumexp(lp_full.scatter(-1, ids, float("-inf")), -1)
    assert tail.min() < math.log(1e-9)  # far below the 1e-7 the old loss floored tails at

    def exact(z: torch.Tensor) -> torch.Tensor:
        lq = torch.log_softmax(z, -1)
        lq_tail = torch.logsumexp(lq.scatter(-1, ids, float("-inf")), -1)
        P = torch.cat([lps, tail[:, None]], -1)
        Q = torch.cat([lq.gather(-1, ids), lq_tail[:, None]], -1)
        return (Q.exp() * (Q - P)).sum(-1)

    assert_same(lambda z: sparse_kd(z, ids, lps, KDConfig("rkl"), tail_logprob=tail), exact, s, rtol=1e-9)
    # Without the stored tail, 1 - sum(kept) in float64 still resolves these tails.
    assert_same(lambda z: sparse_kd(z, ids, lps, KDConfig("rkl")), exact, s, rtol=1e-6)
    # In float32 (training's arithmetic) the loss is within 1e-6 relative of the float64 one.
    v32 = sparse_kd(s.float(), ids, lps.float(), KDConfig("rkl"), tail_logprob=tail.float()).double()
    torch.testing.assert_close(v32, exact(s), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- AKL (the authors)


def ref_akl_authors(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """wutaiqiang/LLM_KD_AKL, AKL.py (arXiv 2404.02657), per token: sort the teacher's
    probabilities descending; cumulative sum c_i including token i; head = tokens with
    c_i <= mu, and always the top-1 (`mask = cum_sum > mu; mask[..., 0] = False`);
    g_head / g_tail = sum |p - q| over head / tail with q detached; loss = g_h / (g_h + g_t)
    KL(p || q) + g_t / (g_h + g_t) KL(q || p) (`get_kl` with the two distributions swapped)."""
    p = torch.softmax(teacher_logits, -1)
    q = torch.softmax(student_logits, -1)
    sorted_p, idx = p.sort(-1, descending=True)
    errors = (sorted_p - q.detach().gather(-1, idx)).abs()
    tail = sorted_p.cumsum(-1) > mu
    tail[..., 0] = False
    s_head = errors.masked_fill(tail, 0).sum(-1)
    s_tail = errors.masked_fill(~tail, 0).sum(-1)
    lp, lq = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
    kl_pq = ((p * lp).sum(-1) - (p * lq).sum(-1))
    kl_qp = ((q * lq).sum(-1) - (q * lp).sum(-1))
    return s_head / (s_head + s_tail) * kl_pq + s_tail / (s_head + s_tail) * kl_qp


@pytest.mark.parametrize("kind", ["flat", "peaked"])
@pytest.mark.parametrize("mu", [0.3, 0.5, 0.9])
def test_akl_equals_the_authors_code(kind, mu):
    t, s = rows(kind, seed=13), rows("flat", seed=14)
    assert_same(lambda z: dense_kd(z, t, KDConfig("akl", akl_mu=mu)), lambda z: ref_akl_authors(z, t, mu), s)


def test_akl_head_and_tail_token_for_token():
    """A row built so the token that crosses mu is known: the authors put it in the tail."""
    p = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]], dtype=torch.float64)
    t = p.log()
    s = torch.zeros_like(t)  # uniform student
    ours = dense_kd(s, t, KDConfig("akl", akl_mu=0.5))
    torch.testing.assert_close(ours, ref_akl_authors(s, t, 0.5))
    # head = {0.3} (0.55 crosses 0.5): g_h = |0.3 - 0.2|, g_t = the rest.
    q = torch.full_like(p, 0.2)
    g_h, g_t = 0.1, float((p - q).abs().sum() - 0.1)
    kl_pq, kl_qp = float((p * (p / q).log()).sum()), float((q * (q / p).log()).sum())
    assert math.isclose(float(ours), (g_h * kl_pq + g_t * kl_qp) / (g_h + g_t), rel_tol=1e-12)


# ---------------------------------------------------------------------------- MiniLLM (LMOps)


def ref_lmops_minillm(logits, teacher_logits, tokens, old_logprobs, mask, *, gamma=0.95, reward_scaling=0.5, clip_reward=100.0,
                      cliprange=0.2):
    """microsoft/LMOps, minillm/minillm/sampler.py and losses.py (Loss.ppo_loss), with
    --length-norm --single-step-reg and no teacher mixing (w = 1), responses without padding:

    rewards  = (log p(y_t) - log q_old(y_t)) / reward_scaling, clipped to +-clip_reward
               (sampler: t_rewards + ent_rewards, ent_rewards = -logprobs at sampling)
    returns  = sum_{t' >= t} gamma^(t'-t) rewards_t' (reversed accumulation, current token
               included), divided by the tokens left (lens), whitened (torch.var_mean over
               the batch), detached
    pg_loss  = sum max(-A rho, -A clip(rho, 1 +- cliprange)) mask / sum mask, rho = exp(log q - log q_old)
    reg_loss = mean over mask of sum_v q (log q - log p) (get_x_entropy - get_entropy)
    loss     = pg_loss + reg_loss"""
    lq_all = torch.log_softmax(logits, -1)
    lp_all = torch.log_softmax(teacher_logits, -1)
    lq = lq_all.gather(-1, tokens[..., None])[..., 0]
    lp = lp_all.gather(-1, tokens[..., None])[..., 0]
    rewards = ((lp - old_logprobs) / reward_scaling).clamp(-clip_reward, clip_reward)
    m = mask.double()
    lens = m - m.cumsum(-1) + m.cumsum(-1)[:, -1:]
    lens = lens.masked_fill(lens == 0, 1)
    acc, out = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        acc = rewards[:, t] + gamma * acc
        out.append(acc)
    adv = torch.stack(out[::-1], 1) / lens
    var, mean = torch.var_mean(adv)
    adv = ((adv - mean) * torch.rsqrt(var + 1e-8)).detach()
    ratio = torch.exp((lq - old_logprobs) * m)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (pg * m).sum() / m.sum()
    q = lq_all.exp()
    reg = (q * (lq_all - lp_all)).sum(-1)
    return pg_loss + (reg * m).sum() / m.sum()


def test_minillm_lmops_variant_equals_lmops_loss():
    g = torch.Generator().manual_seed(15)
    B, T = 3, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.ones(B, T)
    lp = torch.log_softmax(teacher, -1)
    ids = lp.argsort(-1, descending=True)  # k = V: the single-step term is exact
    cfg = MiniLLMConfig(variant="lmops")

    def ours(z):
        return minillm_loss(z, tokens, mask, ids, lp.gather(-1, ids), lp.gather(-1, tokens[..., None])[..., 0], old, cfg)

    def theirs(z):
        return ref_lmops_minillm(z, teacher, tokens, old, mask)

    v1, g1 = grad_of(ours, logits)
    v2, g2 = grad_of(theirs, logits)
    torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    # The paper's variant is a different loss on the same inputs (the documented choices).
    assert not torch.isclose(grad_of(lambda z: minillm_loss(z, tokens, mask, ids, lp.gather(-1, ids),
                                                            lp.gather(-1, tokens[..., None])[..., 0], old), logits)[0], v1)
