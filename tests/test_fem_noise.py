"""The noise part of the FEM's reduced functional (why weak regularisation biases D low): j(delta; d) =
min_g J is a quadratic form in the data, and projection.noise_gradient estimates the slope of its
expected noise part. Runs under ``mpirun -n 2`` too (marker ``mpi``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("dolfinx")

from test_fem import _model, _synthetic_subject  # noqa: E402

from glymphmpi.fem.config import FemConfig  # noqa: E402


@pytest.mark.slow  # ~55 s of CPU (inner solves to 1e-10 for the exact identity)
@pytest.mark.mpi
def test_noise_part_of_the_reduced_functional(comm):
    """j(delta; d) = min_g J is a quadratic form in the data, so for any noise e the parallelogram law
    j'(c + e) + j'(c - e) - 2 j'(c) = 2 j'(e) holds exactly (here to the inner solve's 1e-10), and the
    expected noise part of j' is sigma^2 T', T' = E_z[j'(z)] over unit white-noise data: what
    projection.noise_gradient estimates. Its probes' mean agrees with an independent set of noise fields
    within 4 standard errors, and T' > 0 (more diffusion leaves more of the noise unfitted, so profiling
    g pulls D low: the measured bias of weak regularisation)."""
    from mpi4py import MPI

    from glymphmpi.fem.problem import ControlProblem
    from glymphmpi.fem.projection import ReducedFunctional, noise_gradient
    from glymphmpi.fem.transfer import sample

    subj = _synthetic_subject(comm, D=0.45)
    cfg = FemConfig(dt_h=0.5, optimizer="projection", alpha=1e-8, beta=1e-3, gamma=1e-4, inner_rtol=1e-10,
                    inner_max_iterations=5000)
    _, model = _model(comm, subj.mask, subj.affine, subj.times_h, cfg)
    c = sample(subj.scans, model.vm.owned_voxel)
    vox = model.vm.owned_voxel
    nvox = int(np.prod(model.vm.shape))
    delta = 0.3

    def jp(data):
        p = ControlProblem(model, data, cfg)
        x = p.initial()
        rf = ReducedFunctional(p, cfg, x)
        try:
            return rf(delta)[1] * p.J_scale
        finally:
            rf.close()
            x.destroy()

    rng = np.random.default_rng(11)
    j0 = jp(c)
    twice = []
    for _ in range(4):
        e = 0.05 * np.stack([rng.standard_normal(nvox)[vox] for _ in range(c.shape[0])])
        lhs = jp(c + e) + jp(c - e) - 2.0 * j0
        je = jp(e)
        assert lhs == pytest.approx(2.0 * je, rel=1e-6, abs=1e-9 * abs(j0))
        twice.append(je / 0.05 ** 2)
    probes = noise_gradient(ControlProblem(model, c, cfg), cfg, delta, 4, seed=5)
    a, b = np.mean(probes), np.mean(twice)
    se = math.sqrt(np.var(probes, ddof=1) / 4 + np.var(twice, ddof=1) / 4)
    assert a > 0 and b > 0 and abs(a - b) < 4.0 * se
    assert comm.allreduce(a, op=MPI.MAX) == pytest.approx(a, rel=1e-12)
    model.destroy()

