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


@pytest.mark.parametrize("cfg", [MiniLLMConfig(), MiniLLMConfig(length_norm=False), MiniLLMConfig(single_step=False),
                                 MiniLLMConfig(variant="lmops")], ids=["paper", "no-length-norm", "no-single-step", "lmops"])
@pytest.mark.parametrize("fused", [False, True], ids=["recompute", "fused"])
def test_chunked_minillm_equals_the_whole_logits_loss(cfg, fused):
    """chunked_minillm (what distill runs: response positions only, a few at a time, the
    head's gradients fused into the forward pass or the logits recomputed in backward) =
    minillm_loss on the whole [B, T, V] logits, value and gradients of the decoder output
    and the head."""
    from ddk_cache.train.minillm import chunked_minillm

    g = torch.Generator().manual_seed(3)
    B, T, H, V, K = 3, 11, 16, 50, 6
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3:] = mask[1, 1:7] = mask[2, 9:] = True
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    topk_logprobs, topk_ids = teacher.topk(K, -1)
    tokens = torch.where(mask, labels, torch.zeros_like(labels))
    target = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    ce, total, ce_tok = chunked_minillm(hidden, head, labels, topk_ids, topk_logprobs, target, old, cfg, chunk=4, fused=fused)
    total.backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = head.weight.grad = None
    logits = head(hidden)
    want = minillm_loss(logits, tokens, mask, topk_ids, topk_logprobs, target, old, cfg) * mask.sum()
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[1], head.weight.grad, rtol=1e-4, atol=1e-7)
    ref_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none", ignore_index=-100)
    torch.testing.assert_close(ce_tok, ref_ce.detach(), rtol=1e-5, atol=1e-6)
    assert not ce.requires_grad


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


def samples_cache(tmp_path, teacher_dir, student, *generate_args, strip=False):
    """One round's data: the student's samples (generate) scored by the teacher (build);
    `strip`: without their token ids and log-probs (plain chat records, as another tool's
    samples would be)."""
    from click.testing import CliRunner

    from ddk_cache.capture.build import build
    from ddk_cache.cli.main import main

    from .helpers import CHAT_TEMPLATE, chat_records, small_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"][:2] if "messages" in r else [{"role": "user", "content": r["prompt"]}]})
                               + "\n" for r in chat_records(40)))
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    res = CliRunner().invoke(main, ["generate", "--model", str(student), "--prompts", str(prompts), "--out", str(tmp_path / "round" / "chat.jsonl"),
                                    "--max-new-tokens", "16", "--chat-template", str(tmp_path / "t.jinja"), "--device", "cpu", "--quiet",
                                    "--engine", "hf", *generate_args])
    assert res.exit_code == 0, res.output
    if strip:
        samples = tmp_path / "round" / "chat.jsonl"
        records = [json.loads(line) for line in samples.read_text().splitlines()]
        samples.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    out = tmp_path / "round.zarr"
    build(small_config(teacher_dir, tmp_path / "round", out, seq_len=64, val_tokens=128, chat_template=CHAT_TEMPLATE, top_k=16), progress=False)
    return out


