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
    same = np.stack([0.3 * rng.standard_normal(mask.shape), 5 + 0.3 * rng.standard_normal(mask.shape)])
    sigma, rule = A.noise_level([0.5, 2.0], same, mask, None, scale=2.0)
    assert sigma == pytest.approx(0.3 / 2.0, rel=0.05) and "high-pass" in rule  # no pre-contrast: the scans'
    thin = np.zeros((20, 20, 20), dtype=bool)
    thin[:, :, 5] = True  # one voxel thick: no voxel has all six neighbours
    sigma, rule = A.noise_level([0.5, 2.0], scans, thin, None, scale=2.0)
    assert sigma is None and "unknown" in rule
    sigma, _ = A.noise_level([0.5, 2.0], scans, mask, 0.4, scale=2.0)
    assert sigma == pytest.approx(0.2)


def _smooth_field(shape, t):
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return np.exp(-((x - 12) ** 2 + (y - 10) ** 2 + (z - 11) ** 2) / (4.0 * 0.7 * t + 30.0))


def test_highpass_noise_estimate_on_smooth_fields_clipped_or_zero_baseline():
    """sigma from the scans' high-pass residual: within 5% of the true sigma on smooth (diffusion-like) fields
    with noise, also after negatives were clipped to 0; a baseline-subtracted (all-zero) pre-contrast scan is
    not taken as 'noise-free' but falls back to it, and says so."""
    rng = np.random.default_rng(3)
    shape = (24, 22, 22)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 2:-2, 2:-2] = True
    clean = np.stack([np.zeros(shape)] + [_smooth_field(shape, t) for t in (7.0, 24.0, 46.0)])
    sig = 0.05 * clean.max()
    noisy = np.maximum(clean + sig * rng.standard_normal(clean.shape), 0.0)
    est, how = A.highpass_sigma(noisy, mask)
    assert est == pytest.approx(sig, rel=0.05) and how.startswith("fourth-order")
    assert A.highpass_sigma(noisy, mask, order=2)[0] == pytest.approx(sig, rel=0.05)
    assert A.highpass_sigma(clean, mask)[0] < 0.05 * sig  # a smooth field alone is (nearly) noise-free
    thin = np.zeros(shape, dtype=bool)
    thin[2:-2, 2:-2, 9:13] = True  # 4 voxels thick: nothing at distance 2 from the edge
    est, how = A.highpass_sigma(noisy, thin)
    assert est == pytest.approx(sig, rel=0.1) and how.startswith("second-order") and "overestimated" in how
    assert A.highpass_sigma(noisy, np.zeros(shape, dtype=bool))[0] is None
    based = noisy.copy()
    based[0] = 0.0  # signal relative to the baseline scan: exactly zero
    sigma, rule = A.noise_level([0.0, 7.0, 24.0, 46.0], based, mask, None, scale=1.0)
    assert sigma == pytest.approx(sig, rel=0.05)
    assert "exactly zero" in rule and "high-pass" in rule


def test_highpass_noise_estimate_at_low_noise_on_a_brain_phantom():
    """At 1% noise the second-order residual also counts the signal's curvature (1.27x the true sigma on a
    28 mm block, and sigma^2 enters the corrected equation); the fourth-order one cancels it: within 4% of
    the true sigma at 1%, and noise-free data read under a sixth of what the second-order one reads."""
    from glymphmpi.synth import brain_diffusion as bd

    spec = dict(block=(22, 22, 22), centre_mm=(-20.0, 59.0, 4.0), D_mm2_per_h=0.81, times_h=(0.0, 4.0, 8.0, 12.0),
                dt_h=0.25)
    clean, _, mask, _, _ = bd.make_phantom(bd.PhantomSpec(noise=0.0, seed=1, **spec))
    noisy, _, _, _, _ = bd.make_phantom(bd.PhantomSpec(noise=0.01, seed=1, **spec))
    true = float(np.std((noisy - clean)[:, mask.astype(bool)]))
    four, two = A.highpass_sigma(noisy, mask)[0], A.highpass_sigma(noisy, mask, order=2)[0]
    assert four == pytest.approx(true, rel=0.04)
    assert two > 1.1 * true  # the curvature the fourth-order residual removes
    assert A.highpass_sigma(clean, mask)[0] < A.highpass_sigma(clean, mask, order=2)[0] / 6


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


def test_corrected_scale_rule():
    assert A.corrected_scale(0.05) == pytest.approx(A.CORRECTED_SCALE_PER_SIGMA2 * 0.0025)
    assert A.corrected_scale(0.0) == A.PATH_SCALES[-1]
    assert A.corrected_scale(10.0) == 1.0


def test_scan_gap_warning():
    """Rule "corrected" warns whenever scans are further apart than the spacing D was accurate at."""
    assert A.scan_gap_warning([0.0, 4.0, 8.0, 12.0]) is None
    assert A.scan_gap_warning([0.0]) is None
    w = A.scan_gap_warning([0.0, 7.0, 24.0, 46.0])
    assert w is not None and "22 h apart" in w and "upper estimate" in w


