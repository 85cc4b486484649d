"""Builds with pack-v2, adaptive k, sampled targets and tokens only: what they store, that
the trainer takes them, and that format-1 and -2 caches still read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ddk_cache.capture.build import build
from ddk_cache.errors import ConfigError
from ddk_cache.store.cache import SPLITS, Cache
from ddk_cache.store.targets import TargetSpec, adaptive_cut
from ddk_cache.train.distill import distill
from ddk_cache.train.report import read_metrics

from .helpers import copy_cache, distill_config, make_student, small_config
from .test_build import reference

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_dir, corpus_dir):
    root = tmp_path_factory.mktemp("kinds")
    kinds = {
        "pack": dict(encoding="pack"),
        "pack-v2": dict(encoding="pack-v2"),
        "adaptive-plain": dict(encoding="plain", min_mass=0.5, min_prob=0.01),
        "adaptive-pack": dict(encoding="pack", min_mass=0.5, min_prob=0.01),
        "sampled": dict(encoding="pack", targets="sampled", samples=20),
        "tokens": dict(top_k=0, teacher="", tokenizer=str(teacher_dir)),
    }
    for name, options in kinds.items():
        build(small_config(teacher_dir, corpus_dir, root / f"{name}.zarr", **options), progress=False)
    return {name: root / f"{name}.zarr" for name in kinds}


def each_split(cache: Cache):
    for domain in cache.domains:
        for split in SPLITS:
            yield cache.read(domain, split, 0, cache.num_sequences(domain, split))


def coarse_kl_rows(ids, lps, d_ids, d_lps):
    """Per position KL(teacher kept + tail || decoded kept + tail), entries matched by id."""
    p = np.exp(np.take_along_axis(lps.astype(np.float64), np.argsort(ids, -1), -1))
    q = np.exp(d_lps.astype(np.float64))
    tp, tq = np.clip(1 - p.sum(-1), 0, 1), np.clip(1 - q.sum(-1), 0, 1)
    return (p * np.log(p / q)).sum(-1) + np.where(tp > 0, tp * np.log(tp / np.maximum(tq, 1e-300)), 0)


def exact_tails(teacher_dir, tokens: np.ndarray, k: int) -> np.ndarray:
    """The teacher's log mass outside its top-k, per position, from a full forward pass (float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.from_numpy(tokens).long()).logits[:, :-1].double(), -1)
    top = lp.topk(k, -1).indices
    return torch.logsumexp(lp.scatter(-1, top, float("-inf")), -1).numpy()


def test_pack_v3_keeps_every_probability_and_the_tail_to_a_relative_bound(caches, teacher_dir, built_cache):
    cache, plain = Cache(str(caches["pack"])), Cache(str(built_cache))
    enc = cache.meta.encoding
    assert enc.name == "pack-v3" and cache.target_arrays == ("targets",)
    for batch in each_split(cache):
        ids, lps, tgt = reference(teacher_dir, batch.tokens, 8)
        np.testing.assert_array_equal(batch.topk_ids, ids)  # exact, in rank order
        r = lps[..., :1].astype(np.float64) - lps
        err = np.abs(batch.topk_logprobs.astype(np.float64) - lps)
        assert (err <= enc.step * np.maximum(1, r / enc.knee) + 1e-6).all()
        tail = exact_tails(teacher_dir, batch.tokens, 8)
        assert (np.abs(batch.tail_logprob - tail) <= enc.step + 1e-6).all()
        total = np.exp(batch.topk_logprobs.astype(np.float64)).sum(-1) + np.exp(batch.tail_logprob.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=2e-6)  # decoded targets are distributions
        kept = (ids == batch.tokens[:, 1:, None]).any(-1)
        np.testing.assert_array_equal(batch.target_logprob[~kept], tgt[~kept])
        assert np.abs(batch.target_logprob[kept] - tgt[kept]).max(initial=0) < 0.05
    assert cache.meta.teacher_ppl == plain.meta.teacher_ppl
    stored = {r["domain"] + r["split"]: r["bytes"] for r in cache.summary()}
    assert sum(stored.values()) < 0.7 * sum(r["bytes"] for r in plain.summary())


