"""MiniLLM's loss on cached targets equals a dense reference computed with the teacher loaded
(loops over positions, the full teacher distribution), value and gradient, for each option."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddk_cache.train.minillm import MiniLLMConfig, minillm_loss, returns

from .helpers import make_student


def reference(student_logits, teacher_logits, tokens, mask, old_logprob, cfg):
    """The module docstring's formulas, one position at a time, over full distributions."""
    B, T, V = student_logits.shape
    total, count = 0.0, 0
    for b in range(B):
        logq = torch.log_softmax(student_logits[b], -1)
        logp = torch.log_softmax(teacher_logits[b], -1)
        r = [float(logp[t, tokens[b, t]] - logq[t, tokens[b, t]]) for t in range(T)]
        for t in range(T):
            if not mask[b, t]:
                continue
            later = [r[u] for u in range(T) if mask[b, u] and (u > t or (u == t and not cfg.single_step))]
            R = (sum(later) / len(later) if later else 0.0) if cfg.length_norm else sum(later)
            rho = torch.exp(logq[t, tokens[b, t]] - old_logprob[b, t])
            clipped = rho.clamp(1 - cfg.clip, 1 + cfg.clip)
            term = -torch.minimum(rho * R, clipped * R)
            if cfg.single_step:
                q = logq[t].exp()
                term = term + clipped.detach() * (q * (logq[t] - logp[t])).sum()
            total = total + term
            count += 1
    return total / count


@pytest.mark.parametrize("cfg", [MiniLLMConfig(), MiniLLMConfig(length_norm=False), MiniLLMConfig(single_step=False),
                                 MiniLLMConfig(clip=0.05)], ids=["paper", "no-length-norm", "no-single-step", "tight-clip"])