@pytest.mark.parametrize("mix,strip", [(0.0, False), (0.2, False), (0.0, True)], ids=["student-samples", "teacher-mixed", "no-logprobs"])
def test_distill_minillm_first_step_equals_the_loss_on_the_same_batch(tmp_path, teacher_dir, mix, strip):
    """`distill --kd-loss minillm` on a round's cache: the first step's loss is minillm_loss on
    the loader's first batch with the importance weights' denominator r = the distribution
    the samples were drawn from: q_old, the starting student (ρ = 1 at step 1), or with
    teacher-mixed sampling 0.2 p + 0.8 q_old, both as `generate` recorded them; for samples
    without recorded log-probs, q_old from a frozen copy of the starting student."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from ddk_cache.store.cache import Cache
    from ddk_cache.train.data import CacheLoader
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    cache_path = samples_cache(tmp_path, teacher_dir, student, *(["--mix-teacher", str(teacher_dir), "--mix-alpha", str(mix)] if mix else []),
                               strip=strip)
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
        q_old = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        args = (logits, tokens, mask, batch.topk_ids.long(), batch.topk_logprobs, batch.target_logprob)
        want = minillm_loss(*args, q_old if strip else batch.sample_logprob)
        if strip:
            assert batch.sample_logprob is None
        elif mix:
            # r from the cache: log(0.2 p + 0.8 q_old) with p the teacher's log-prob of the token, also cached
            r = torch.log(mix * batch.target_logprob.exp() + (1 - mix) * q_old.exp())
            torch.testing.assert_close(batch.sample_logprob[mask], r[mask], rtol=1e-4, atol=1e-4)
            assert minillm_loss(*args, q_old).item() != pytest.approx(want.item(), rel=1e-3)  # the weights are not q_θ/q_old
        else:
            torch.testing.assert_close(batch.sample_logprob[mask], q_old[mask], rtol=1e-4, atol=1e-4)
    assert first["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert math.isfinite(logged[-1]["ppl_student"][cache.domains[0]])


def test_the_pretraining_term_adds_the_second_caches_ce_to_loss_and_gradient(tmp_path, teacher_dir, built_cache):
    """--pretrain-cache (MiniLLM's L_PT): step 1's loss and gradient norm equal those of
    minillm_loss on the round's first batch + w x the mean CE of the pre-training cache's
    first batch (its own loader: seed + 1, natural mixing), computed here by hand."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from ddk_cache.store.cache import Cache
    from ddk_cache.train.data import CacheLoader
    from ddk_cache.train.ddk import DDKController
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    cache_path = samples_cache(tmp_path, teacher_dir, student)
    run = tmp_path / "run"
    distill(distill_config(cache_path, student, run, max_steps=2, kd_loss="minillm", mixing="uniform", pretrain_cache=str(built_cache),
                           pretrain_weight=0.5, grad_clip=0), progress=False)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in logged if r["type"] == "step")
    cache, pt = Cache(str(cache_path)), Cache(str(built_cache))
    with CacheLoader(cache, batch_size=4, weights=np.full(len(cache.domains), 1 / len(cache.domains)), seed=0) as loader:
        batch = loader.next()
    with CacheLoader(pt, batch_size=4, weights=DDKController(pt, mixing="natural").weights, seed=1, targets=False) as loader:
        pt_batch = loader.next()
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    labels = batch.labels()
    mask = labels != -100
    tokens = torch.where(mask, labels, torch.zeros_like(labels))
    logits = model(input_ids=batch.tokens).logits[:, :-1]
    main = minillm_loss(logits, tokens, mask, batch.topk_ids.long(), batch.topk_logprobs, batch.target_logprob, batch.sample_logprob)
    pt_logits = model(input_ids=pt_batch.tokens).logits[:, :-1]
    pt_ce = torch.nn.functional.cross_entropy(pt_logits.reshape(-1, pt_logits.shape[-1]), pt_batch.labels().reshape(-1))
    (main + 0.5 * pt_ce).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert first["pretrain_ce"] == pytest.approx(pt_ce.item(), rel=1e-5)
    assert first["loss"] == pytest.approx((main + 0.5 * pt_ce).item(), rel=1e-5)
    assert first["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    evals = [r for r in logged if r["type"] == "eval"]
    assert set(evals[-1]["pretrain_ppl_student"]) == set(pt.domains)


def test_minillm_refuses_a_text_cache(tmp_path, built_cache, teacher_dir):
    from ddk_cache.errors import ConfigError
    from ddk_cache.train.distill import distill

    from .helpers import distill_config

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    with pytest.raises(ConfigError, match="--kd-loss minillm on .*: it trains on the student's own samples"):
        distill(distill_config(built_cache, student, tmp_path / "r", kd_loss="minillm"), progress=False)


@pytest.mark.slow
def test_rounds_run_end_to_end_and_continue_where_they_stopped(tmp_path, teacher_dir, built_cache):
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
            "--chat-template", str(tmp_path / "t.jinja"), "--device", "cpu", "--quiet", "--engine", "hf"]
    first = CliRunner().invoke(main, [*argv, "--rounds", "2"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "m" / "round-1" / "run" / "final").is_dir()
    again = CliRunner().invoke(main, [*argv, "--rounds", "2"])
    assert again.exit_code == 0 and "round 0: done" in again.output and "round 1: done" in again.output
    # The third round samples teacher-mixed (the teacher is loaded next to the student) and
    # adds the pre-training LM term.
    more = CliRunner().invoke(main, [*argv, "--rounds", "3", "--mix-alpha", "0.2", "--pretrain-cache", str(built_cache)])
    assert more.exit_code == 0 and "round 2: sampling from " + str(tmp_path / "m" / "round-1" / "run" / "final") in more.output
    assert "teacher-mixed sampling: on" in more.output
    sample = json.loads((tmp_path / "m" / "round-2" / "samples" / "chat.jsonl").read_text().splitlines()[0])["sample"]
    assert sample["mix_teacher"] == str(teacher_dir) and sample["mix_alpha"] == 0.2
    steps = [json.loads(line) for line in (tmp_path / "m" / "round-2" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["pretrain_ce"]) for r in steps if r["type"] == "step")


@pytest.mark.slow
def test_one_round_with_vllm_sampling_and_scoring(tmp_path, teacher_dir):
    """The default engine where vLLM is installed: the student samples and the teacher scores
    with vLLM (two engines, one after the other), and the round trains."""
    from click.testing import CliRunner

    from ddk_cache.capture.teachers.vllm import vllm_available
    from ddk_cache.cli.main import main

    from .helpers import CHAT_TEMPLATE, chat_records

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r.get("prompt") or r["messages"][-2]["content"]}) + "\n" for r in chat_records(24)))
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    # --seq-len 63: vLLM scores seq-len + 1 positions and the test teacher's context is 64.
    res = CliRunner().invoke(main, ["minillm", "--student", str(student), "--teacher", str(teacher_dir), "--prompts", str(prompts),
                                    "--out", str(tmp_path / "m"), "--rounds", "1", "--steps-per-round", "2", "--max-new-tokens", "12",
                                    "--seq-len", "63", "--top-k", "8", "--batch-size", "4", "--chat-template", str(tmp_path / "t.jinja"),
                                    "--device", "cpu", "--quiet", "--engine-arg", "enforce_eager=true"])  # no graph compilation: faster on CPU
    assert res.exit_code == 0, res.output
    sample = json.loads((tmp_path / "m" / "round-0" / "samples" / "chat.jsonl").read_text().splitlines()[0])["sample"]
    assert sample["engine"] == "vllm"
    from ddk_cache.store.cache import Cache

    cache = Cache(str(tmp_path / "m" / "round-0" / "cache.zarr"))
    assert cache.meta.teacher["backend"] == "vllm"
    assert cache.is_sampled(cache.domains[0]) and (tmp_path / "m" / "round-0" / "run" / "final").is_dir()
