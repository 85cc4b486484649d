"""Every divergence is exact from a default (pack-v3) cache: the gradient w.r.t. the student's
logits from the decoded targets equals, to cosine >= 0.9999 and relative error <= 1e-3, the
same loss on the teacher's exact log-probs at the cached ids (and its exact tail), in float64,
on adversarial rows: top-1 of 0.9, 0.999 and 1 - 1e-6, entries down to 1e-12, ties (also
with the top-1), dropped entries (-inf), k = V with an adaptive cut. pack-v2 is shown failing the same check for the
losses `distill` refuses on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddk_cache.store.encodings import Layout, PackV2, PackV3, RowScores
from ddk_cache.store.targets import TargetSpec, adaptive_cut
from ddk_cache.train.losses import KDConfig, sparse_kd

KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "akl")
V, K = 512, 64


def adversarial_teacher(seed: int = 0) -> np.ndarray:
    """float64 log-probs [P, V]: rows with top-1 0.9, 0.999, 1 - 1e-6; a long tail of entries
    from 1e-3 down to 1e-12; exact ties; plus ordinary flat rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for p1 in (0.9, 0.999, 1 - 1e-6):
        for _ in range(4):
            rest = np.exp(rng.uniform(np.log(1e-12), np.log(1e-3), V - 1))
            rest[:8] = rest[0]  # ties
            rest *= (1 - p1) / rest.sum()
            rows.append(np.log(np.concatenate([[p1], rest])))
    for _ in range(6):
        z = rng.normal(0, 2, V)
        rows.append(z - np.logaddexp.reduce(z))
    for top in (2, 3):  # the top-1 tied with the next entries (their level is the top-1's)
        z = rng.normal(0, 2, V)
        z[:top] = z.max() + 1.0
        rows.append(z - np.logaddexp.reduce(z))
    out = np.stack(rows)
    return np.stack([rng.permutation(r) for r in out])  # the top-1 anywhere


def student(P: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (P, V))


