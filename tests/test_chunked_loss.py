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
def test_sparse_targets(kind, tail, temperature):
    cfg = KDConfig(kind, temperature=temperature, tail=tail)
    hidden, head, labels, ids, lp, _ = setup()
    ce, kd = ce_and_sparse_kd(head(hidden), labels, ids, lp, cfg)
    (ce.sum() + 0.3 * kd.sum()).backward()
    ref = grads(hidden, head.weight)
    hidden.grad = head.weight.grad = None
    c_ce, c_kd, per = chunked_loss(hidden, head, labels, cfg, topk_ids=ids, topk_logprobs=lp, chunk=8)
    (c_ce + 0.3 * c_kd).backward()
    torch.testing.assert_close(c_ce, ce.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_kd, kd.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per, ce.detach())
    for a, b in zip(grads(hidden, head.weight), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (per[labels == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "none"])
def test_dense_targets(kind):
    cfg = KDConfig(kind)
    hidden, head, labels, _, _, t_logits = setup(seed=1)
    ce, kd = ce_and_dense_kd(head(hidden), labels, t_logits, cfg)
    (ce.sum() + kd.sum()).backward()
    ref = grads(hidden, head.weight)
    hidden.grad = head.weight.grad = None
    c_ce, c_kd, _ = chunked_loss(hidden, head, labels, cfg, teacher_logits=t_logits, chunk=10)
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
