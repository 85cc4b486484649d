"""Builds with the pack-v1 codec, adaptive k and sampled targets: what they store, and that the trainer takes them."""

from __future__ import annotations

import numpy as np
import pytest

from ddk_cache.capture.build import build
from ddk_cache.store.codec import TOP1_STEP
from ddk_cache.train.distill import distill
from ddk_cache.errors import ConfigError
from ddk_cache.train.report import read_metrics
from ddk_cache.store.cache import SPLITS, TARGETS, Cache
from ddk_cache.store.targets import TargetSpec, adaptive_cut

from .helpers import copy_cache, distill_config, make_student, small_config
from .test_build import reference


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_dir, corpus_dir):
    root = tmp_path_factory.mktemp("kinds")
    kinds = {
        "pack": dict(encoding="pack"),
        "adaptive-plain": dict(encoding="plain", min_mass=0.5, min_prob=0.01),
        "adaptive-pack": dict(encoding="pack", min_mass=0.5, min_prob=0.01),
        "sampled": dict(encoding="pack", targets="sampled", samples=20, top_k=20),
    }
    for name, options in kinds.items():
        build(small_config(teacher_dir, corpus_dir, root / f"{name}.zarr", **options), progress=False)
    return {name: root / f"{name}.zarr" for name in kinds}


def each_split(cache: Cache):
    for domain in cache.domains:
        for split in SPLITS:
            yield cache.read(domain, split, 0, cache.num_sequences(domain, split))


def test_pack_keeps_ids_exact_and_log_probs_close(caches, teacher_dir, built_cache):
    cache, plain = Cache(str(caches["pack"])), Cache(str(built_cache))
    assert cache.meta["encoding"]["name"] == "pack-v1" and TARGETS in cache.root["alpha/train"]
    for batch in each_split(cache):
        ids, lps, tgt = reference(teacher_dir, batch.tokens, 8)
        order = np.argsort(ids, -1)
        np.testing.assert_array_equal(batch.topk_ids, np.take_along_axis(ids, order, -1))
        np.testing.assert_array_equal(batch.target_logprob, tgt)  # exact: the teacher PPL comes from it
        top = np.take_along_axis(batch.topk_logprobs, np.argsort(order, -1)[..., :1], -1)[..., 0]
        assert np.abs(top - lps[..., 0]).max() <= TOP1_STEP / 2 + 1e-6
        p, q = np.exp(np.take_along_axis(lps, order, -1).astype(np.float64)), np.exp(batch.topk_logprobs.astype(np.float64))
        tp, tq = 1 - p.sum(-1), 1 - q.sum(-1)
        kl = (p * np.log(p / q)).sum(-1) + tp * np.log(tp / tq)
        assert kl.mean() < 2e-4
    assert cache.meta["teacher_ppl"] == plain.meta["teacher_ppl"]
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
        if name == "adaptive-plain":  # exact, rank order, padding after
            np.testing.assert_array_equal(np.where(kept, batch.topk_ids, -1), np.where(kept, ids, -1))
            np.testing.assert_array_equal(batch.topk_logprobs, cut)
        else:
            want = np.sort(np.where(kept, ids, 1 << 30), -1)
            np.testing.assert_array_equal(np.where(np.isfinite(batch.topk_logprobs), batch.topk_ids, 1 << 30), want)
    assert 1 <= np.isfinite(batch.topk_logprobs).sum(-1).min() and np.isfinite(batch.topk_logprobs).sum(-1).max() < 8


def test_sampled_targets_are_counts_of_teacher_draws(caches, tmp_path, teacher_dir, corpus_dir):
    cache = Cache(str(caches["sampled"]))
    assert cache.targets == TargetSpec(kind="sampled", k=20, samples=20, sample_pool=None)
    for batch in each_split(cache):
        w = np.exp(batch.topk_logprobs.astype(np.float64))
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        counts = np.rint(w * 20)
        np.testing.assert_allclose(counts / 20, w, atol=1e-6)  # weights are counts / N
        valid = np.isfinite(batch.topk_logprobs)
        assert (batch.topk_ids[valid] < cache.meta["vocab_size"]).all()
    # Seeded per shard: a second build draws exactly the same ids.
    build(small_config(teacher_dir, corpus_dir, tmp_path / "again.zarr", encoding="pack", targets="sampled", samples=20, top_k=20), progress=False)
    other = Cache(str(tmp_path / "again.zarr"))
    for d in cache.domains:
        np.testing.assert_array_equal(cache.root[f"{d}/train/{TARGETS}"][:], other.root[f"{d}/train/{TARGETS}"][:])


