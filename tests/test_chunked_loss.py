"""The chunked loss (student.py) equals the plain loss on whole-batch logits, with gradients,
for every divergence, target kind and tail rule; evaluation too."""

from __future__ import annotations

import pytest
import torch

from ddk_cache.train.losses import IGNORE_INDEX, KINDS, KDConfig, ce_and_dense_kd, ce_and_sparse_kd
from ddk_cache.train.losses import chunked_loss


def setup(N=37, H=16, V=50, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX  # positions without loss (prompt tokens, padding)
    t_logits = torch.randn(N, V, generator=g) * 2
    lp, ids = torch.log_softmax(t_logits, -1).topk(K, -1)
    lp[::4, K // 2 :] = float("-inf")  # adaptive rows: padding
    return hidden, head, labels, ids, lp, t_logits


def grads(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fused", [False, True])
def test_sparse_targets(kind, tail, temperature, fused):
    cfg = KDConfig(kind, temperature=temperature, tail=tail)
    hidden, head, labels, ids, lp, _ = setup()
    ce, kd = ce_and_sparse_kd(head(hidden), labels, ids, lp, cfg)
    (ce.sum() + 0.3 * kd.sum()).backward()
    ref = grads(hidden, head.weight)
    hidden.grad = head.weight.grad = None
    c_ce, c_kd, per = chunked_loss(hidden, head, labels, cfg, topk_ids=ids, topk_logprobs=lp, chunk=8, fused=fused, kd_weight=0.3)
    (c_ce + 0.3 * c_kd).backward()
    torch.testing.assert_close(c_ce, ce.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_kd, kd.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per, ce.detach())
    for a, b in zip(grads(hidden, head.weight), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (per[labels == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
@pytest.mark.parametrize("fused", [False, True])
def test_dense_targets(kind, fused):
    cfg = KDConfig(kind)
    hidden, head, labels, _, _, t_logits = setup(seed=1)
    ce, kd = ce_and_dense_kd(head(hidden), labels, t_logits, cfg)
    (ce.sum() + kd.sum()).backward()
    ref = grads(hidden, head.weight)
    hidden.grad = head.weight.grad = None
    c_ce, c_kd, _ = chunked_loss(hidden, head, labels, cfg, teacher_logits=t_logits, chunk=10, fused=fused)
    (c_ce + c_kd).backward()
    torch.testing.assert_close(c_ce + c_kd, (ce.sum() + kd.sum()), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(hidden, head.weight), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampled_targets_and_ce_only():
    hidden, head, labels, ids, lp, _ = setup(seed=2)
    w = torch.softmax(torch.randn(ids.shape), -1).log()  # sampled targets: weights summing to 1
    cfg = KDConfig("fkl")
    ce, kd = ce_and_sparse_kd(head(hidden), labels, ids, w, cfg)
    c_ce, c_kd, _ = chunked_loss(hidden, head, labels, cfg, topk_ids=ids, topk_logprobs=w, chunk=7)
    torch.testing.assert_close(c_kd, kd.sum(), rtol=1e-5, atol=1e-5)
    c_ce2, c_kd2, _ = chunked_loss(hidden, head, labels, KDConfig("none"), chunk=5)
    torch.testing.assert_close(c_ce2, ce.sum(), rtol=1e-5, atol=1e-5)
    assert c_kd2.item() == 0


def test_the_student_wrapper_equals_the_model_logits(teacher_dir):
    """StudentLoss (decoder + head, chunked) gives the loss of the model's own logits."""
    from transformers import AutoModelForCausalLM

    from ddk_cache.train.student import StudentLoss

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    x = torch.randint(0, 300, (3, 20))
    labels = x[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX
    logits = model(input_ids=x).logits[:, :-1].reshape(-1, model.config.vocab_size)
    ce, _ = ce_and_sparse_kd(logits, labels.reshape(-1), None, None, KDConfig("none"))
    wrapped = StudentLoss(model, KDConfig("none"), chunk=16)
    c_ce, _, per = wrapped(x, labels)
    torch.testing.assert_close(c_ce, ce.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(per, ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_with_bias_tied_weight_and_stored_tail(kind, tied):
    """The fused head loss (gradients computed in the forward pass) equals the whole-batch
    loss in float32 to 1e-5: hidden, weight and bias gradients, a head tied to an embedding
    (its gradient adds to the embedding's), a stored tail, ignored labels, chunks that do not
    divide N."""
    g = torch.Generator().manual_seed(3)
    N, H, V, K = 45, 12, 40, 7
    head = torch.nn.Linear(H, V, bias=True)
    embed = torch.nn.Embedding(V, H)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.4)
        head.bias.copy_(torch.randn(V, generator=g) * 0.1)
    if tied:
        embed.weight = head.weight
    x = torch.randint(0, V, (N,), generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::6] = IGNORE_INDEX
    full = torch.log_softmax(torch.randn(N, V, generator=g) * 3, -1)
    lp, ids = full.topk(K, -1)
    tail = torch.logsumexp(full.scatter(-1, ids, float("-inf")), -1)
    cfg = KDConfig(kind)

    def run(loss_fn):
        for p in (head.weight, head.bias, embed.weight):
            p.grad = None
        hidden = embed(x) * 1.5  # the embedding is in the graph: a tied weight gets both gradients
        ce, kd = loss_fn(hidden)
        (ce + 0.7 * kd).div(17.0).backward()
        return ce.detach(), kd.detach(), head.weight.grad.clone(), head.bias.grad.clone(), embed.weight.grad.clone()

    want = run(lambda h: tuple(t.sum() for t in ce_and_sparse_kd(head(h), labels, ids, lp, cfg, tail_logprob=tail)))
    got = run(lambda h: chunked_loss(h, head, labels, cfg, topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, chunk=8,
                                     fused=True, kd_weight=0.7)[:2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_head_refuses_sums_combined_with_another_weight():
    """Its stored gradient is that of CE + kd_weight * KD: any other combination would get a
    wrong gradient silently, so the backward pass refuses it."""
    hidden, head, labels, ids, lp, _ = setup(seed=4)
    ce, kd, _ = chunked_loss(hidden, head, labels, KDConfig("fkl"), topk_ids=ids, topk_logprobs=lp, chunk=8, fused=True, kd_weight=0.2)
    with pytest.raises(RuntimeError, match=r"CE \+ 0.2 \* KD"):
        (ce + 0.5 * kd).backward()
    ce, kd, _ = chunked_loss(hidden, head, labels, KDConfig("fkl"), topk_ids=ids, topk_logprobs=lp, chunk=8, fused=True, kd_weight=0.2)
    (3.0 * (ce + 0.2 * kd)).backward()  # a multiple of the sum is what the trainer's 1/tokens is


def test_fused_head_under_bf16_autocast_matches_recompute():
    """Under autocast (bf16 students on GPU; CPU autocast here) the fused head computes its
    matmuls in bf16 like the recomputing path's autograd does: equal to bf16 rounding."""
    hidden, head, labels, ids, lp, _ = setup(N=64, H=32, V=96, seed=5)
    out = []
    for fused in (False, True):
        hidden.grad = head.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, kd, _ = chunked_loss(hidden, head, labels, KDConfig("rkl"), topk_ids=ids, topk_logprobs=lp, chunk=16,
                                     fused=fused, kd_weight=0.5)
        (ce + 0.5 * kd).backward()
        assert head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
        out.append((ce.detach(), kd.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_fused_head_in_evaluation_computes_no_gradients():
    hidden, head, labels, ids, lp, _ = setup(seed=6)
    with torch.no_grad():
        ce, kd, per = chunked_loss(hidden, head, labels, KDConfig("jsd"), topk_ids=ids, topk_logprobs=lp, chunk=8, fused=True)
    ref_ce, ref_kd = ce_and_sparse_kd(head(hidden), labels, ids, lp, KDConfig("jsd"))
    torch.testing.assert_close(ce, ref_ce.sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, ref_kd.sum().detach(), rtol=1e-5, atol=1e-5)
    assert not ce.requires_grad