def test_minillm_equals_the_dense_reference_with_the_teacher_loaded(tmp_path, teacher_dir, cfg):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(make_student(teacher_dir, tmp_path / "s", 32, 1), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    B, L = 3, 12
    x = torch.randint(5, 300, (B, L), generator=g)
    mask = torch.zeros(B, L - 1)
    mask[0, 4:] = 1  # the response: positions after the prompt
    mask[1, 2:9] = 1  # padding after the response
    mask[2, 6:] = 1
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits[:, :-1]
        old = student(input_ids=x).logits[:, :-1] + 0.3 * torch.randn(B, L - 1, t_logits.shape[-1], generator=g)  # q_old != q_θ
    tokens = x[:, 1:]
    old_logprob = torch.log_softmax(old, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    V = t_logits.shape[-1]
    # The cache over the samples: top-k with k = V (no tail) and log p of each sampled token.
    logp = torch.log_softmax(t_logits, -1)
    topk_logprobs, topk_ids = logp.topk(V, -1)
    teacher_logprob = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    s1 = student(input_ids=x).logits[:, :-1].detach().requires_grad_(True)
    loss = minillm_loss(s1, tokens, mask, topk_ids, topk_logprobs, teacher_logprob, old_logprob, cfg)
    loss.backward()
    s2 = s1.detach().clone().requires_grad_(True)
    ref = reference(s2, t_logits, tokens, mask, old_logprob, cfg)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    ratio = torch.exp(torch.log_softmax(s1.detach(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - old_logprob)
    assert ((ratio - 1).abs()[mask.bool()] > cfg.clip).any()  # clipping is exercised


def test_at_the_sampling_policy_the_long_horizon_gradient_is_the_policy_gradient():
    """With q_old = q_θ (ρ = 1) the long-horizon term's gradient is -R_t ∇ log q_θ(y_t)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (1, 5), generator=g)
    mask = torch.ones(1, 5)
    logq_y = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    teacher_lp = torch.log(torch.full((1, 5), 0.3))
    cfg = MiniLLMConfig(single_step=False)
    _, long, _ = minillm_loss(logits, tokens, mask, tokens.unsqueeze(-1), teacher_lp.unsqueeze(-1), teacher_lp, logq_y.detach(), cfg,
                              return_parts=True)
    long.sum().backward()
    R = returns((teacher_lp - logq_y).detach(), mask, include_current=True, length_norm=True)
    logits2 = logits.detach().clone().requires_grad_(True)
    (-(R * torch.log_softmax(logits2, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)).sum()).backward()
    torch.testing.assert_close(logits.grad, logits2.grad)


def test_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert returns(r, m, include_current=False, length_norm=False).tolist() == [[9.0, 7.0, 4.0, 0.0]]
    assert returns(r, m, include_current=False, length_norm=True).tolist() == [[3.0, 3.5, 4.0, 0.0]]
    assert returns(r, m, include_current=True, length_norm=True).tolist() == [[3.0, 3.0, 3.5, 4.0]]
    assert math.isclose(returns(r, m, include_current=True, length_norm=False)[0, 1].item(), 9.0)


def samples_cache(tmp_path, teacher_dir, student):
    """One round's data: the student's samples (generate) scored by the teacher (build)."""
    from click.testing import CliRunner

    from ddk_cache.capture.build import build
    from ddk_cache.cli.main import main

    from .helpers import CHAT_TEMPLATE, chat_records, small_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:2] if "messages" in r else [{"role": "user", "content": r["prompt"]}]})
                               + "\n" for r in chat_records(40)))
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    res = CliRunner().invoke(main, ["generate", "--model", str(student), "--prompts", str(prompts), "--out", str(tmp_path / "round" / "chat.jsonl"),
                                    "--max-new-tokens", "16", "--chat-template", str(tmp_path / "t.jinja"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "round.zarr"
    build(small_config(teacher_dir, tmp_path / "round", out, seq_len=64, val_tokens=128, chat_template=CHAT_TEMPLATE, top_k=16), progress=False)
    return out


def test_distill_minillm_first_step_equals_the_loss_on_the_same_batch(tmp_path, teacher_dir):
    """`distill --kd-loss minillm` on a round's cache: the first step's loss is minillm_loss on
    the loader's first batch with q_old = the starting student (ρ = 1 at step 1)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from ddk_cache.store.cache import Cache
    from ddk_cache.train.data import CacheLoader
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    cache_path = samples_cache(tmp_path, teacher_dir, student)
    run = tmp_path / "run"
    distill(distill_config(cache_path, student, run, max_steps=2, kd_loss="minillm", mixing="uniform"), progress=False)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logged if r["type"] == "step")
    cache = Cache(str(cache_path))
    with CacheLoader(cache, batch_size=4, weights=np.full(len(cache.domains), 1 / len(cache.domains)), seed=0) as loader:
        batch = loader.next()
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    labels = batch.labels()
    mask = labels != -100
    tokens = torch.where(mask, labels, torch.zeros_like(labels))
    with torch.no_grad():
        logits = model(input_ids=batch.tokens).logits[:, :-1]
        old = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        want = minillm_loss(logits, tokens, mask, batch.topk_ids.long(), batch.topk_logprobs, batch.target_logprob, old)
    assert first["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert math.isfinite(logged[-1]["ppl_student"][cache.domains[0]])


def test_minillm_refuses_a_text_cache(tmp_path, built_cache, teacher_dir):
    from ddk_cache.errors import ConfigError
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    with pytest.raises(ConfigError, match="--kd-loss minillm on .*: it trains on the student's own samples"):
        distill(distill_config(built_cache, student, tmp_path / "r", kd_loss="minillm"), progress=False)


@pytest.mark.slow
def test_rounds_run_end_to_end_and_continue_where_they_stopped(tmp_path, teacher_dir):
    """Two tiny rounds through the CLI; a second invocation skips both; a third with one more
    round runs only that one, from round 1's student."""
    from click.testing import CliRunner

    from ddk_cache.cli.main import main

    from .helpers import CHAT_TEMPLATE, chat_records

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r.get("prompt") or r["messages"][-2]["content"]}) + "\n" for r in chat_records(24)))
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    argv = ["minillm", "--student", str(student), "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(tmp_path / "m"),
            "--steps-per-round", "2", "--max-new-tokens", "12", "--seq-len", "64", "--top-k", "8", "--batch-size", "4",
            "--chat-template", str(tmp_path / "t.jinja"), "--device", "cpu", "--quiet"]
    first = CliRunner().invoke(main, [*argv, "--rounds", "2"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "m" / "round-1" / "run" / "final").is_dir()
    again = CliRunner().invoke(main, [*argv, "--rounds", "2"])
    assert again.exit_code == 0 and "round 0: done" in again.output and "round 1: done" in again.output
    more = CliRunner().invoke(main, [*argv, "--rounds", "3"])
    assert more.exit_code == 0 and "round 2: sampling from " + str(tmp_path / "m" / "round-1" / "run" / "final") in more.output
