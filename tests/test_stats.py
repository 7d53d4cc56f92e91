"""Interval maths on hand-computed numbers."""

import numpy as np
import pytest

from rlflow.stats import paired_bootstrap, wilson_interval


def test_wilson_interval_hand_values():
    # 5/10, z = 1.96: denom = 1 + 3.8416/10 = 1.38416; centre = (0.5 + 0.19208)/1.38416 = 0.5;
    # half = 1.96 sqrt(0.025 + 3.8416/400)/1.38416 = 1.96 * 0.186022 / 1.38416 = 0.263414
    assert wilson_interval(5, 10) == pytest.approx((0.236586, 0.763414), abs=1e-5)
    # 2/3: denom = 2.280533; centre = (0.666667 + 0.640267)/2.280533 = 0.573086;
    # half = 1.96 sqrt(0.074074 + 0.106711)/2.280533 = 0.365431
    assert wilson_interval(2, 3) == pytest.approx((0.207655, 0.938517), abs=1e-5)
    # 0/10: lo 0, hi = (3.8416/10)/1.38416 = 0.277540
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap():
    assert paired_bootstrap(np.full(50, 0.25)) == pytest.approx((0.25, 0.25))
    d = np.array([1.0, -1.0] * 200)  # mean 0, sd 1: the 95% interval of the mean is about +-1.96/sqrt(400)
    lo, hi = paired_bootstrap(d)
    assert lo == pytest.approx(-0.098, abs=0.02) and hi == pytest.approx(0.098, abs=0.02)
    assert paired_bootstrap(d) == (lo, hi)  # seeded
    gain = np.concatenate([np.ones(60), np.zeros(452)])  # 60 of 512 images flip from fail to pass
    lo, hi = paired_bootstrap(gain)
    assert 0 < lo < 60 / 512 < hi
    with pytest.raises(ValueError, match="at least one pair"):
        paired_bootstrap(np.array([]))
