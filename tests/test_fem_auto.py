"""Settings the FEM chooses from the data (glymphmpi.fem.auto): pure numpy, no DOLFINx."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glymphmpi.errors import InputError
from glymphmpi.fem import auto as A


def test_noise_level_from_pre_contrast_scan():
    """sigma = upper quartile / 0.6745 of the t <= 0 scan, in the scaled units, also when the loader clipped its
    negative values to 0; none without a pre-contrast scan."""
    rng = np.random.default_rng(0)
    mask = np.ones((20, 20, 20), dtype=bool)
    scans = np.stack([0.3 * rng.standard_normal(mask.shape), 5 + rng.standard_normal(mask.shape)])
    sigma, rule = A.noise_level([0.0, 2.0], scans, mask, None, scale=2.0)
    assert sigma == pytest.approx(0.3 / 2.0, rel=0.05) and "pre-contrast" in rule
    clipped = np.maximum(scans, 0.0)
    assert A.noise_level([0.0, 2.0], clipped, mask, None, scale=2.0)[0] == pytest.approx(sigma, rel=1e-12)
    sigma, rule = A.noise_level([0.5, 2.0], scans, mask, None, scale=2.0)
    assert sigma is None and "unknown" in rule
    sigma, _ = A.noise_level([0.5, 2.0], scans, mask, 0.4, scale=2.0)
    assert sigma == pytest.approx(0.2)


def test_data_scale_is_robust_and_refuses_bad_data():
    mask = np.ones((5, 5, 5), dtype=bool)
    scans = np.zeros((3, 5, 5, 5))
    scans[1] = 2.0
    scans[2, 0, 0, 0] = 1e9  # one outlier does not set the scale
    assert A.data_scale(scans, mask) == pytest.approx(2.0)
    assert A.data_scale(scans * 1e-6, mask) == pytest.approx(2e-6)
    with pytest.raises(InputError, match="zero everywhere"):
        A.data_scale(np.zeros((3, 5, 5, 5)), mask)
    bad = scans.copy()
    bad[1, 2, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        A.data_scale(bad, mask)


def test_time_step_and_memory_estimate():
    """The automatic step is the shortest spacing / 7 (1 h for 0, 7, 24, 46 h); a step that
    would need more memory than the machine has is refused up front, naming the estimate."""
    assert A.auto_dt([0.0, 7.0, 24.0, 46.0]) == pytest.approx(1.0)
    assert A.count_steps([0.0, 7.0, 24.0, 46.0], 1.0) == 46
    assert A.count_steps([0.0, 2.5, 7.0], 1.0, 8.0) == 3 + 5 + 1
    mask = np.ones((30, 30, 30), dtype=bool)
    assert A.check_memory([0.0, 7.0, 24.0, 46.0], 1.0, None, mask) == 46
    with pytest.raises(InputError, match=r"GiB.*fem.dt_h") as exc:
        A.check_memory([0.0, 7.0, 24.0, 46.0], 1e-7, None, mask)
    assert "460,000,000 time steps" in str(exc.value)


def test_morozov_pick_interpolates_in_log_log():
    recs = [{"scale": 1.0, "misfit": 100.0}, {"scale": 0.1, "misfit": 10.0}, {"scale": 0.01, "misfit": 1.0}]
    s, rule = A.morozov_pick(recs, 3.1622776601683795)  # halfway between 10 and 1 in log
    assert s == pytest.approx(10 ** -1.5) and "Morozov" in rule
    s, rule = A.morozov_pick(recs, 0.5)
    assert s is None and "not reached" in rule
    s, rule = A.morozov_pick(recs, 500.0)
    assert s is None and "strongest" in rule


def test_lcurve_corner():
    """An L: misfit flat for strong scales... the corner is where both bend."""
    recs = []
    for s, (rho, eta) in zip((1.0, 0.1, 0.01, 1e-3, 1e-4), ((100.0, 1.0), (10.0, 1.1), (1.0, 1.2), (0.95, 10.0),
                                                           (0.9, 100.0))):
        recs.append({"scale": s, "misfit": rho, "R": eta * s})
    assert A.lcurve_pick(recs) == 2


def test_interval():
    lo, hi = A.interval(0.7, 0.01, 0.005)
    assert lo == pytest.approx(0.7 - 0.0246) and hi == pytest.approx(0.7 + 0.0246)
    assert math.isclose(sum(A.interval(1.0, 0.0, 0.0)), 2.0)
