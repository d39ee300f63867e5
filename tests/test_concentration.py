"""MR signal to concentration: the SPGR equations and their inversion, the routes, clipping, the r1 table."""

from __future__ import annotations

import numpy as np
import pytest

from glymphmpi.concentration import relaxivity as rx
from glymphmpi.concentration import routes as R
from glymphmpi.concentration.signal import spgr_m0, spgr_signal, spgr_t1
from glymphmpi.errors import InputError


def test_spgr_closed_form_inverts_the_signal():
    """T1 from S and M0 recovers T1 to rounding over 0.05..5 s, several TR/flip angles."""
    t1 = np.geomspace(0.05, 5.0, 200)
    for tr, fa in ((0.005, 8.0), (0.01, 12.0), (0.02, 30.0)):
        S = spgr_signal(1234.0, t1, tr, fa)
        got, bad = spgr_t1(S, 1234.0, tr, fa, 0.01, 10.0)
        assert not bad.any()
        np.testing.assert_allclose(got, t1, rtol=1e-9)
        np.testing.assert_allclose(spgr_m0(S, t1, tr, fa), 1234.0, rtol=1e-12)


def test_spgr_signal_matches_ernst_limit():
    """At the Ernst angle the SPGR signal is M0 sqrt((1 - E1)/(1 + E1)) (textbook identity)."""
    tr, t1 = 0.01, 1.0
    E1 = np.exp(-tr / t1)
    ernst = np.degrees(np.arccos(E1))
    assert spgr_signal(1.0, t1, tr, ernst) == pytest.approx(np.sqrt((1 - E1) / (1 + E1)), rel=1e-12)


def test_spgr_unsolvable_voxels_are_clipped_and_flagged():
    """Signal above M0 sin(a) -> T1 clipped to the minimum; signal <= 0 -> the maximum; both flagged."""
    fa = 10.0
    S = np.array([2.0 * np.sin(np.radians(fa)), -1.0, 0.0, spgr_signal(1.0, 1.0, 0.01, fa)])
    t1, bad = spgr_t1(S, 1.0, 0.01, fa, 0.01, 10.0)
    assert bad.tolist() == [True, True, True, False]
    assert t1[0] == 0.01 and t1[1] == 10.0 and t1[2] == 10.0 and t1[3] == pytest.approx(1.0, rel=1e-9)


def test_t1map_route_exact_and_counts_clipping(caplog):
    mask = np.ones((3, 3, 3), dtype=bool)
    t10 = np.full(mask.shape, 1.2)
    C = np.zeros((3,) + mask.shape)
    C[1] = 0.3
    C[2] = np.linspace(0, 1, 27).reshape(mask.shape)
    T1 = 1.0 / (1.0 / t10 + 4.0 * C)
    conv = R.convert_t1map(T1, t10, 4.0, mask)
    np.testing.assert_allclose(conv.concentration, C, atol=1e-12)
    assert conv.clipped == [0, 0, 0] and conv.units == "mmol/L" and not conv.warnings
    T1[2, 0, 0, 0] = 0.0  # T1 <= 0: no solution
    T1[2, 1, 0, 0] = -3.0
    with caplog.at_level("WARNING"):
        conv = R.convert_t1map(T1, t10, 4.0, mask)
    assert conv.clipped == [0, 0, 2] and len(conv.warnings) == 1 and "clipped" in conv.warnings[0]
    assert np.isfinite(conv.concentration).all()
    assert sum("clipped" in r.message for r in caplog.records) == 1


def test_t1w_route_recovers_concentration_and_flags_assumed_t1_0():
    rng = np.random.default_rng(1)
    shape = (4, 5, 6)
    mask = np.ones(shape, dtype=bool)
    t10 = 0.8 + 0.6 * rng.random(shape)
    m0 = 500 + 100 * rng.random(shape)
    C = np.stack([np.zeros(shape), 0.2 * rng.random(shape), 0.6 * rng.random(shape)])
    seq = [(0.01, 12.0), (0.008, 15.0), (0.01, 12.0)]  # sessions may differ in TR and flip angle
    S = np.stack([spgr_signal(m0, 1 / (1 / t10 + 5.0 * C[n]), *seq[n]) for n in range(3)])
    conv = R.convert_t1w(S, seq, 0, 5.0, mask, t1_0=t10)
    np.testing.assert_allclose(conv.concentration, C, atol=1e-9)
    assert conv.meta["T1_0"] == "baseline session's T1 map" and conv.clipped == [0, 0, 0]
    # an assumed T1_0 equal to the truth in a uniform tissue recovers it too, and is flagged
    t10u = np.full(shape, R.assumed_t1_0("wm", 3.0))
    S = np.stack([spgr_signal(m0, 1 / (1 / t10u + 5.0 * C[n]), *seq[n]) for n in range(3)])
    conv = R.convert_t1w(S, seq, 0, 5.0, mask, t1_0_assumed=1.084, t1_0_note="test")
    np.testing.assert_allclose(conv.concentration, C, atol=1e-9)
    assert conv.meta["T1_0"] == "assumed" and any("ASSUMED" in w for w in conv.warnings)


def test_enhancement_route_is_proportional_and_says_so():
    mask = np.ones((2, 2, 2), dtype=bool)
    S = np.stack([np.full(mask.shape, 100.0), np.full(mask.shape, 150.0)])
    S[0, 0, 0, 0] = 0.0  # baseline 0: no enhancement defined
    conv = R.convert_enhancement(S, 0, mask)
    assert conv.concentration[1, 1, 1, 1] == pytest.approx(0.5)
    assert conv.concentration[1, 0, 0, 0] == 0.0 and conv.clipped == [1, 1]
    assert conv.units == "1" and any("PROPORTIONAL" in w for w in conv.warnings)


def test_r1_table_and_errors():
    r1, src = rx.lookup_r1("gadobutrol", 2.89)  # a Siemens "3 T"
    assert r1 == 5.0 and "Rohrer" in src
    assert rx.lookup_r1("Dotarem", 1.5)[0] == 3.6
    assert rx.lookup_r1("Gd-DTPA", 3.0)[0] == 3.7
    with pytest.raises(InputError, match="unknown contrast agent 'ferumoxytol'.*--r1"):
        rx.lookup_r1("ferumoxytol", 3.0)
    with pytest.raises(InputError, match="no r1 for gadobutrol at 7 T"):
        rx.lookup_r1("gadobutrol", 7.0)
    with pytest.raises(InputError, match="--agent"):
        rx.lookup_r1(None, 3.0)


def test_t1w_and_enhancement_do_not_depend_on_signal_units():
    """Scaling every T1w image by the same factor (receiver gain, file scaling) leaves C unchanged."""
    rng = np.random.default_rng(3)
    shape = (3, 4, 5)
    mask = np.ones(shape, dtype=bool)
    t10 = 0.9 + 0.3 * rng.random(shape)
    C = np.stack([np.zeros(shape), 0.3 * rng.random(shape)])
    seq = [(0.01, 12.0)] * 2
    S = np.stack([spgr_signal(700.0, 1 / (1 / t10 + 5.0 * C[n]), *seq[n]) for n in range(2)])
    for route in ("t1w", "enhancement"):
        ref = (R.convert_t1w(S, seq, 0, 5.0, mask, t1_0=t10) if route == "t1w"
               else R.convert_enhancement(S, 0, mask)).concentration
        for k in (1e-3, 1e4):
            got = (R.convert_t1w(k * S, seq, 0, 5.0, mask, t1_0=t10) if route == "t1w"
                   else R.convert_enhancement(k * S, 0, mask)).concentration
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