@pytest.mark.parametrize("name", ["pack", "adaptive-pack", "sampled"])
def test_trainer_takes_every_target_kind(caches, tmp_path, teacher_dir, name):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    result = distill(distill_config(caches[name], student, tmp_path / "run", max_steps=3), progress=False)
    kd = [r["kd"] for r in read_metrics(tmp_path / "run")[0]]
    assert len(result.losses) == 3 and np.isfinite(result.losses).all() and min(kd) > 0


@pytest.mark.parametrize("option,message", [
    (dict(kd_loss="rkl"), "--kd-loss rkl on a cache of sampled targets: only forward KL"),
    (dict(temperature=2.0), "--temperature 2.0 on a cache of sampled targets"),
])
def test_sampled_cache_refuses_biased_losses(caches, tmp_path, teacher_dir, option, message):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    with pytest.raises(ConfigError, match=message):
        distill(distill_config(caches["sampled"], student, tmp_path / "run", **option), progress=False)


def test_version_1_caches_still_read(built_cache, tmp_path):
    """A format-1 cache (plain-v1 top-k, no `targets` attribute) reads as top-k targets."""
    def to_v1(meta):
        meta["format_version"] = 1
        del meta["targets"]

    old = Cache(str(copy_cache(built_cache, tmp_path / "v1.zarr", edit=to_v1)))
    new = Cache(str(built_cache))
    assert old.targets == TargetSpec(kind="topk", k=8)
    a, b = old.read("alpha", "train", 0, 3), new.read("alpha", "train", 0, 3)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


@pytest.mark.parametrize("options,message", [
    (dict(targets="sampled", encoding="plain"), "--targets sampled needs --encoding pack"),
    (dict(min_mass=1.5), r"--min-mass must be in \(0, 1\]"),
    (dict(samples=300, targets="sampled", encoding="pack"), "--samples must be in 1..255"),
    (dict(kl_budget=1.0), "--kl-budget must be in 1e-05..0.01"),
    (dict(targets="sampled", min_prob=0.1, encoding="pack"), "--min-mass/--min-prob apply to --targets topk only"),
])
def test_bad_target_options(tmp_path, teacher_dir, corpus_dir, options, message):
    with pytest.raises(ConfigError, match=message):
        small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", **options)


@pytest.mark.parametrize("name", ["pack", "sampled"])
def test_verify_reads_packed_caches(caches, tmp_path, name):
    from ddk_cache.store.verify import verify_cache

    problems, checked = verify_cache(str(caches[name]))
    assert problems == [] and checked > 0
    # A packed row that passes its CRC but does not unpack is reported (here: a bad frame).
    import zarr

    damaged = copy_cache(caches[name], tmp_path / "d.zarr")
    arr = zarr.open_array(str(damaged / "alpha/train/targets"), mode="r+")
    row = arr[0]
    row[0] = 200  # stream count
    arr[0] = row
    problems, _ = verify_cache(str(damaged))
    assert any("does not decode" in str(p) for p in problems)


def test_fidelity_report(caches, built_cache):
    """plain-v1 top-k is exact (coarse KL ~ 0); pack-v1 adds about its KL budget."""
    from ddk_cache.capture.fidelity import fidelity

    exact = fidelity(Cache(str(built_cache)), sequences=2, device="cpu")
    packed = fidelity(Cache(str(caches["pack"])), sequences=2, device="cpu")
    assert exact["coarse_kl"] < 1e-6 and 0 < packed["coarse_kl"] < 2e-4
    assert exact["covered_mass"] == pytest.approx(packed["covered_mass"], rel=1e-6)  # same ids
    assert set(packed["bytes_per_token"]) >= {"targets", "tokens", "target_logprob"}
    assert packed["bytes_per_token"]["targets"] < exact["bytes_per_token"]["topk_ids"] + exact["bytes_per_token"]["topk_logprobs"]


def test_expected_size_is_printed_in_readable_units():
    from ddk_cache.capture.build import expected_size

    meta = {"domains": {"a": {"train": {"sequences": 100}, "val": {"sequences": 2}}}, "seq_len": 129}
    # 102 * 128 positions * (0.85 * 16 + 4 + 8) bytes = 334,234 bytes
    assert expected_size(meta, TargetSpec(k=16), "pack") == "expected cache size: about 326.4 KiB (18 B/position for the targets, 13,056 positions)"
