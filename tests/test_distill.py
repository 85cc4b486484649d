"""The training loop: pinned loss, exact resume, two student sizes from one cache, errors, eval, report."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ddk_cache.cli.main import main
from ddk_cache.train.data import CacheLoader
from ddk_cache.train.distill import DistillConfig, TrainingError, distill
from ddk_cache.errors import ConfigError, DDKCacheError
from ddk_cache.train.losses import KDConfig, cross_entropy, dense_kd, sparse_kd
from ddk_cache.store.cache import Cache

from .helpers import distill_config, make_student


@pytest.fixture(scope="module")
def student_small(tmp_path_factory, teacher_dir):
    return make_student(teacher_dir, tmp_path_factory.mktemp("s") / "small", hidden_size=32, layers=1)


@pytest.fixture(scope="module")
def student_large(tmp_path_factory, teacher_dir):
    return make_student(teacher_dir, tmp_path_factory.mktemp("s") / "large", hidden_size=64, layers=2)


def steps(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


def evals(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def test_first_step_loss_equals_a_direct_computation(tmp_path, built_cache, student_small):
    from transformers import AutoModelForCausalLM

    cfg = distill_config(built_cache, student_small, tmp_path / "run", max_steps=2, kd_loss="rkl", kd_weight=0.3)
    distill(cfg, progress=False)
    logged = steps(tmp_path / "run")
    first_eval = evals(tmp_path / "run")[0]
    cache = Cache(str(built_cache))
    # The first batch: DDK weights from the step-0 evaluation, the sampler seeded by cfg.seed.
    weights = np.array([first_eval["weights"][d] for d in cache.domains])
    loader = CacheLoader(cache, batch_size=4, weights=weights, seed=0)
    batch = loader.next()
    loader.close()
    model = AutoModelForCausalLM.from_pretrained(student_small, dtype=torch.float32)
    logits = model(input_ids=batch.tokens).logits[:, :-1].reshape(-1, model.config.vocab_size)
    ce = cross_entropy(logits, batch.tokens[:, 1:].reshape(-1))
    kd = sparse_kd(logits, batch.topk_ids.reshape(logits.shape[0], -1), batch.topk_logprobs.reshape(logits.shape[0], -1), KDConfig("rkl"))
    expected = (ce.sum() + 0.3 * kd.sum()).item() / ce.numel()
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[0]["ce"] == pytest.approx(ce.mean().item(), rel=1e-5)
    # The first DDK weights: the smooth update from uniform, alpha softmax(student/teacher PPL) + (1 - alpha)/N.
    ratio = np.array([first_eval["ppl_student"][d] / first_eval["ppl_teacher"][d] for d in cache.domains])
    raw = np.exp(ratio - ratio.max()) / np.exp(ratio - ratio.max()).sum()
    np.testing.assert_allclose(weights, 0.5 * raw + 0.5 / len(raw), rtol=1e-9)
    assert first_eval["ppl_teacher"] == {d: cache.teacher_ppl(d) for d in cache.domains}


def test_online_kd_first_step_equals_dense_kd_with_the_resident_teacher(tmp_path, built_cache, student_small, teacher_dir):
    from transformers import AutoModelForCausalLM

    cfg = distill_config(built_cache, student_small, tmp_path / "run", max_steps=2, kd_loss="jsd", kd_weight=0.5,
                         online_teacher=str(teacher_dir))
    distill(cfg, progress=False)
    logged = steps(tmp_path / "run")
    cache = Cache(str(built_cache))
    weights = np.array([evals(tmp_path / "run")[0]["weights"][d] for d in cache.domains])
    loader = CacheLoader(cache, batch_size=4, weights=weights, seed=0, targets=False)
    batch = loader.next()
    loader.close()
    assert batch.topk_ids.shape[-1] == 0  # online KD reads tokens only
    student = AutoModelForCausalLM.from_pretrained(student_small, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    logits = student(input_ids=batch.tokens).logits[:, :-1].reshape(-1, student.config.vocab_size)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.tokens).logits[:, :-1].reshape(logits.shape)
    ce = cross_entropy(logits, batch.tokens[:, 1:].reshape(-1))
    kd = dense_kd(logits, t_logits, KDConfig("jsd"))
    assert logged[0]["loss"] == pytest.approx((ce.sum() + 0.5 * kd.sum()).item() / ce.numel(), rel=1e-5)
    assert logged[0]["kd"] == pytest.approx(kd.mean().item(), rel=1e-5)


def test_online_teacher_must_share_tokenizer_and_vocabulary(tmp_path, built_cache, student_small, teacher_dir):
    with pytest.raises(ConfigError, match="--online-teacher: .*nope: no such file or directory"):
        distill(distill_config(built_cache, student_small, tmp_path / "a", online_teacher=str(tmp_path / "nope")), progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    tok = load_tokenizer(str(teacher_dir))  # the right tokenizer, one vocabulary row too many
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=64)).save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    with pytest.raises(ConfigError, match="dense KD needs one vocabulary"):
        distill(distill_config(built_cache, student_small, tmp_path / "b", online_teacher=str(tmp_path / "padded")), progress=False)


def test_resume_is_exact(tmp_path, built_cache, student_small, monkeypatch):
    common = dict(max_steps=20, save_every=10, ddk_interval=4)
    straight = distill(distill_config(built_cache, student_small, tmp_path / "a", **common), progress=False)

    import ddk_cache.train.checkpoint as mod

    real_save = mod.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after its step-10 checkpoint

    monkeypatch.setattr(mod, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        distill(distill_config(built_cache, student_small, tmp_path / "b", **common), progress=False)
    monkeypatch.setattr(mod, "save", real_save)
    resumed = distill(distill_config(built_cache, student_small, tmp_path / "b", resume=True, **common), progress=False)

    assert resumed.steps == 20 and len(resumed.losses) == 10
    assert resumed.losses == straight.losses[10:]
    assert [s["loss"] for s in steps(tmp_path / "b")] == [s["loss"] for s in steps(tmp_path / "a")]
    assert [e["weights"] for e in evals(tmp_path / "b")] == [e["weights"] for e in evals(tmp_path / "a")]
    a, b = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_cache_trains_two_student_sizes(tmp_path, built_cache, student_small, student_large):
    from transformers import AutoModelForCausalLM

    for name, student in (("small", student_small), ("large", student_large)):
        result = distill(distill_config(built_cache, student, tmp_path / name, max_steps=6, lr=3e-3), progress=False)
        assert all(math.isfinite(x) for x in result.losses)
        model = AutoModelForCausalLM.from_pretrained(result.out)
        assert model.config.hidden_size == {"small": 32, "large": 64}[name]
        first, last = evals(tmp_path / name)[0], evals(tmp_path / name)[-1]
        # Training lowers the mean validation perplexity of a random-init student.
        assert np.mean(list(last["ppl_student"].values())) < np.mean(list(first["ppl_student"].values()))


def test_kd_none_is_plain_language_modelling(tmp_path, built_cache, student_small):
    distill(distill_config(built_cache, student_small, tmp_path / "ce", kd_loss="none", mixing="uniform"), progress=False)
    for s in steps(tmp_path / "ce"):
        assert s["kd"] == 0 and s["loss"] == s["ce"]
    assert all(e["weights"] == {d: 1 / 3 for d in e["weights"]} for e in evals(tmp_path / "ce"))


def test_nonfinite_loss_stops_and_names_the_checkpoint(tmp_path, built_cache, student_small, monkeypatch):
    from ddk_cache.train.student import StudentLoss

    calls = {"n": 0}
    real = StudentLoss.forward

    def flaky(self, *args, **kwargs):
        ce, kd, tok = real(self, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step (evaluation runs without gradients)
            calls["n"] += 1
            if calls["n"] == 3:
                ce = ce * float("nan")
        return ce, kd, tok

    monkeypatch.setattr(StudentLoss, "forward", flaky)
    with pytest.raises(TrainingError, match=r"loss became non-finite at step 3; stopped on every rank \(the last good checkpoint is .*step_00000002\)"):
        distill(distill_config(built_cache, student_small, tmp_path / "nan", save_every=2), progress=False)
    assert not (tmp_path / "nan" / "final").exists()


def test_another_tokenizer_is_refused_where_it_cannot_train(tmp_path, built_cache, teacher_dir):
    """A student of another tokenizer trains across tokenizers (test_crosstok.py), except with
    what needs the cache's own tokens: an online teacher (or MiniLLM, or a pre-training
    cache), and a cache that holds no tokenizer (built before 0.4: the error says to rebuild)."""
    import shutil

    from ddk_cache.models import ModelSpec, init_model, train_tokenizer

    other = train_tokenizer(["some other text entirely " * 40], 320)
    model = init_model(ModelSpec(vocab_size=320, hidden_size=32, heads=1, max_position_embeddings=64), other)
    model.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"the student's tokenizer \(.*other, sha256:\w+\) is not the cache's .*--online-teacher"):
        distill(distill_config(built_cache, tmp_path / "other", tmp_path / "run", online_teacher=str(teacher_dir)), progress=False)
    with pytest.raises(ConfigError, match=r"--cross-tokenizer hybrid trains from the cache's targets: not with --kd-loss minillm"):
        distill_config(built_cache, tmp_path / "other", tmp_path / "run", cross_tokenizer="hybrid", kd_loss="minillm")
    bare = tmp_path / "bare.zarr"
    shutil.copytree(built_cache, bare)
    shutil.rmtree(bare / "_tokenizer")
    with pytest.raises(DDKCacheError, match=r"holds no tokenizer \(caches hold one since ddk-cache 0.4"):
        distill(distill_config(bare, tmp_path / "other", tmp_path / "run2"), progress=False)


def test_student_vocab_smaller_than_tokenizer(tmp_path, built_cache, teacher_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    tok = load_tokenizer(str(teacher_dir))
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ConfigError, match=rf"student's vocabulary \(100 rows\) is smaller than the tokenizer \({len(tok)} tokens\)"):
        distill(distill_config(built_cache, tmp_path / "tiny", tmp_path / "run"), progress=False)


def test_padded_student_vocab_is_fine(tmp_path, built_cache, teacher_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    tok = load_tokenizer(str(teacher_dir))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 37, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=64)).save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    result = distill(distill_config(built_cache, tmp_path / "padded", tmp_path / "run", max_steps=2), progress=False)
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(ddk_interval=0), "--ddk-interval must be >= 1"),
        (dict(kd_weight=-0.1), "--kd-weight must be >= 0"),
        (dict(ddk_alpha=1.5), r"--ddk-alpha must be in \[0, 1\]"),
        (dict(temperature=0.0), r"--temperature must be in \(0, 100\]"),
        (dict(kd_loss="kl2"), "--kd loss must be one of"),
        (dict(kd_loss="none", online_teacher="t"), "--online-teacher with --kd-loss none"),
    ],
)
def test_out_of_range_options(tmp_path, built_cache, student_small, override, message):
    with pytest.raises(ConfigError, match=message):
        distill_config(built_cache, student_small, tmp_path / "run", **override)


def test_static_mixing_with_unknown_domain(tmp_path, built_cache, student_small):
    with pytest.raises(ConfigError, match="the cache has no domain 'web'"):
        distill(distill_config(built_cache, student_small, tmp_path / "run", mixing="static:alpha=1,web=2"), progress=False)


def test_config_file_unknown_key_and_override(tmp_path, built_cache, student_small):
    (tmp_path / "c.yaml").write_text(f"cache: {built_cache}\nstudent: {student_small}\nout: {tmp_path / 'r'}\nkd-loss: rkl\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'learning_rate'; valid keys: .*lr"):
        DistillConfig.from_sources(str(tmp_path / "c.yaml"), {})
    (tmp_path / "c.yaml").write_text(f"cache: {built_cache}\nstudent: {student_small}\nout: {tmp_path / 'r'}\nkd-loss: rkl\nmax_steps: 7\n")
    cfg = DistillConfig.from_sources(str(tmp_path / "c.yaml"), {"max_steps": 3, "lr": None})
    assert cfg.kd_loss == "rkl" and cfg.max_steps == 3 and cfg.lr == 3e-4


def test_incomplete_cache_is_refused(tmp_path, teacher_dir, corpus_dir, student_small):
    from .helpers import partial_cache

    partial_cache(teacher_dir, corpus_dir, tmp_path / "c.zarr")
    result = CliRunner().invoke(main, ["distill", "--cache", str(tmp_path / "c.zarr"), "--student", str(student_small), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "is an incomplete cache" in result.output and "shard(s) not written" in result.output


def test_existing_run_needs_resume(tmp_path, built_cache, student_small):
    first = distill(distill_config(built_cache, student_small, tmp_path / "run", max_steps=2, save_every=1), progress=False)
    with pytest.raises(ConfigError, match="already holds a run \\(checkpoint step_00000001\\); pass --resume"):
        distill(distill_config(built_cache, student_small, tmp_path / "run", max_steps=2), progress=False)
    # --resume with nothing to continue starts from step 0 (a preemptible job always passes it).
    fresh = distill(distill_config(built_cache, student_small, tmp_path / "empty", max_steps=2, save_every=1, resume=True), progress=False)
    assert fresh.losses == first.losses


def test_cli_distill_eval_report(tmp_path, built_cache, student_small):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["distill", "--cache", str(built_cache), "--student", str(student_small), "--out", str(run),
                                  "--max-steps", "4", "--ddk-interval", "2", "--batch-size", "4", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "final model:" in result.output
    ev = runner.invoke(main, ["eval", "--cache", str(built_cache), "--model", str(run / "final"), "--json"])
    rows = json.loads(ev.stdout)["rows"]
    assert [r["domain"] for r in rows] == ["alpha", "beta", "gamma"]
    assert rows[0]["teacher_ppl"] == Cache(str(built_cache)).teacher_ppl("alpha")
    assert rows[0]["student_ppl"] == pytest.approx(evals(run)[-1]["ppl_student"]["alpha"], rel=1e-6)
    # Bits per byte beside PPL: the run's last evaluation and `eval` agree; the teacher's from its table.
    assert rows[0]["student_bits_per_byte"] == pytest.approx(evals(run)[-1]["bpb_student"]["alpha"], rel=1e-6)
    assert evals(run)[-1]["bpb_teacher"]["alpha"] == Cache(str(built_cache)).meta.ppl("alpha").bits_per_byte is not None
    table = runner.invoke(main, ["eval", "--cache", str(built_cache), "--model", str(run / "final")])
    assert "student PPL" in table.output and "alpha" in table.output
    rep = runner.invoke(main, ["report", str(run)])
    assert rep.exit_code == 0, rep.output
    for name in ("weights.png", "ppl.png", "bits_per_byte.png", "loss.png", "report.md"):
        assert (run / name).stat().st_size > 0
    assert "| alpha |" in (run / "report.md").read_text() and "student bits/byte (end)" in (run / "report.md").read_text()


@pytest.mark.slow
def test_no_thread_outlives_distill(tmp_path, built_cache, student_small):
    """The loader's reader thread (and processes) end with the run, also after a DDK update at
    the last step: a long-lived process calling distill() many times leaks nothing."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    distill(distill_config(built_cache, student_small, tmp_path / "run", max_steps=4, ddk_interval=2, loader_workers=1), progress=False)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, [t.name for t in left]


