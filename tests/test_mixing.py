"""The DDK mixing rule against the paper's formulas, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddk_cache.train.mixing import Mixer, parse_static

DOMAINS = ["a", "b", "c"]


def test_first_update_is_smoothed_from_uniform_weights():
    """DDK's first weights: the smooth update applied to a uniform start, so the (1 - alpha)/N
    floor holds from the first interval on (the raw factor gave one domain 0.99)."""
    m = Mixer("ddk", DOMAINS, [10, 20, 30], alpha=0.5)
    np.testing.assert_allclose(m.weights, [1 / 3] * 3)
    s, t = [30.0, 10.0, 12.0], [10.0, 10.0, 6.0]
    w = m.update(s, t)
    e = [math.exp(3.0), math.exp(1.0), math.exp(2.0)]
    np.testing.assert_allclose(w, [0.5 * x / sum(e) + 0.5 / 3 for x in e], rtol=1e-12)
    assert w.min() >= 0.5 / 3
    raw = Mixer("ddk-nosmooth", DOMAINS, [10, 20, 30]).update(s, t)
    np.testing.assert_allclose(raw, [x / sum(e) for x in e], rtol=1e-12)


def test_smooth_update_formula():
    m = Mixer("ddk", DOMAINS, [1, 1, 1], alpha=0.5)
    r0 = m.update([30.0, 10.0, 12.0], [10.0, 10.0, 6.0]).copy()
    s, t = [20.0, 12.0, 9.0], [10.0, 10.0, 6.0]
    psi = [r0[i] * math.exp(s[i] / t[i]) for i in range(3)]
    expected = [0.5 * p / sum(psi) + 0.5 / 3 for p in psi]
    np.testing.assert_allclose(m.update(s, t), expected, rtol=1e-12)
    assert m.weights.min() >= 0.5 / 3  # the (1 - alpha)/N floor keeps every domain sampled


def test_nosmooth_is_the_raw_factor_every_time():
    m = Mixer("ddk-nosmooth", DOMAINS, [1, 1, 1])
    m.update([30.0, 10.0, 12.0], [10.0, 10.0, 6.0])
    w = m.update([20.0, 12.0, 9.0], [10.0, 10.0, 6.0])
    e = np.exp([2.0, 1.2, 1.5])
    np.testing.assert_allclose(w, e / e.sum())


def test_huge_ratios_do_not_overflow():
    m = Mixer("ddk", DOMAINS, [1, 1, 1])
    for _ in range(3):
        w = m.update([1e6, 5e5, 10.0], [1.0, 1.0, 1.0])
    assert np.isfinite(w).all() and abs(w.sum() - 1) < 1e-12
    np.testing.assert_allclose(w, [0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3], atol=1e-12)


def test_baselines():
    assert np.allclose(Mixer("uniform", DOMAINS, [1, 2, 3]).weights, [1 / 3] * 3)
    assert np.allclose(Mixer("natural", DOMAINS, [1, 2, 3]).weights, [1 / 6, 2 / 6, 3 / 6])
    static = Mixer("static:a=3,c=1", DOMAINS, [1, 2, 3])
    assert np.allclose(static.weights, [0.75, 0, 0.25])
    assert not static.adaptive
    np.testing.assert_array_equal(static.update([9.0, 9, 9], [1.0, 1, 1]), static.weights)


@pytest.mark.parametrize(
    "spec,message",
    [("x=1", "the cache has no domain 'x'"), ("a", "is not DOMAIN=WEIGHT"), ("a=-1", "must be >= 0"), ("a=0", "at least one domain"), ("a=z", "is not a number")],
)
def test_static_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_static(spec, DOMAINS)


def test_unknown_kind_and_alpha():
    with pytest.raises(ValueError, match="--mixing must be one of"):
        Mixer("greedy", DOMAINS, [1, 1, 1])
    with pytest.raises(ValueError, match="--ddk-alpha must be in"):
        Mixer("ddk", DOMAINS, [1, 1, 1], alpha=1.5)


def test_state_round_trip():
    m = Mixer("ddk", DOMAINS, [1, 1, 1])
    m.update([3.0, 1, 2], [1.0, 1, 1])
    n = Mixer("ddk", DOMAINS, [1, 1, 1])
    n.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(n.update([2.0, 2, 2], [1.0, 1, 1]), m.update([2.0, 2, 2], [1.0, 1, 1]))
