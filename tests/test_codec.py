"""pack-v1 round trips: ids and counts exact, log-probs within the documented bounds, KL near the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddk_cache.store.codec import TAIL_STEP, TOP1_STEP, PackCodec, step_for_budget
from ddk_cache.store.targets import TargetSpec, adaptive_cut, sample_from_logprobs


def teacher_topk(P=50, V=5000, K=32, seed=0, peak=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = -torch.log(torch.arange(1, V + 1).float()) + torch.randn(P, V, generator=g) * peak
    logp = torch.log_softmax(logits, -1)
    lp, ids = torch.topk(logp, K)
    return ids.numpy().astype(np.int32), lp.numpy(), logp


def by_id(ids, lps):
    o = np.argsort(ids, 1, kind="stable")
    return np.take_along_axis(ids, o, 1), np.take_along_axis(lps, o, 1)


def coarse_kl(lp, dlp):
    """Mean KL(teacher k entries + tail || decoded k entries + tail), entries aligned."""
    p, q = np.exp(lp.astype(np.float64)), np.exp(dlp.astype(np.float64))
    tp, tq = 1 - p.sum(1), 1 - q.sum(1)
    return float(((p * (np.log(p) - np.log(q))).sum(1) + tp * np.log(tp / tq)).mean())


@pytest.mark.parametrize("V", [5000, 70000])  # 2 and 3 byte planes per id gap
@pytest.mark.parametrize("budget", [1e-5, 1e-4])
def test_topk_round_trip_within_bounds(V, budget):
    ids, lps, _ = teacher_topk(V=V)
    c = PackCodec(vocab_size=V, max_entries=32, step=step_for_budget(budget, 32))
    d_ids, d_lps = c.decode_topk(c.encode_topk(ids, lps), len(ids))
    s_ids, s_lps = by_id(ids, lps)
    assert np.array_equal(d_ids, s_ids)  # ids exact, ascending
    # Top-1 within half a step; the kept mass (so the tail bucket) within half a tail step.
    top = np.take_along_axis(d_lps, np.argmax(s_lps, 1)[:, None], 1)[:, 0]
    assert np.abs(top - lps[:, 0]).max() <= TOP1_STEP / 2 + 1e-6
    tail, d_tail = 1 - np.exp(lps.astype(np.float64)).sum(1), 1 - np.exp(d_lps.astype(np.float64)).sum(1)
    assert np.abs(np.log(d_tail) - np.log(tail)).max() <= TAIL_STEP / 2 + 1e-5
    kl = coarse_kl(s_lps, d_lps)
    # The budget covers the quantised entries; the top-1 step adds up to p1 * (2^-8)^2 / 2 < 8e-6.
    assert 0.3 * budget < kl < 1.2 * budget + 8e-6


def test_adaptive_rows_keep_their_counts():
    ids, lps, _ = teacher_topk()
    cut = adaptive_cut(lps, TargetSpec(k=32, min_mass=0.3, min_prob=1e-3))
    kept = np.isfinite(cut).sum(1)
    assert kept.min() >= 1 and kept.max() < 32  # really ragged
    c = PackCodec(vocab_size=5000, max_entries=32, step=step_for_budget(1e-4, 32))
    d_ids, d_lps = c.decode_topk(c.encode_topk(ids, cut), len(ids))
    assert np.array_equal(np.isfinite(d_lps).sum(1), kept)
    for t in range(len(ids)):
        assert np.array_equal(d_ids[t, : kept[t]], np.sort(ids[t, : kept[t]]))
        assert (d_ids[t, kept[t] :] == 0).all() and np.isneginf(d_lps[t, kept[t] :]).all()


def test_adaptive_cut_rules():
    lp = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.01]], np.float32))
    assert np.isfinite(adaptive_cut(lp, TargetSpec(k=5, min_mass=0.75))).sum() == 2
    assert np.isfinite(adaptive_cut(lp, TargetSpec(k=5, min_prob=0.08))).sum() == 3
    assert np.isfinite(adaptive_cut(lp, TargetSpec(k=5, min_prob=0.9))).sum() == 1  # top-1 always


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_sampled_round_trip(temperature):
    _, _, logp = teacher_topk(V=3000)
    spec = TargetSpec(kind="sampled", k=64, samples=50, sample_temperature=temperature)
    ids, counts, lps = sample_from_logprobs(logp, spec, torch.Generator().manual_seed(0))
    assert (counts.sum(1) == 50).all()
    c = PackCodec(vocab_size=3000, max_entries=spec.entries, step=1.0)
    blob = c.encode_sampled(ids, counts, lps if temperature != 1.0 else None)
    d_ids, d_lw = c.decode_sampled(blob, len(ids), temperature)
    w = np.exp(d_lw.astype(np.float64))
    assert np.allclose(np.where(np.isfinite(d_lw), w, 0).sum(1), 1.0, atol=1e-6)
    for t in range(len(ids)):
        keep = counts[t] > 0
        o = np.argsort(ids[t][keep])
        assert np.array_equal(d_ids[t, : keep.sum()], ids[t][keep][o])
        expect = counts[t][keep][o].astype(np.float64)
        if temperature != 1.0:
            expect = expect * np.exp(lps[t][keep][o] * (1 - 1 / temperature))
        assert np.allclose(w[t, : keep.sum()], expect / expect.sum(), rtol=2e-3)


def test_sampled_targets_are_unbiased():
    _, _, logp = teacher_topk(P=1, V=200, peak=1.0)
    logp = logp.expand(4000, -1)
    ids, counts, _ = sample_from_logprobs(logp, TargetSpec(kind="sampled", samples=50), torch.Generator().manual_seed(1))
    mean = np.zeros(200)
    np.add.at(mean, ids.ravel(), counts.ravel() / 50 / 4000)
    assert np.abs(mean - logp[0].exp().numpy()).max() < 0.01