def test_noise_scale_rule():
    """s = 30 sigma^2 within [1e-4, 1]: 5% noise -> 0.075, noise-free -> the weakest scale, huge noise -> 1."""
    assert A.noise_scale(0.05) == pytest.approx(0.075)
    assert A.noise_scale(0.0) == A.PATH_SCALES[-1]
    assert A.noise_scale(1.0) == 1.0


def test_interval():
    lo, hi = A.interval(0.7, 0.01, 0.005)
    assert lo == pytest.approx(0.7 - 0.0246) and hi == pytest.approx(0.7 + 0.0246)
    assert math.isclose(sum(A.interval(1.0, 0.0, 0.0)), 2.0)


def test_figure_title_shows_interval_and_flags():
    """The FEM figure's title carries D's 95% interval, and says NOT CONVERGED and how many warnings."""
    from glymphmpi.report.fem_figures import figure_title

    t = figure_title("s1", {"D_mm2_per_h": 0.71234, "D_ci95_mm2_per_h": [0.65, 0.77], "converged": True,
                            "warnings": []}, "boundary-control")
    assert "D = 0.7123" in t and "[0.6500, 0.7700]" in t and "NOT" not in t and "warning" not in t
    t = figure_title("s1", {"D_mm2_per_h": 0.7, "D_ci95_mm2_per_h": None, "converged": False,
                            "warnings": ["a", "b"]}, "boundary-control")
    assert "NOT CONVERGED" in t and "2 warning(s)" in t and "95%" not in t


def test_low_noise_warning_on_brain_phantoms():
    """Noise-free phantom data fall below the level the noise rule was checked on and are flagged when D
    still moves along the regularisation path (more than 1% per decade: measured +5-16% bias there) or the
    scans are more than 4 h apart; 5% noise, an unknown noise level, or a settled D with scans every 4 h
    are not flagged."""
    from glymphmpi.synth import brain_diffusion as bd

    levels = {}
    for noise in (0.0, 0.05):
        scans, _, mask, _, _ = bd.make_phantom(bd.PhantomSpec(block=(14, 14, 14), noise=noise, seed=0, dt_h=0.25))
        scale = A.data_scale(scans, mask)
        levels[noise], _ = A.noise_level(list(bd.DEFAULT_TIMES_H), scans, mask, None, scale)
    assert levels[0.0] < 0.5 * A.LOW_NOISE_REL  # the signal left by the 4th-order residual: 0.02%
    assert levels[0.05] > 3 * A.LOW_NOISE_REL
    moving = [{"scale": 3.5e-3, "D": 0.8606}, {"scale": 3.5e-4, "D": 0.8373}]  # the 14 mm noise-free path
    settled = [{"scale": 1.2e-2, "D": 0.5292}, {"scale": 1.2e-3, "D": 0.5264}]  # 21 mm, scans every 4 h
    w = A.low_noise_warning(levels[0.0], moving)
    assert w is not None and "biased high" in w and "2.8%" in w and "upper estimate" in w
    assert A.low_noise_warning(levels[0.0], settled) is None
    assert A.low_noise_warning(levels[0.0], settled, [0, 4, 8, 12]) is None
    # a settled D is not enough with sparse scans (29 mm noise-free block at 0/7/24/46 h: 0.66% per decade, +13.4%)
    w = A.low_noise_warning(levels[0.0], settled, list(bd.DEFAULT_TIMES_H))
    assert w is not None and "up to 22 h apart" in w and "still moved" not in w and "upper estimate" in w
    assert A.low_noise_warning(levels[0.05], settled, list(bd.DEFAULT_TIMES_H)) is None
    assert A.low_noise_warning(levels[0.05], moving) is None
    assert A.low_noise_warning(None, moving) is None
    assert A.low_noise_warning(levels[0.0], moving[:1]) is None  # one scale: no movement measured
    two_decades = [{"scale": 1e-2, "D": 0.83}, {"scale": 1e-4, "D": 0.81}]  # 2.5% over two decades: 1.2% each
    assert "1.2%" in A.low_noise_warning(levels[0.0], two_decades)
    # D that rose as the scale weakened (the rat: 0.390 -> 0.624) is not called an upper estimate
    rising = [{"scale": 1.41e-3, "D": 0.3897}, {"scale": 1.41e-4, "D": 0.6241}]
    w = A.low_noise_warning(levels[0.0], rising, [0, 1 / 6, 2 / 6])
    assert w is not None and "38% per decade" in w and "rose as the regularisation weakened" in w
    assert "not determined" in w and "upper estimate" not in w and "biased high" not in w
    w = A.low_noise_warning(levels[0.0], rising, list(bd.DEFAULT_TIMES_H))  # sparse scans too: still no sign
    assert "up to 22 h apart" in w and "upper estimate" not in w
    assert "upper estimate" in A.low_noise_warning(levels[0.0], moving, [0, 4, 8, 12])  # D fell: flattening