def test_ranks_read_different_sequences(built_cache):
    cache = Cache(str(built_cache))
    w = np.full(3, 1 / 3)
    a = CacheLoader(cache, batch_size=3, weights=w, seed=5, rank=0, world_size=2)
    b = CacheLoader(cache, batch_size=3, weights=w, seed=5, rank=1, world_size=2)
    solo = CacheLoader(cache, batch_size=6, weights=w, seed=5)
    ba, bb, bs = a.next(), b.next(), solo.next()
    for loader in (a, b, solo):
        loader.close()
    # The two ranks split one shared draw: together they are the single-process batch.
    assert torch.equal(torch.cat([ba.tokens, bb.tokens]), bs.tokens)


def test_reader_processes_give_the_same_batches(built_cache):
    cache = Cache(str(built_cache))
    w = np.full(3, 1 / 3)

    def batches(workers: int) -> list:
        loader = CacheLoader(cache, batch_size=3, weights=w, seed=7, workers=workers)
        got = [loader.next() for _ in range(3)]
        loader.set_weights(np.array([0.7, 0.2, 0.1]))  # read-ahead is dropped, sampling restarts
        got += [loader.next() for _ in range(3)]
        loader.close()
        return got

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.topk_ids, b.topk_ids)
        assert torch.equal(a.topk_logprobs, b.topk_logprobs) and a.state == b.state