def test_pack_v2_keeps_ids_exact_and_every_position_within_the_budget(caches, teacher_dir, built_cache):
    cache, plain = Cache(str(caches["pack-v2"])), Cache(str(built_cache))
    assert cache.meta.encoding.name == "pack-v2" and cache.target_arrays == ("targets",)
    budget = cache.meta.encoding.kl_budget
    for batch in each_split(cache):
        ids, lps, tgt = reference(teacher_dir, batch.tokens, 8)
        np.testing.assert_array_equal(batch.topk_ids, np.sort(ids, -1))
        kl = coarse_kl_rows(ids, lps, batch.topk_ids, batch.topk_logprobs)
        assert kl.max() <= budget * 1.001 + 1e-6  # per position, not on average
        assert (np.exp(batch.topk_logprobs.astype(np.float64)).sum(-1) <= 1 + 1e-6).all()
        # The target's log-prob: its kept entry where kept, else exact.
        kept = (ids == batch.tokens[:, 1:, None]).any(-1)
        np.testing.assert_array_equal(batch.target_logprob[~kept], tgt[~kept])
        assert np.abs(batch.target_logprob[kept] - tgt[kept]).max(initial=0) < 0.5
    # The perplexity table comes from the exact values, whatever the encoding.
    assert cache.meta.teacher_ppl == plain.meta.teacher_ppl
    stored = {r["domain"] + r["split"]: r["bytes"] for r in cache.summary()}
    assert sum(stored.values()) < 0.6 * sum(r["bytes"] for r in plain.summary())


@pytest.mark.parametrize("name", ["adaptive-plain", "adaptive-pack"])
def test_adaptive_keeps_what_the_rule_says(caches, teacher_dir, name):
    cache = Cache(str(caches[name]))
    spec = cache.targets
    assert spec.min_mass == 0.5 and spec.min_prob == 0.01
    for batch in each_split(cache):
        ids, lps, _ = reference(teacher_dir, batch.tokens, 8)
        cut = adaptive_cut(lps, spec)
        kept = np.isfinite(cut)
        assert np.array_equal(np.isfinite(batch.topk_logprobs).sum(-1), kept.sum(-1))
        np.testing.assert_array_equal(np.where(kept, batch.topk_ids, -1), np.where(kept, ids, -1))  # rank order, padding after
        if name == "adaptive-plain":  # exact
            np.testing.assert_array_equal(batch.topk_logprobs, cut)
        else:  # pack-v3: the kept values within its bound, the dropped mass in the tail
            step, knee = cache.meta.encoding.step, cache.meta.encoding.knee
            r = np.where(kept, cut[..., :1] - cut, 0)
            assert (np.abs(np.where(kept, batch.topk_logprobs - cut, 0)) <= step * np.maximum(1, r / knee) + 1e-6).all()
    assert 1 <= np.isfinite(batch.topk_logprobs).sum(-1).min() and np.isfinite(batch.topk_logprobs).sum(-1).max() < 8


def test_sampled_targets_are_counts_of_teacher_draws(caches, tmp_path, teacher_dir, corpus_dir):
    cache = Cache(str(caches["sampled"]))
    assert cache.targets == TargetSpec(kind="sampled", k=8, samples=20, sample_pool=None)
    assert cache.top_k == 20  # every unique id is kept (--top-k does not cap sampled ids)
    assert cache.targets.unbiased and "unbiased" in cache.targets.describe()
    for batch in each_split(cache):
        w = np.exp(batch.topk_logprobs.astype(np.float64))
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        counts = np.rint(w * 20)
        np.testing.assert_allclose(counts / 20, w, atol=1e-6)  # weights are counts / N
        valid = np.isfinite(batch.topk_logprobs)
        assert (batch.topk_ids[valid] < cache.meta.vocab_size).all()
        _, _, tgt = reference(teacher_dir, batch.tokens, 8)
        np.testing.assert_array_equal(batch.target_logprob, tgt)  # exact for sampled caches
    # Seeded per sequence: a second build (other shards) draws exactly the same ids.
    build(small_config(teacher_dir, corpus_dir, tmp_path / "again.zarr", encoding="pack", targets="sampled", samples=20,
                       shard_sequences=3), progress=False)
    other = Cache(str(tmp_path / "again.zarr"))
    for d in cache.domains:
        a, b = cache.read(d, "train", 0, 6), other.read(d, "train", 0, 6)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


def test_tokens_only_cache(caches, built_cache):
    cache = Cache(str(caches["tokens"]))
    assert not cache.has_targets and cache.meta.teacher_ppl is None and cache.meta.encoding.name == "none"
    assert cache.target_arrays == () and cache.targets.describe().startswith("tokens only")
    full = Cache(str(built_cache))
    for d in full.domains:  # the same sequences as the teacher's cache of the same corpus
        np.testing.assert_array_equal(cache.read(d, "train", 0, 5).tokens, full.read(d, "train", 0, 5).tokens)
    assert cache.read("alpha", "val", 0, 1).topk_ids is None


