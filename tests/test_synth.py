"""Synthetic subjects against their formulas and exact discrete solutions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from glymphmpi.subject import load_subject
from glymphmpi.synth import brain_diffusion as bd
from glymphmpi.synth import gaussian_spheres as gs


def _matlab_like_blur(img, std):
    """Independent imgaussfilt3 re-implementation: replicate padding + full 3D kernel sum."""
    r = math.ceil(2 * std)
    x = np.arange(-r, r + 1)
    k1 = np.exp(-x**2 / (2 * std**2))
    K = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    K /= K.sum()
    pad = np.pad(img, r, mode="edge")
    out = np.zeros_like(img)
    n0, n1, n2 = img.shape
    for a in range(2 * r + 1):
        for b in range(2 * r + 1):
            for c in range(2 * r + 1):
                out += K[a, b, c] * pad[a:a + n0, b:b + n1, c:c + n2]
    return out


def test_gaussian_spheres_match_formula(tmp_path):
    n = 20
    images, truth = gs.gaussian_spheres(n=n)
    assert images.shape == (5, n, n, n)
    for i in range(1, 6):
        x = np.linspace(-6, 6, n) - 1.6 + (i - 1) * 0.8
        X, Y, Z = np.meshgrid(x, x, x)  # MATLAB's meshgrid order: symmetric here
        clean = 100 / np.sqrt(2 * np.pi) * np.exp(-(X**2 + Y**2 + Z**2) / 2)
        expect = clean if i == 1 else _matlab_like_blur(clean, np.sqrt(0.2) * i)
        np.testing.assert_allclose(images[i - 1], expect, atol=1e-6, rtol=0)
    assert truth["blur_std_voxel"][1:] == pytest.approx([0.894427, 1.341641, 1.788854, 2.236068], abs=1e-6)
    # written files (float64) reproduce the arrays to 1e-6
    path = gs.write(tmp_path, n=n)
    s = load_subject(path)
    np.testing.assert_allclose(s.scans, images, atol=1e-6, rtol=0)


def test_gaussian_spheres_truth_path():
    images, truth = gs.gaussian_spheres(n=50)
    assert truth["speed_voxel_per_model_time"] == pytest.approx(1.4145, abs=1e-3)  # the paper's 1.414
    d = np.asarray(truth["direction"])
    np.testing.assert_allclose(d, -np.ones(3) / np.sqrt(3), atol=1e-12)
    # the clean first image peaks at the recorded centre (to half a voxel)
    c0 = np.asarray(truth["centres_voxel"][0])
    peak = np.unravel_index(np.argmax(gs.clean_image(1, 50)), (50,) * 3)
    assert np.all(np.abs(np.asarray(peak) - c0) <= 0.5)


def test_kernel_radius_matches_imgaussfilt3():
    for std, size in ((0.894, 5), (1.342, 7), (1.789, 9), (2.236, 11)):
        assert gs.gaussian_kernel(std).size == size


def test_fd_solver_exact_discrete_eigenmode():
    """A product-sine mode in a box with g = 0 decays by CN's exact amplification factor."""
    m = (7, 6, 5)
    h = np.array([1.0, 0.8, 1.2])
    mask = np.ones(tuple(k + 2 for k in m), bool)  # outer layer = boundary voxels
    idx = [np.arange(k + 2) for k in m]
    modes = [np.sin(np.pi * i / (k + 1)) for i, k in zip(idx, m)]
    u0 = modes[0][:, None, None] * modes[1][None, :, None] * modes[2][None, None, :]
    lam = sum((2 - 2 * np.cos(np.pi / (k + 1))) / hh**2 for k, hh in zip(m, h))
    D, tau, nsteps = 0.7, 0.25, 12
    out = bd.solve_diffusion(mask, h, D, lambda t: np.zeros(int((~bd.boundary_interior(mask)[0]).sum())),
                             [0.0, tau * nsteps], dt_h=tau, c0=u0)
    r = (1 - 0.5 * tau * D * lam) / (1 + 0.5 * tau * D * lam)
    interior = bd.boundary_interior(mask)[0]
    np.testing.assert_allclose(out[1][interior], (u0 * r**nsteps)[interior], rtol=1e-10, atol=1e-13)
    # and close to the continuous-time decay exp(-D lam t) (CN error O(tau^2))
    assert abs(r**nsteps - np.exp(-D * lam * tau * nsteps)) < 2e-3


@pytest.fixture(scope="module")
def phantom16():
    spec = bd.PhantomSpec(block=(16, 16, 16), dt_h=0.05)
    return spec, bd.make_phantom(spec)


def test_phantom_truth_and_coarse_resolve(phantom16):
    spec, (scans, clean, mask, affine, truth) = phantom16
    assert truth["D_mm2_per_h"] == 0.72 and truth["times_h"] == [0.0, 7.0, 24.0, 46.0]
    assert mask.sum() == truth["mask_voxels"] > 1000
    np.testing.assert_array_equal(scans, clean)  # no noise asked
    # boundary values follow g; the initial interior is zero; the tracer enters
    interior, boundary = bd.boundary_interior(mask)
    assert np.all(clean[0][interior] == 0) and clean[1][interior].mean() > 0.05
    # a coarser re-solve (time step 10x larger) with the recorded D agrees (CN: O(dt^2))
    bb = np.flatnonzero(boundary)
    coarse = bd.solve_diffusion(mask, np.ones(3), truth["D_mm2_per_h"], bd.boundary_function(mask, affine, bb),
                                spec.times_h, dt_h=0.5)
    err = np.abs(coarse - clean).max() / clean.max()
    assert err < 5e-3, err
    # a different D gives clearly different data: the check has power
    other = bd.solve_diffusion(mask, np.ones(3), 0.9 * truth["D_mm2_per_h"],
                               bd.boundary_function(mask, affine, bb), spec.times_h, dt_h=0.5)
    assert np.abs(other - clean).max() / clean.max() > 5 * err


def test_phantom_noise_seeded(phantom16):
    spec, (_, clean, mask, _, truth) = phantom16
    import dataclasses

    s1 = dataclasses.replace(spec, noise=0.05, seed=3, dt_h=0.5)
    a = bd.make_phantom(s1)[0]
    b = bd.make_phantom(s1)[0]
    c = bd.make_phantom(dataclasses.replace(s1, seed=4))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    clean_c = bd.make_phantom(dataclasses.replace(s1, noise=0.0))[1]
    resid = (a - clean_c)[:, mask]
    assert resid.std() == pytest.approx(0.05 * clean_c.max(), rel=0.05)


def test_phantom_cli_writes_subject(tmp_path, glymph):
    r = glymph("synth", "brain-diffusion", "--out", tmp_path, "--block", "12", "12", "12", "--noise", "0.02",
               "--dt-h", "0.5", "--id", "ph")
    assert r.returncode == 0, r.stderr
    s = load_subject(tmp_path / "subject.toml")
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert s.id == "ph" and truth["D_mm2_per_h"] == 0.72 and s.n_scans == 4
    assert s.mask.sum() == truth["mask_voxels"]
    assert (tmp_path / "truth" / "clean_03.nii.gz").exists()