def test_accumulation_checkpointing_and_max_tokens(tmp_path, built_cache, student_small):
    # 2 micro-steps of 2 sequences == one step of 4 in tokens; max_tokens 3 steps' worth.
    cfg = distill_config(built_cache, student_small, tmp_path / "run", batch_size=2, grad_accum=2,
                         gradient_checkpointing=True, max_tokens=3 * 4 * 32, max_steps=1)
    result = distill(cfg, progress=False)
    assert result.steps == 3
    assert steps(tmp_path / "run")[-1]["tokens"] == 3 * 4 * 32
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("kd_loss", ["fkl", "akl"])
def test_fused_head_loss_trains_what_the_recomputing_loss_trains(tmp_path, built_cache, student_small, kd_loss):
    """distill's default fused head loss (the head's gradients computed in the forward pass)
    against the checkpointed chunks that recompute the logits: equal step losses, gradient
    norms and final weights, with gradient accumulation, decoder gradient checkpointing and a
    chunk that does not divide the batch (a tied head: test_chunked_loss, test_parallel)."""
    runs = {}
    for impl in ("recompute", "fused"):
        out = tmp_path / impl
        distill(distill_config(built_cache, student_small, out, batch_size=2, grad_accum=2, gradient_checkpointing=True,
                               max_steps=3, kd_loss=kd_loss, loss_chunk=7, loss_impl=impl), progress=False)
        runs[impl] = (steps(out), load_file(out / "final" / "model.safetensors"))
    (a, wa), (b, wb) = runs["recompute"], runs["fused"]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_missing_cache_is_refused(tmp_path, student_small):
    result = CliRunner().invoke(main, ["distill", "--cache", str(tmp_path / "nope.zarr"), "--student", str(student_small), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and f"{tmp_path / 'nope.zarr'} is not a ddk-cache store" in result.output and "Traceback" not in result.output


def test_loader_accepts_float32_weights_and_refuses_bad_ones(built_cache):
    cache = Cache(str(built_cache))
    loader = CacheLoader(cache, batch_size=2, weights=np.full(3, 1 / 3, dtype=np.float32), seed=0)
    assert loader.next().tokens.shape == (2, 32)
    loader.close()
    with pytest.raises(ValueError, match="mixing weights must be finite"):
        CacheLoader(cache, batch_size=2, weights=np.zeros(3), seed=0)


def test_out_that_is_not_an_unfinished_run_of_this_config_is_refused(tmp_path, built_cache, student_small, corpus_dir):
    """--out used to overwrite a finished run's final/ and metrics, a student's config.json, or
    write into the cache; a file or a read-only directory gave tracebacks."""
    import os

    from ddk_cache.errors import ConfigError

    done = tmp_path / "done"
    distill(distill_config(built_cache, student_small, done, max_steps=2, save_every=100), progress=False)
    before = (done / "final" / "model.safetensors").read_bytes()
    cases = {
        done: "holds a finished run",
        Path(student_small): "is the student",
        Path(built_cache): "is the cache",
        Path(corpus_dir): "holds files that are not a ddk-cache run",
    }
    (tmp_path / "afile").write_text("x")
    cases[tmp_path / "afile"] = "is a file"
    for out, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            distill(distill_config(built_cache, student_small, out, max_steps=2), progress=False)
    assert (done / "final" / "model.safetensors").read_bytes() == before
    assert (Path(student_small) / "config.json").exists()
    # The start of a run (no checkpoint yet) with other settings: refused, naming them.
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text(json.dumps({**json.loads((done / "config.json").read_text()), "lr": 0.5}))
    with pytest.raises(ConfigError, match="holds the start of a run with other settings .*--lr"):
        distill(distill_config(built_cache, student_small, started, max_steps=2), progress=False)
    # Read-only: one line through the CLI.
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: nothing to show here
            return
        result = CliRunner().invoke(main, ["distill", "--cache", str(built_cache), "--student", str(student_small), "--out", str(ro / "run"),
                                           "--max-steps", "1", "--device", "cpu", "--quiet"])
        assert result.exit_code == 1 and "is not writable" in result.output and "Traceback" not in result.output
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated state.json", "missing .metadata"])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, built_cache, student_small, monkeypatch, capsys, damage):
    """8 flipped bytes in a .distcp used to resume with rc 0 and different weights; a truncated
    state.json or a missing .metadata gave raw tracebacks. Now: the one before, one line, and
    the run ends exactly as an uninterrupted one."""
    import ddk_cache.train.checkpoint as mod

    common = dict(max_steps=6, save_every=2, ddk_interval=2, keep_checkpoints=3)
    straight = distill(distill_config(built_cache, student_small, tmp_path / "a", **common), progress=False)
    real_save = mod.save
    saved = []

    def save_and_stop_at_4(*args, **kwargs):
        out = real_save(*args, **kwargs)
        saved.append(out)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(mod, "save", save_and_stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        distill(distill_config(built_cache, student_small, tmp_path / "b", **common), progress=False)
    monkeypatch.setattr(mod, "save", real_save)
    newest = saved[-1]
    if damage == "flipped bytes":
        shard = next((newest / "dcp").glob("*.distcp"))
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
        shard.write_bytes(bytes(raw))
    elif damage == "truncated state.json":
        state = newest / "state.json"
        state.write_text(state.read_text()[:50])
    else:
        (newest / "dcp" / ".metadata").unlink()
    capsys.readouterr()
    resumed = distill(distill_config(built_cache, student_small, tmp_path / "b", resume=True, **common), progress=False)
    out = capsys.readouterr()
    assert f"checkpoint {newest.name} is damaged" in out.out + out.err
    assert resumed.losses == straight.losses[2:]  # from step 2, exactly