@pytest.mark.parametrize("name", ["pack", "adaptive-pack", "sampled"])
def test_trainer_takes_every_target_kind(caches, tmp_path, teacher_dir, name):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    result = distill(distill_config(caches[name], student, tmp_path / "run", max_steps=3), progress=False)
    kd = [r["kd"] for r in read_metrics(tmp_path / "run")[0]]
    assert len(result.losses) == 3 and np.isfinite(result.losses).all() and min(kd) > 0


def test_tokens_only_cache_trains_with_kd_none_only(caches, tmp_path, teacher_dir):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    result = distill(distill_config(caches["tokens"], student, tmp_path / "run", max_steps=3, kd_loss="none", mixing="natural"), progress=False)
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()
    with pytest.raises(ConfigError, match="is a tokens-only cache .* use --kd-loss none"):
        distill(distill_config(caches["tokens"], student, tmp_path / "r2", mixing="natural"), progress=False)
    with pytest.raises(ConfigError, match="--mixing ddk needs the teacher perplexity table"):
        distill(distill_config(caches["tokens"], student, tmp_path / "r3", kd_loss="none"), progress=False)


@pytest.mark.parametrize("option,message", [
    (dict(kd_loss="rkl"), "--kd-loss rkl on a cache of sampled targets: only forward KL"),
    (dict(temperature=2.0), "--temperature 2.0 on a cache of sampled targets"),
    (dict(tail="renorm"), "--tail renorm on a cache of sampled targets: renormalising the student over randomly drawn ids biases"),
])
def test_sampled_cache_refuses_biased_losses(caches, tmp_path, teacher_dir, option, message):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    with pytest.raises(ConfigError, match=message):
        distill(distill_config(caches["sampled"], student, tmp_path / "run", **option), progress=False)


@pytest.mark.parametrize("name", ["v2-plain", "v2-pack", "v2-sampled"])
def test_format_2_caches_still_read(name):
    """Caches written by ddk-cache 0.1.0 (format 2, before pack-v2 and build logs) read as they
    did: every array equals what that version read (recorded beside the fixture)."""
    cache = Cache(str(LEGACY / f"{name}.zarr"))
    assert cache.meta.format_version == 2 and cache.meta.state == "complete"
    expected = np.load(LEGACY / f"{name}.expected.npz")
    for d in cache.domains:
        for s in SPLITS:
            batch = cache.read(d, s, 0, cache.num_sequences(d, s))
            for key in ("tokens", "topk_ids", "topk_logprobs", "target_logprob"):
                np.testing.assert_array_equal(getattr(batch, key), expected[f"{d}/{s}/{key}"], err_msg=f"{name} {d}/{s}/{key}")
    assert math.isfinite(cache.teacher_ppl("alpha", "val"))


@pytest.mark.parametrize("jit", ["compiled", "numpy"])
def test_format_3_cache_still_reads_verifies_and_trains(tmp_path, jit, monkeypatch):
    """A pack-v3 cache written by ddk-cache 0.3 (format 3: tokens and targets in separate
    objects, before bundles) reads as it did (every array equals what that version read,
    recorded beside the fixture: bit for bit by the numpy decoder that version had, to
    float32 rounding by the compiled one, whose sums run in another order), passes
    `verify`, and trains a student."""
    from ddk_cache.models import ModelSpec, init_model
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.store.verify import verify_cache

    monkeypatch.setenv("DDK_CACHE_JIT", "1" if jit == "compiled" else "0")
    path = LEGACY / "v3-pack.zarr"
    cache = Cache(str(path))
    assert cache.meta.format_version == 3 and not cache.meta.bundled and cache.encoding.name == "pack-v3"
    expected = np.load(LEGACY / "v3-pack.expected.npz")
    for d in cache.domains:
        for s in SPLITS:
            batch = cache.read(d, s, 0, cache.num_sequences(d, s))
            for key in ("tokens", "topk_ids", "topk_logprobs", "target_logprob", "tail_logprob"):
                got, want = getattr(batch, key), expected[f"{d}/{s}/{key}"]
                if jit == "compiled" and "logprob" in key:
                    assert np.array_equal(np.isfinite(got), np.isfinite(want)), f"{d}/{s}/{key}"
                    fin = np.isfinite(want)
                    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-6, atol=1e-6, err_msg=f"{d}/{s}/{key}")
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{d}/{s}/{key}")
    problems, checked = verify_cache(str(path))
    assert problems == [] and checked == 2 * len(cache.shards())
    tok = load_tokenizer(str(LEGACY / "teacher"))
    student = tmp_path / "student"
    init_model(ModelSpec(vocab_size=400, hidden_size=32, layers=1, heads=1, max_position_embeddings=64), tok).save_pretrained(student)
    tok.save_pretrained(student)
    result = distill(distill_config(path, student, tmp_path / "run", max_steps=2, batch_size=2), progress=False)
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()


