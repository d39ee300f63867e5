"""Settings of the FEM optimal-control method (``[fem]`` table; light module).

The defaults follow Valnes et al. (2020) as used by Zapf et al. (2022):
D(delta) = Dmin + sigmoid(delta) * Dmax with Dmin = 0.1, Dmax = 1.2 mm^2/h
and delta = 0 at the start; regularisation (alpha, beta, gamma) =
(1e-6, 0.1, 0.01) of the boundary control g.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from glymphmpi.config import NonNegative, NonNegativeInt, Positive, PositiveInt, Range


def _default_petsc_options() -> dict:
    # CG + Jacobi: partition-independent (same iterates on 1 and 2 ranks) and
    # enough for M + theta dt D K, whose condition number is O(10) at 1 mm/1 h.
    return {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-9, "ksp_atol": 1e-14,
            "ksp_max_it": 1000}


@dataclass(frozen=True)
class FemConfig:
    """FEM optimal control of dc/dt = D lap c with a boundary concentration control.

    Attributes:
        mode: "boundary-control" (D and g per time step are controls) or
            "data-boundary" (g from the scans, linear in time; only D).
        d_param: "sigmoid" (D = d_min + sigmoid(delta) * d_max) or
            "direct" (D = delta, mm^2/h).
        d_min, d_max: sigmoid parametrisation bounds (mm^2/h).
        delta0: initial delta (sigmoid: 0 -> D = 0.7; direct: the initial D).
        delta_scale: the optimiser sees delta * delta_scale; None = automatic
            (equal curvature along delta and along a uniform g, estimated
            with two extra gradients at the start; boundary-control only).
        g_scaling: "diagonal" (TAO sees each g value times the square root of an estimate of
            the Hessian's diagonal: the regularisation's exactly, plus the direct misfit at scan
            steps) or "none" (raw concentrations). The projection optimizer always scales.
        dt_h: time step in hours; unset = follows the scans (shortest scan spacing / 7; steps are
            shortened to land on every scan). A step needing more memory than the machine has is refused.
        t_end_h: end of the simulated interval (default: the last scan); every
            scan must lie in [first scan, t_end_h].
        theta: time stepping: 1.0 implicit Euler, 0.5 Crank-Nicolson.
        lumped_mass: row-sum lumped mass matrix in the state equation and
            misfit (the Q1 scheme is then close to the voxel finite differences).
        regularization: "auto" (default): keep the ratios of (alpha, beta, gamma) and choose their
            common scale from the data by ``regularization_rule`` (variable projection at every
            scale; see fem/auto.py), with a 95% interval for D and a check of the time step;
            "fixed": use the weights as given.
        regularization_rule: with "auto": "corrected" (default: D solves the noise-corrected
            estimating equation j'(delta) - sigma^2 T'(delta) = 0 at scale
            fem.auto.CORRECTED_SCALE_PER_SIGMA2 x sigma^2, sigma relative to the data's robust
            intensity; see fem/README.md), "noise" (D minimises J at scale fem.auto.SCALE_PER_SIGMA2 x
            sigma^2), "discrepancy" (Morozov) or "l-curve". Without a noise level the L-curve is
            used; with a noise level of zero "corrected" and "discrepancy" take the weakest scale.
        noise_probes, noise_probe_seed: rule "corrected": number of unit white-noise probes that
            estimate T' (each one more inner solve per outer step) and their seed.
        noise_sigma: noise standard deviation in the data's units; unset = estimated from the
            pre-contrast scan (time <= 0 h), or from the scans' high-pass residual when that scan is
            missing or exactly zero (baseline-subtracted).
        check_dt: with regularization "auto": re-estimate D with half the time step and widen the
            interval by the change.
        alpha, beta, gamma: regularisation weights of g^2, (dg/dt)^2 and
            |grad_boundary g|^2 on the boundary.
        optimizer: "tao" (TAO's ``tao_type`` on (delta, g) together) or "projection"
            (variable projection, boundary-control mode: for each D the best g is one linear
            solve, PETSc KSP CG on the matrix-free Hessian, warm started; then a safeguarded
            secant search for the root of dj/dD; see projection.py). data-boundary mode
            always uses TAO (D is the only control).
        inner_rtol, inner_max_iterations: the first inner CG solve reduces its residual by inner_rtol,
            later ones stop at the same absolute residual; iteration cap per solve (each
            iteration is one forward + adjoint solve).
        inner_options: extra options of the inner KSP (prefix ``<petsc_prefix>inner_``).
        inner_probe: measure the misfit's curvature between scans with one random Hessian
            product and add it to the g scaling (helps when g is unregularised; see
            ``ControlProblem.probe_g_scale``).
        outer_step: first step in delta of the outer search (sigmoid; "direct": fraction of D).
        tao_type: PETSc TAO solver.
        max_iterations: iteration limit of the optimizer (TAO iterations; projection: outer steps).
        gatol, grtol: TAO absolute / relative gradient tolerances (of the
            normalised functional J / J_scale, J_scale = sum_i ||d_i||^2).
        d_rtol, d_window: projection: stop when an outer step changes D by at most d_rtol
            (relative). TAO: also stop when D varied by at most d_rtol over the last
            d_window iterations (0 disables; boundary-control mode only).
        lmvm_memory: L-BFGS memory (pairs).
        petsc_options: KSP/PC options, applied with prefix ``petsc_prefix``.
        tao_options: extra TAO options (without prefix), e.g. {"tao_ls_type": "armijo"}.
        petsc_prefix: options prefix of the state/adjoint KSP.
        checkpoint_every: save the controls every N iterations (1 = each).
        vtk_every: write c(t) and g(t) to XDMF every N time steps (and at every scan;
            DOLFINx 0.5 takes about 0.4 s per frame at 35k nodes).
    """

    #: old key -> new key (a file or --set using the old one gets a one-line error naming the new)
    RENAMED = {"parametrization": "d_param", "D_min": "d_min", "D_max": "d_max", "D_rtol": "d_rtol",
               "D_window": "d_window", "inner_max_it": "inner_max_iterations",
               "quiet": "the command-line switch `glymph --quiet`"}

    mode: Literal["boundary-control", "data-boundary"] = "boundary-control"
    d_param: Literal["sigmoid", "direct"] = "sigmoid"
    d_min: Positive = 0.1
    d_max: Positive = 1.2
    delta0: float = 0.0
    delta_scale: Positive | None = None
    g_scaling: Literal["diagonal", "none"] = "none"
    dt_h: Positive | None = None
    t_end_h: float | None = None
    theta: Annotated[float, Range(ge=0.5, le=1.0)] = 0.5
    lumped_mass: bool = True
    regularization: Literal["auto", "fixed"] = "auto"
    regularization_rule: Literal["corrected", "noise", "discrepancy", "l-curve"] = "corrected"
    noise_sigma: NonNegative | None = None
    noise_probes: Annotated[int, Range(ge=2, le=64)] = 2
    noise_probe_seed: NonNegativeInt = 2026
    check_dt: bool = True
    alpha: NonNegative = 1e-6
    beta: NonNegative = 0.1
    gamma: NonNegative = 0.01
    optimizer: Literal["tao", "projection"] = "tao"
    inner_rtol: Annotated[float, Range(gt=0, lt=1)] = 1e-4
    inner_max_iterations: PositiveInt = 500
    inner_options: dict = field(default_factory=dict)
    inner_probe: bool = True
    outer_step: Positive = 0.2
    tao_type: Literal["lmvm", "blmvm", "bqnls", "cg", "bncg", "nls"] = "lmvm"
    max_iterations: NonNegativeInt = 200
    gatol: NonNegative = 1e-8
    grtol: NonNegative = 1e-6
    d_rtol: NonNegative = 1e-3
    d_window: PositiveInt = 10
    lmvm_memory: PositiveInt = 10
    petsc_options: dict = field(default_factory=_default_petsc_options)
    tao_options: dict = field(default_factory=dict)
    petsc_prefix: str = "glymph_fem_"
    checkpoint_every: NonNegativeInt = 1
    vtk_every: PositiveInt = 6

    def validate(self) -> None:
        """What the field declarations cannot say (they hold the choices and bounds)."""
        if self.d_param == "direct" and not self.delta0 > 0:
            raise ValueError(f"delta0: is the initial D with d_param 'direct': must be > 0, got {self.delta0}")
        for k in list(self.petsc_options) + list(self.tao_options) + list(self.inner_options):
            if not isinstance(k, str) or k.startswith("-"):
                raise ValueError(f"petsc_options: option {k!r}: give names without a leading '-'")
