"""pack-v2 round trips on adversarial rows: decoded targets are distributions, ids exact, and
every position's coarse KL within the budget (not just on average)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddk_cache.store.pack2 import MAX_REFINE, Pack2Codec
from ddk_cache.store.targets import TargetSpec, adaptive_cut

BUDGET = 1e-4
SLACK = 1e-6  # float32 rounding of the decoded log-probs


def teacher_topk(P=64, V=5000, K=32, seed=0, scale=1.0):
    """Top-K of random Zipf-like distributions; `scale` multiplies the logits (temperature 1/scale)."""
    g = torch.Generator().manual_seed(seed)
    logits = (-torch.log(torch.arange(1, V + 1).float()) + torch.randn(P, V, generator=g) * 2.0) * scale
    logp = torch.log_softmax(logits.double(), -1)
    lp, ids = torch.topk(logp, K)
    nxt = torch.multinomial(logp.exp(), 1, generator=g)[:, 0]
    return ids.numpy().astype(np.int32), lp.float().numpy(), logp.gather(-1, nxt[:, None])[:, 0].float().numpy(), nxt.numpy()


def with_top1(p1: float, P=40, K=16, V=3000, seed=1):
    """Rows whose top-1 holds exactly p1; the rest of the mass spread Zipf-like over V-1 ids."""
    rng = np.random.default_rng(seed)
    rest = 1.0 / np.arange(2, V + 1) ** 1.2
    rows_ids, rows_lp = [], []
    for _ in range(P):
        perm = rng.permutation(V)
        w = rest * rng.uniform(0.5, 1.5, V - 1)
        w = w / w.sum() * (1 - p1)
        p = np.concatenate([[p1], w])
        order = np.argsort(-p, kind="stable")[:K]
        rows_ids.append(perm[order])
        rows_lp.append(np.log(p[order]))
    ids, lps = np.array(rows_ids, np.int32), np.array(rows_lp, np.float32)
    return ids, lps, lps[:, 0].copy(), ids[:, 0].copy()


def check(codec: Pack2Codec, ids, lps, target, nxt, budget=BUDGET):
    """Round-trip one sequence; assert the guarantees; return the per-position coarse KL."""
    P, K = ids.shape
    blob = codec.encode_topk(ids, lps, target, nxt)
    d_ids, d_lps, d_target = (a[0] for a in codec.decode([blob], P))
    kept = np.isfinite(lps.astype(np.float64)) & (np.exp(lps.astype(np.float64)) > 0)
    kept[:, 0] = True
    p = np.where(kept, np.exp(lps.astype(np.float64)), 0.0)
    p = np.where(p.sum(1, keepdims=True) > 1, p / p.sum(1, keepdims=True), p)
    kl = np.zeros(P)
    for t in range(P):
        want = np.sort(ids[t][kept[t]])
        n = len(want)
        np.testing.assert_array_equal(d_ids[t, :n], want)  # ids exact, ascending
        assert np.all(np.isneginf(d_lps[t, n:]))  # padding after the kept entries
        q = np.exp(d_lps[t, :n].astype(np.float64))
        assert (q > 0).all() and q.sum() <= 1 + SLACK, (t, q.sum())  # a distribution (tail >= 0)
        pt = p[t][kept[t]][np.argsort(ids[t][kept[t]])]
        tail_p, tail_q = max(0.0, 1 - pt.sum()), max(0.0, 1 - q.sum())
        kl[t] = np.sum(pt * np.log(pt / q)) + (tail_p * np.log(tail_p / max(tail_q, 1e-300)) if tail_p > 0 else 0.0)
        # the target: its kept entry, or its exact value
        if nxt[t] in ids[t][kept[t]]:
            assert d_target[t] == d_lps[t, int(np.searchsorted(want, nxt[t]))]
        else:
            assert d_target[t] == target[t]
    assert kl.max() <= budget * 1.001 + SLACK, (kl.max(), budget)
    return kl


@pytest.mark.parametrize("p1", [0.5, 0.9, 0.98, 0.998, 1 - 1e-6])
def test_peaked_rows_decode_to_distributions_within_the_budget(p1):
    ids, lps, target, nxt = with_top1(p1)
    kl = check(Pack2Codec(vocab_size=3000, max_entries=16, kl_budget=BUDGET), ids, lps, target, nxt)
    assert kl.mean() < BUDGET


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("V", [5000, 70000])  # 2 and 3 byte id planes
def test_flat_to_peaked_teachers(scale, V):
    ids, lps, target, nxt = teacher_topk(V=V, scale=scale)
    check(Pack2Codec(vocab_size=V, max_entries=32, kl_budget=BUDGET), ids, lps, target, nxt)


def test_ties_minus_inf_and_bf16_rounding():
    ids, lps, target, nxt = teacher_topk(P=30, K=16)
    tied = lps.copy()
    tied[:, 1:6] = tied[:, 1:2]  # exact ties
    check(Pack2Codec(vocab_size=5000, max_entries=16, kl_budget=BUDGET), ids, tied, target, nxt)
    holes = lps.copy()
    holes[::3, 8:] = -np.inf  # entries the teacher gives probability 0
    check(Pack2Codec(vocab_size=5000, max_entries=16, kl_budget=BUDGET), ids, holes, target, nxt)
    ids, lps, target, nxt = with_top1(0.995, K=64, V=64)
    bf16 = torch.tensor(lps).to(torch.bfloat16).float().numpy()  # a bf16 teacher's values
    bf16[::2, 0] = 0.0  # and rows where rounding made the top-1 p = 1: their sums pass 1
    assert (np.exp(bf16.astype(np.float64)).sum(1) > 1).any()
    check(Pack2Codec(vocab_size=3000, max_entries=64, kl_budget=BUDGET), ids, bf16, bf16[:, 0].copy(), nxt)


def test_adaptive_rows_keeping_only_the_top1_keep_their_tail():
    ids, lps, target, nxt = with_top1(0.95, K=8)
    cut = adaptive_cut(lps, TargetSpec(k=8, min_mass=0.9))  # every row: the top-1 alone
    assert (np.isfinite(cut).sum(1) == 1).all()
    codec = Pack2Codec(vocab_size=3000, max_entries=8, kl_budget=BUDGET)
    check(codec, ids, cut, target, nxt)
    _, d_lps, _ = codec.decode([codec.encode_topk(ids, cut, target, nxt)], len(ids))
    tail = 1 - np.exp(d_lps[0, :, 0].astype(np.float64))
    np.testing.assert_allclose(tail, 0.05, rtol=0.02)  # the tail bucket survives


def test_every_id_kept_means_no_tail():
    V = 64
    ids, lps, target, nxt = teacher_topk(P=20, V=V, K=V)
    codec = Pack2Codec(vocab_size=V, max_entries=V, kl_budget=BUDGET)
    check(codec, ids, lps, target, nxt)


@pytest.mark.parametrize("K", [256, 1024])
def test_many_entries_per_position(K):
    ids, lps, target, nxt = teacher_topk(P=12, V=50000, K=K, scale=2.0)
    check(Pack2Codec(vocab_size=50000, max_entries=K, kl_budget=BUDGET), ids, lps, target, nxt)


@pytest.mark.parametrize("budget", [1e-5, 1e-3])
def test_the_bound_follows_the_budget(budget):
    ids, lps, target, nxt = teacher_topk(P=60, K=32, scale=1.5)
    kl = check(Pack2Codec(vocab_size=5000, max_entries=32, kl_budget=budget), ids, lps, target, nxt, budget=budget)
    assert kl.mean() > budget / 20  # the budget is used, not wasted


def test_hard_rows_get_a_finer_step():
    """A position the base step cannot fit in the budget (many mid-sized entries under a small
    top-1) is refined, and only it."""
    K, P = 64, 4
    p = np.full((P, K), 0.9 / K)
    p[:, 0] = 0.1
    ids = np.tile(np.arange(K, dtype=np.int32), (P, 1))
    lps = np.log(p).astype(np.float32)
    codec = Pack2Codec(vocab_size=1000, max_entries=K, kl_budget=1e-6)
    check(codec, ids, lps, lps[:, 0], ids[:, 0], budget=1e-6)
    assert MAX_REFINE >= 4


def test_sampled_rows_round_trip():
    rng = np.random.default_rng(0)
    P, K = 50, 20
    ids = np.stack([rng.choice(5000, K, replace=False) for _ in range(P)]).astype(np.int32)
    counts = rng.integers(0, 4, (P, K))
    counts[:, 0] = np.maximum(counts[:, 0], 1)
    target = rng.normal(-3, 1, P).astype(np.float32)
    codec = Pack2Codec(vocab_size=5000, max_entries=K, kl_budget=BUDGET, sampled=True)
    d_ids, d_lw, d_t = (a[0] for a in codec.decode([codec.encode_sampled(ids, counts, None, target)], P))
    for t in range(P):
        keep = counts[t] > 0
        order = np.argsort(ids[t][keep])
        n = keep.sum()
        np.testing.assert_array_equal(d_ids[t, :n], ids[t][keep][order])
        np.testing.assert_allclose(np.exp(d_lw[t, :n]), counts[t][keep][order] / counts[t].sum(), rtol=1e-6)
    np.testing.assert_array_equal(d_t, target)  # exact


def test_a_batch_decodes_like_its_rows_one_by_one():
    codec = Pack2Codec(vocab_size=5000, max_entries=32, kl_budget=BUDGET)
    rows = [teacher_topk(seed=s, scale=1 + s) for s in range(4)]
    cut = [(i, adaptive_cut(l, TargetSpec(k=32, min_prob=1e-3)) if s % 2 else l, g, n) for s, (i, l, g, n) in enumerate(rows)]
    blobs = [codec.encode_topk(*r) for r in cut]
    batch = codec.decode(blobs, 64)
    for b, blob in enumerate(blobs):
        one = codec.decode([blob], 64)
        for x, y in zip(batch, one):
            np.testing.assert_array_equal(x[b], y[0])


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_byte_planes_gather_into_any_wide_enough_dtype(width):
    """Decoders assemble level steps and ids straight into their output arrays (int32 ids,
    float32 steps): every width, every destination dtype that holds it, rows of any count."""
    from ddk_cache.store.pack2 import _gather_planes, _workspace

    rng = np.random.default_rng(width)
    rows = [rng.integers(0, 2 ** (8 * width), n, dtype=np.uint64) for n in (5, 0, 7)]
    rows[0][0] = 2 ** (8 * width) - 1  # every bit of the widest value set
    streams = [b"".join(((r >> np.uint64(8 * j)) & np.uint64(255)).astype(np.uint8).tobytes() for j in range(width))
               for r in rows]
    counts, want = np.array([5, 0, 7]), np.concatenate(rows)
    assert (_gather_planes(streams, counts, width, _workspace(), "t").astype(np.uint64) == want).all()
    dtypes = [np.int64, np.float64] + ([np.int32] if width <= 3 else []) + ([np.float32] if width <= 2 else [])
    for dtype in dtypes:
        out = np.full(12, 7, dtype)
        _gather_planes(streams, counts, width, _workspace(), "t", out=out)
        assert (out.astype(np.uint64) == want).all(), dtype


@pytest.mark.parametrize("k", [8, 1024, 5000])
def test_first_n_masks_with_and_without_the_table(k):
    """Ragged rows' kept slots: the same mask from the cached table (k <= 1024) and from a
    comparison (larger k, where a table would take k^2 bytes: 2.4 GB at k = V = 49,152)."""
    from ddk_cache.store.pack2 import _workspace

    n = np.array([1, k, 3, min(k, 7), 2])
    width = int(n.max())
    got = _workspace().first_n(n, width, k)
    assert got.shape == (5, width) and np.array_equal(got, np.arange(width)[None, :] < n[:, None])
    assert ("first_n", k) not in _workspace().constants or k <= 1024