def test_format_3_build_resumed_by_this_version_stays_format_3(tmp_path, teacher_dir, corpus_dir, pack_cache, monkeypatch):
    """A pack build begun by a format-3 writer and resumed by this one is finished in format 3
    (one object per array, as it began), and holds the rows an uninterrupted build holds."""
    import ddk_cache.store.cache as cache_module
    from .helpers import partial_cache
    from .test_kill_resume import assert_same_cache

    out = tmp_path / "c.zarr"
    with monkeypatch.context() as m:
        m.setattr(cache_module, "FORMAT_VERSION", 3)
        partial_cache(teacher_dir, corpus_dir, out, shards=3, encoding="pack")
    assert Cache(str(out), require_complete=False).meta.format_version == 3
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack"), progress=False)
    cache = Cache(str(out))
    assert cache.meta.format_version == 3 and not cache.meta.bundled
    assert (out / "alpha" / "train" / "tokens" / "c" / "0" / "0").exists() and not (out / "alpha" / "train" / "rows").exists()
    assert verify_cache_problems(out) == []
    assert all(e.bytes is None for by in cache.meta.teacher_ppl.values() for e in by.values())  # 0.3 readers: no new log keys
    assert_same_cache(out, pack_cache, table_bytes=False)


def verify_cache_problems(path) -> list:
    from ddk_cache.store.verify import verify_cache

    return verify_cache(str(path))[0]


def test_format_2_cache_trains_a_student(tmp_path):
    from ddk_cache.models import ModelSpec, init_model
    from ddk_cache.capture.tokenization import load_tokenizer

    tok = load_tokenizer(str(LEGACY / "teacher"))
    student = tmp_path / "student"
    init_model(ModelSpec(vocab_size=400, hidden_size=32, layers=1, heads=1, max_position_embeddings=64), tok).save_pretrained(student)
    tok.save_pretrained(student)
    result = distill(distill_config(LEGACY / "v2-pack.zarr", student, tmp_path / "run", max_steps=2, batch_size=2), progress=False)
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()


def test_version_1_caches_still_read(built_cache, tmp_path):
    """A format-1 cache (plain-v1 top-k, no `targets` attribute) reads as top-k targets."""
    def to_v1(meta):
        meta["format_version"] = 1
        del meta["targets"]

    old = Cache(str(copy_cache(LEGACY / "v2-plain.zarr", tmp_path / "v1.zarr", edit=to_v1)))
    new = Cache(str(LEGACY / "v2-plain.zarr"))
    assert old.targets == TargetSpec(kind="topk", k=8)
    a, b = old.read("alpha", "train", 0, 3), new.read("alpha", "train", 0, 3)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.parametrize("options,message", [
    (dict(targets="sampled", encoding="plain"), "--targets sampled needs --encoding pack"),
    (dict(min_mass=1.5), r"--min-mass must be in \(0, 1\]"),
    (dict(samples=5000, targets="sampled", encoding="pack"), "--samples must be in 1..4096"),
    (dict(kl_budget=1.0, encoding="pack-v2"), "--kl-budget must be in 1e-06..0.1"),
    (dict(kl_budget=1e-3, encoding="pack"), "--kl-budget applies to --encoding pack-v2 only; this build writes pack"),
    (dict(logprob_step=0.9, encoding="pack"), "--logprob-step must be in 1.5e-05..0.5"),
    (dict(targets="sampled", min_prob=0.1, encoding="pack"), "--min-mass/--min-prob apply to --targets topk only"),
    (dict(teacher="", top_k=8), "--teacher is required"),
])
def test_bad_target_options(tmp_path, teacher_dir, corpus_dir, options, message):
    with pytest.raises(ConfigError, match=message):
        small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", **options)