def encode_decode(encoding, lp: np.ndarray, spec: TargetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """The build's path for one sequence: top-k (and the adaptive cut), the exact tail from the
    full distribution, encode, decode. Returns (ids, exact kept log-probs, exact tail, decoded
    log-probs, decoded tail), entries in the decoded order."""
    P = len(lp)
    order = np.argsort(-lp, 1, kind="stable")[:, : spec.k]
    vals = np.take_along_axis(lp, order, 1)
    kept = adaptive_cut(vals.astype(np.float32), spec)
    keep = np.isfinite(kept)
    outside = np.ones_like(lp, bool)
    np.put_along_axis(outside, np.where(keep, order, order[:, :1]), False, 1)
    tail = np.where(outside.any(1), np.logaddexp.reduce(np.where(outside, lp, -np.inf), 1), -np.inf)
    nxt = order[:, 0]
    row = RowScores(order.astype(np.int32), kept, vals[:, 0].astype(np.float32), nxt, tail_logprob=tail)
    layout = Layout(positions=P, entries=spec.k, vocab_size=V, targets=spec)
    blob = encoding.encode(row, layout)["targets"]
    t = encoding.decode({"targets": [blob]}, layout)
    ids = t.ids[0].astype(np.int64)
    dec = t.logprobs[0].astype(np.float64)
    exact = np.where(np.isfinite(dec), np.take_along_axis(lp, ids, 1), -np.inf)
    dec_tail = None if t.tail_logprob is None else t.tail_logprob[0].astype(np.float64)
    return ids, exact, tail, dec, dec_tail


def gradient(kind: str, ids: np.ndarray, lps: np.ndarray, tail: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    t = None if tail is None else torch.tensor(tail, dtype=torch.float64)
    sparse_kd(zt, torch.tensor(ids), torch.tensor(lps, dtype=torch.float64), KDConfig(kind), tail_logprob=t).sum().backward()
    return zt.grad.numpy().ravel()


def agreement(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(g @ ref / np.linalg.norm(g) / np.linalg.norm(ref)), float(np.linalg.norm(g - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("spec", [TargetSpec(k=K), TargetSpec(k=16), TargetSpec(k=V, min_mass=0.999)], ids=["top-64", "top-16", "k=V+min-mass"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_divergence_is_exact_from_pack_v3(kind, spec):
    lp = adversarial_teacher()
    z = student(len(lp))
    ids, exact, tail, dec, dec_tail = encode_decode(PackV3(), lp, spec)
    cos, rel = agreement(gradient(kind, ids, dec, dec_tail, z), gradient(kind, ids, exact, tail, z))
    assert cos >= 0.9999 and rel <= 1e-3, (cos, rel)


@pytest.mark.parametrize("kind", ["rkl", "akl"])
def test_pack_v2_fails_the_same_check(kind):
    """Why distill refuses these losses on pack-v2 caches: the same rows, the same check."""
    lp = adversarial_teacher()
    z = student(len(lp))
    ids, exact, tail, dec, _ = encode_decode(PackV2(), lp, TargetSpec(k=K))
    _, rel = agreement(gradient(kind, ids, dec, None, z), gradient(kind, ids, exact, tail, z))
    assert rel > 1e-2


def test_k_equals_v_with_min_mass_decodes_the_teachers_distribution():
    """k = V and --min-mass: the entries the cut drops are the tail (pack-v2 forced it to 0 and
    decoded the top-1 ~0.18 too high); every decoded probability within 1e-3 of the teacher's."""
    lp = adversarial_teacher(seed=3)
    ids, exact, tail, dec, dec_tail = encode_decode(PackV3(), lp, TargetSpec(k=V, min_mass=0.9))
    p, q = np.exp(exact), np.exp(dec)
    assert np.abs(np.where(np.isfinite(dec), p - q, 0)).max() <= 1e-3
    assert np.abs(np.exp(tail) - np.exp(dec_tail)).max() <= 1e-3
    np.testing.assert_allclose(q.sum(1) + np.exp(dec_tail), 1.0, atol=1e-6)  # float32 log-probs


def test_the_encoder_refuses_non_finite_teacher_output():
    lp = adversarial_teacher()[:4]
    order = np.argsort(-lp, 1)[:, :8]
    vals = np.take_along_axis(lp, order, 1).astype(np.float32)
    layout = Layout(positions=4, entries=8, vocab_size=V, targets=TargetSpec(k=8))
    for bad in (np.nan, np.inf):
        broken = vals.copy()
        broken[2, 3 if bad != np.inf else 0] = bad
        row = RowScores(order.astype(np.int32), broken, vals[:, 0], order[:, 0])
        with pytest.raises(ValueError, match="non-finite teacher log-probability at position 2"):
            PackV3().encode(row, layout)


@pytest.mark.parametrize("k", [1, 2, 16, 64, 128])
def test_level_running_sums_are_exact_or_handed_back(k):
    """pack-v3 sums each row's level steps as a float32 product (BLAS): exact integers while a
    row's total is below 2^24, and None (the caller sums in int64) from there, never a
    rounded level."""
    from ddk_cache.store.pack2 import _workspace
    from ddk_cache.store.pack3 import _running_sums

    rng = np.random.default_rng(k)
    steps = rng.integers(0, 2**16, (40, k - 1)).astype(np.float32)
    steps[:20] %= 300  # one-byte steps, as most rows have
    want = np.concatenate([np.zeros((40, 1), np.int64), np.cumsum(steps.astype(np.int64), 1)], 1)
    got = _running_sums(steps, _workspace())
    assert got is not None and np.array_equal(got, want)
    if k > 1:  # one row with a total of exactly 2^24: handed back; 2^24 - 1: exact
        big = steps.copy()
        big[3] = 0
        big[3, 0] = 2**24 - 1
        want[3] = np.concatenate([[0], np.cumsum(big[3].astype(np.int64))])
        assert np.array_equal(_running_sums(big, _workspace()), want)
        big[3, -1] += 1
        assert _running_sums(big, _workspace()) is None


@pytest.fixture(params=["compiled", "numpy"])
def decoder(request, monkeypatch):
    """Each pack-v3 decode test runs on both decoders: the compiled one (pack3_jit, the
    default) and the numpy paths (DDK_CACHE_JIT=0, where numba is missing)."""
    from ddk_cache.store.pack3 import _jit

    if request.param == "numpy":
        monkeypatch.setenv("DDK_CACHE_JIT", "0")
        assert _jit() is None
    else:
        monkeypatch.delenv("DDK_CACHE_JIT", raising=False)
        assert _jit() is not None, "numba is a dependency: the compiled decoder must load"
    return request.param


def spec_decode(codec, frame: bytes, P: int) -> tuple[np.ndarray, np.ndarray]:
    """pack-v3 decoded from storage_layout.md alone, one position at a time in float64: (ids,
    log-probs) [P, K], padding id 0 / -inf. The reference for the codec's vectorised paths."""
    from ddk_cache.store.pack3 import HAS_TAIL, REFINE_SHIFT, expand
    from ddk_cache.store.planes import unplanes

    head, (s_pos, s_ids, s_steps, _) = codec._unframe(frame)
    cb, K = codec.count_bytes, codec.max_entries
    n = unplanes(s_pos, P, cb).astype(np.int64)
    flags = np.frombuffer(s_pos, np.uint8, P, P * cb)
    tail_z = unplanes(s_pos, P, head[6], 2 * P * cb + P).astype(np.int64)
    ids = unplanes(s_ids, int(n.sum()), codec.id_bytes).astype(np.int64)
    steps = unplanes(s_steps, int((n - 1).sum()), head[5]).astype(np.int64)
    out_ids, out = np.zeros((P, K), np.int64), np.full((P, K), -np.inf)
    at_id = at_step = 0
    for t in range(P):
        h = codec.step / 2.0 ** int(flags[t] >> REFINE_SHIFT)
        levels = np.concatenate([[0], np.cumsum(steps[at_step : at_step + n[t] - 1])])
        r = expand(levels * h, codec.knee)
        m = tail_z[t] >> 1
        tail_q = np.exp(-(-m * h if tail_z[t] & 1 else m * h)) if flags[t] & HAS_TAIL else 0.0
        out[t, : n[t]] = -r - np.log1p(np.exp(-r[1:]).sum() + tail_q)
        out_ids[t, : n[t]] = ids[at_id : at_id + n[t]]
        at_id, at_step = at_id + n[t], at_step + n[t] - 1
    return out_ids, out


def encode_rows(codec, z: np.ndarray, cut: slice | None = None) -> bytes:
    """Logits [P, V] -> one pack-v3 frame of their top-k (rows `cut` keep only part of it)."""
    k = codec.max_entries
    lp = z - np.logaddexp.reduce(z, 1, keepdims=True)
    order = np.argsort(-lp, 1, kind="stable")[:, :k]
    vals = np.take_along_axis(lp, order, 1)
    if cut is not None:
        vals[cut] = -np.inf
    return codec.encode_topk(order, vals, vals[:, 0], order[:, 0])


def assert_batches_decode_as_the_spec_says(codec, frames: list, P: int, tol: float) -> None:
    for batch in [[i] for i in range(len(frames))] + [list(range(len(frames)))]:
        got = codec.decode([frames[i] for i in batch], P)
        for j, i in enumerate(batch):
            ids, want = spec_decode(codec, frames[i], P)
            np.testing.assert_array_equal(got[0][j], ids)
            np.testing.assert_allclose(got[1][j], want, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [64, 200])
def test_refined_rows_decode_as_the_spec_says_in_every_path(k, decoder):
    """Rows the encoder had to refine (a coarse step whose renormalisation error passes the
    bound: entries on one level holding most of the mass) take the decoder's float64 path;
    full and cut rows, below and above the float32 running sums' width (RUN_MAX), alone and
    in a batch with unrefined rows: each equal to the spec's decode."""
    from ddk_cache.store.pack3 import REFINE_SHIFT, RUN_MAX, Pack3Codec

    rng = np.random.default_rng(k)
    codec = Pack3Codec(vocab_size=V, max_entries=k, step=0.5, knee=0.5)
    frames = []
    for cut in (None, (slice(None, None, 3), slice(k // 2, None))):
        z = np.full((20, V), -12.0)
        z[:, 0], z[:, 1:k] = 0.0, -2.0 + rng.uniform(-0.01, 0.01, (20, k - 1))
        z[10:] = rng.normal(0, 2, (10, V))  # unrefined rows in the same frame
        frames.append(encode_rows(codec, z, cut))
        head, streams = codec._unframe(frames[-1])
        assert (np.frombuffer(streams[0], np.uint8, 20, 20 * codec.count_bytes) >> REFINE_SHIFT).any()  # refined
    assert (k > RUN_MAX) == (k == 200)
    assert_batches_decode_as_the_spec_says(codec, frames, 20, 1e-6)


@pytest.mark.parametrize("k", [2, 63, 64, 65, 128])
def test_running_sums_equal_integer_cumsum(k):
    """The float32 running sums of level steps (one product with a triangular matrix, for
    rows up to RUN_MAX wide) equal numpy's int64 cumsum exactly, and give up (None) exactly
    when a row's total reaches 2^24."""
    from ddk_cache.store.pack3 import _running_sums, _workspace

    rng = np.random.default_rng(k)
    steps = rng.integers(0, 1 << 16, (37, k - 1)).astype(np.float32)
    steps[5] = 0
    steps[6] = (1 << 24) // max(1, k) // 2  # a large but exact total
    steps[6, : (k - 1) // 2] = rng.integers(0, 3, (k - 1) // 2)
    steps[7] *= (rng.random(k - 1) < 0.3)  # mostly zero steps (ragged padding)
    want = np.zeros((37, k), np.int64)
    np.cumsum(steps.astype(np.int64), axis=1, out=want[:, 1:])
    assert want[:, -1].max() < 1 << 24
    got = _running_sums(steps, _workspace())
    np.testing.assert_array_equal(got, want)
    big = steps.copy()
    big[3] = 0
    big[3, -1] = float(1 << 24)  # a total of exactly 2^24
    assert _running_sums(big, _workspace()) is None


@pytest.mark.parametrize("k, scale", [(16, 1.0), (64, 1.0), (64, 8.0), (200, 1.0)])
def test_unrefined_rows_decode_as_the_spec_says(k, scale, decoder):
    """The float32 fast paths (full rows, cut rows, rows keeping 2 of k: the sparse path; one-
    and two-byte steps) against the spec's float64 decode, to float32 rounding."""
    from ddk_cache.store.pack3 import Pack3Codec

    rng = np.random.default_rng(k)
    codec = Pack3Codec(vocab_size=V, max_entries=k)
    cuts = (None, (slice(None, None, 4), slice(k // 3, None)), (slice(1, None), slice(2, None)))  # full, some cut, sparse
    frames = [encode_rows(codec, rng.normal(0, 2, (30, V)) * scale, cut) for cut in cuts]
    assert_batches_decode_as_the_spec_says(codec, frames, 30, 2e-6)


def test_a_batch_decodes_as_its_sequences_do_alone(decoder):
    """The loader decodes sequences of a batch together, by paths that depend on the batch
    (every frame's level steps in one byte, or some in two; every row full, or some cut):
    each sequence must come out as it does alone, and within pack-v3's bound. Sequence 4
    keeps few entries per row: alone it takes the sparse (scatter) path, beside full rows
    the block path."""
    from ddk_cache.store.pack3 import Pack3Codec

    rng = np.random.default_rng(3)
    flat = [rng.normal(0, 0.3, (20, V)) for _ in range(2)]  # small steps: one byte each
    seqs = [z - np.logaddexp.reduce(z, 1, keepdims=True) for z in flat] + [adversarial_teacher(s) for s in (4, 5, 6)]  # 20 rows each
    codec = Pack3Codec(vocab_size=V, max_entries=K)
    frames, exact = [], []
    for i, lp in enumerate(seqs):
        order = np.argsort(-lp, 1, kind="stable")[:, :K]
        vals = np.take_along_axis(lp, order, 1)
        if i == 3:
            vals[::3, 40:] = -np.inf  # some rows cut: not every row full
        if i == 4:
            vals[1:, 3:] = -np.inf  # all rows but one keep 3 of K entries
        frames.append(codec.encode_topk(order, vals, vals[:, 0], order[:, 0]))
        exact.append((order, vals))
    widths = [codec._unframe(f)[0][5] for f in frames]
    assert 1 in widths and max(widths) >= 2
    for batch in ([0, 1], [0, 2], [1, 3], [0, 1, 2, 3], [4, 1], [3, 4], [4]):
        together = codec.decode([frames[i] for i in batch], 20, tail=True)
        for j, i in enumerate(batch):
            alone = codec.decode([frames[i]], 20, tail=True)
            for a, b in zip(together, alone):
                np.testing.assert_array_equal(a[j], b[0])
            ids, lps = exact[i]
            kept = np.isfinite(lps)
            assert np.array_equal(np.where(kept, together[0][j], 0), np.where(kept, ids, 0))
            # Decoded values are renormalised over kept + tail; compare log-ratios to the top-1.
            r, d = lps[:, :1] - lps, together[1][j][:, :1].astype(np.float64) - together[1][j]
            assert (np.abs(np.where(kept, d - r, 0)) <= codec.step * np.maximum(1, r / codec.knee) * 2 + 1e-5).all()


def test_a_frame_whose_counts_disagree_with_its_streams_is_refused(decoder):
    """The compiled decoder reads without bounds checks, so a frame's entry counts are checked
    against its streams' lengths first: a row claiming one more entry than its frame holds is
    an error, not a read past the buffer."""
    from ddk_cache.store.pack3 import Pack3Codec

    codec = Pack3Codec(vocab_size=V, max_entries=16)
    frame = encode_rows(codec, np.random.default_rng(0).normal(0, 2, (10, V)), (slice(None, None, 2), slice(8, None)))
    head, streams = codec._unframe(frame)
    pos = bytearray(streams[0])
    pos[0] += 1  # row 0: 9 entries claimed, 8 stored
    bad = codec._frame3(head[2], head[5], head[6], [bytes(pos), *streams[1:]], [3, 7, 3, 3])
    with pytest.raises(ValueError):
        codec.decode([bad], 10)
    if decoder == "compiled":
        with pytest.raises(ValueError, match="entry counts do not match its streams"):
            codec.decode([frame, bad], 10)


def test_three_byte_ids_decode_as_the_spec_says(decoder):
    """Vocabularies past 65,536 ids (Qwen's 151,936) store ids in three byte planes: the
    compiled decoder's general plane path, against the spec's decode."""
    from ddk_cache.store.pack3 import Pack3Codec

    rng = np.random.default_rng(7)
    P, k, vocab = 12, 16, 151_936
    codec = Pack3Codec(vocab_size=vocab, max_entries=k)
    assert codec.id_bytes == 3
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(P)])
    z = rng.normal(0, 2, (P, k + 100))
    lp = z - np.logaddexp.reduce(z, 1, keepdims=True)
    vals = -np.sort(-lp, 1)[:, :k]
    vals[::3, 9:] = -np.inf  # some rows cut
    frame = codec.encode_topk(ids, vals, vals[:, 0], ids[:, 0])
    assert (ids >= 65536).any()
    assert_batches_decode_as_the_spec_says(codec, [frame], P, 2e-6)