@pytest.mark.parametrize("name", ["pack", "sampled", "tokens"])
def test_verify_reads_every_kind(caches, tmp_path, name):
    from ddk_cache.store.verify import verify_cache

    problems, checked = verify_cache(str(caches[name]))
    assert problems == [] and checked > 0


def test_verify_names_a_packed_row_that_is_not_a_distribution(caches, tmp_path):
    """A row whose CRC passes but whose targets are invalid (here: a row of another cache's
    frame rewritten so its kept mass exceeds 1) is reported."""
    from ddk_cache.store.pack2 import Pack2Codec
    from ddk_cache.store.verify import check_targets

    ids = np.arange(4, dtype=np.int32)[None].repeat(3, 0)
    assert check_targets(ids[None], np.log(np.full((1, 3, 4), 0.3)), 100) == "a position's kept mass is 1.200000 > 1 (negative tail)"
    assert check_targets(ids[None], np.full((1, 3, 4), np.nan), 100) == "decoded log-probs contain NaN or +inf"
    assert Pack2Codec  # the codec itself never produces such rows (tests/test_pack2.py)


def test_fidelity_report(caches, built_cache):
    """plain-v1 top-k is exact (coarse KL ~ 0); pack-v2 stays within its budget at every position;
    pack-v3's per-entry bound keeps its KL far below that budget."""
    from ddk_cache.capture.fidelity import fidelity

    exact = fidelity(Cache(str(built_cache)), sequences=2, device="cpu")
    packed = fidelity(Cache(str(caches["pack-v2"])), sequences=2, device="cpu")
    assert abs(exact["coarse_kl"]) < 1e-6 and 0 < packed["coarse_kl"] <= packed["coarse_kl_p99"] <= packed["coarse_kl_max"] <= 1.001e-4 + 1e-6
    v3 = fidelity(Cache(str(caches["pack"])), sequences=2, device="cpu")
    assert abs(v3["coarse_kl_max"]) < 1e-5 and v3["invalid_share"] == 0 and v3["logprob_step"] == 2.0**-9
    assert exact["invalid_share"] == packed["invalid_share"] == 0
    assert exact["covered_mass"] == pytest.approx(packed["covered_mass"], rel=1e-6)  # same ids
    assert set(packed["bytes_per_token"]) >= {"targets", "tokens"}
    assert packed["bytes_per_token"]["targets"] < exact["bytes_per_token"]["topk_ids"] + exact["bytes_per_token"]["topk_logprobs"]


def test_size_projection_matches_what_the_build_writes(tmp_path, teacher_dir, corpus_dir, capsys):
    """The size printed during a build (once every domain has a written shard) is within 10% of
    the bytes the shard objects take when the build ends."""
    import re

    from ddk_cache.store.cache import Cache

    out = tmp_path / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack", shard_sequences=2, piece_mb=1.0), progress=True)
    captured = capsys.readouterr()
    line = next(x for x in (captured.out + captured.err).splitlines() if x.startswith("cache size, projected"))
    projected = float(re.search(r"\(([0-9.]+) B/position", line).group(1))
    cache = Cache(str(out))
    stored = sum(r["bytes"] for r in cache.summary())
    positions = sum(r["sequences"] for r in cache.summary()) * (cache.seq_len - 1)
    assert abs(projected / (stored / positions) - 1) < 0.10, (projected, stored / positions)


def test_fidelity_refuses_another_model_at_the_teachers_path(tmp_path, caches, teacher_dir):
    """inspect --fidelity with another model where the teacher was reported that model's numbers
    as the cache's fidelity."""
    import shutil

    from ddk_cache.capture.fidelity import fidelity
    from ddk_cache.errors import ConfigError
    from ddk_cache.models import ModelSpec, make_model_dir

    from .helpers import WORDS, make_docs

    other = make_model_dir([d for dom in WORDS for d in make_docs(dom, 30)], tmp_path / "other",
                           ModelSpec(vocab_size=400, hidden_size=32, layers=2, heads=1, max_position_embeddings=64, seed=9))
    with pytest.raises(ConfigError, match="is not the teacher this cache was built with"):
        fidelity(Cache(str(caches["pack"])), sequences=1, device="cpu", teacher=str(other))
    moved = tmp_path / "moved"
    shutil.copytree(teacher_dir, moved)
    report = fidelity(Cache(str(caches["pack"])), sequences=1, device="cpu", teacher=str(moved))  # the same teacher, moved: fine
    assert report["positions"] > 0 and report["coarse_kl_max"] < 1e-3
