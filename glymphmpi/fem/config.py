"""Settings of the FEM optimal-control method (``[fem]`` table; light module).

The defaults follow Valnes et al. (2020) as used by Zapf et al. (2022):
D(delta) = Dmin + sigmoid(delta) * Dmax with Dmin = 0.1, Dmax = 1.2 mm^2/h
and delta = 0 at the start; regularisation (alpha, beta, gamma) =
(1e-6, 0.1, 0.01) of the boundary control g.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("boundary-control", "data-boundary")
PARAMETRIZATIONS = ("sigmoid", "direct")
TAO_TYPES = ("lmvm", "blmvm", "bqnls", "cg", "bncg", "nls")


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
        parametrization: "sigmoid" (D = D_min + sigmoid(delta) * D_max) or
            "direct" (D = delta, mm^2/h).
        D_min, D_max: sigmoid parametrisation bounds (mm^2/h).
        delta0: initial delta (sigmoid: 0 -> D = 0.7; direct: the initial D).
        delta_scale: the optimiser sees delta * delta_scale; None = automatic
            (equal curvature along delta and along a uniform g, estimated
            with two extra gradients at the start; boundary-control only).
        g_scaling: "diagonal" (TAO sees each g value times the square root of an estimate of
            the Hessian's diagonal: the regularisation's exactly, plus the direct misfit at scan
            steps) or "none" (raw concentrations). The projection optimizer always scales.
        dt_h: time step in hours (steps are shortened to land on every scan).
        t_end_h: end of the simulated interval (default: the last scan); every
            scan must lie in [first scan, t_end_h].
        theta: time stepping: 1.0 implicit Euler, 0.5 Crank-Nicolson.
        lumped_mass: row-sum lumped mass matrix in the state equation and
            misfit (the Q1 scheme is then close to the voxel finite differences).
        alpha, beta, gamma: regularisation weights of g^2, (dg/dt)^2 and
            |grad_boundary g|^2 on the boundary.
        optimizer: "tao" (TAO's ``tao_type`` on (delta, g) together) or "projection"
            (variable projection, boundary-control mode: for each D the best g is one linear
            solve, PETSc KSP CG on the matrix-free Hessian, warm started; then a safeguarded
            secant search for the root of dj/dD; see projection.py). data-boundary mode
            always uses TAO (D is the only control).
        inner_rtol, inner_max_it: the first inner CG solve reduces its residual by inner_rtol,
            later ones stop at the same absolute residual; iteration cap per solve (each
            iteration is one forward + adjoint solve).
        inner_options: extra options of the inner KSP (prefix ``<petsc_prefix>inner_``).
        inner_probe: measure the misfit's curvature between scans with one random Hessian
            product and add it to the g scaling (helps when g is unregularised; see
            ``ControlProblem.probe_g_scale``).
        outer_step: first step in delta of the outer search (sigmoid; "direct": fraction of D).
        tao_type: PETSc TAO solver.
        max_iterations: TAO iteration limit.
        gatol, grtol: TAO absolute / relative gradient tolerances (of the
            normalised functional J / J_scale, J_scale = sum_i ||d_i||^2).
        D_rtol, D_window: projection: stop when an outer step changes D by at most D_rtol
            (relative). TAO: also stop when D varied by at most D_rtol over the last
            D_window iterations (0 disables; boundary-control mode only).
        lmvm_memory: L-BFGS memory (pairs).
        petsc_options: KSP/PC options, applied with prefix ``petsc_prefix``.
        tao_options: extra TAO options (without prefix), e.g. {"tao_ls_type": "armijo"}.
        petsc_prefix: options prefix of the state/adjoint KSP.
        checkpoint_every: save the controls every N iterations (1 = each).
        vtk_every: write c(t) and g(t) to XDMF every N time steps (and at every scan;
            DOLFINx 0.5 takes about 0.4 s per frame at 35k nodes).
        quiet: no progress output.
    """

    mode: str = "boundary-control"
    parametrization: str = "sigmoid"
    D_min: float = 0.1
    D_max: float = 1.2
    delta0: float = 0.0
    delta_scale: float | None = None
    g_scaling: str = "none"
    dt_h: float = 1.0
    t_end_h: float | None = None
    theta: float = 0.5
    lumped_mass: bool = True
    alpha: float = 1e-6
    beta: float = 0.1
    gamma: float = 0.01
    optimizer: str = "tao"
    inner_rtol: float = 1e-4
    inner_max_it: int = 200
    inner_options: dict = field(default_factory=dict)
    inner_probe: bool = True
    outer_step: float = 0.2
    tao_type: str = "lmvm"
    max_iterations: int = 200
    gatol: float = 1e-8
    grtol: float = 1e-6
    D_rtol: float = 1e-3
    D_window: int = 10
    lmvm_memory: int = 10
    petsc_options: dict = field(default_factory=_default_petsc_options)
    tao_options: dict = field(default_factory=dict)
    petsc_prefix: str = "glymph_fem_"
    checkpoint_every: int = 1
    vtk_every: int = 6
    quiet: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fem.mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"fem.parametrization {self.parametrization!r} is not one of "
                             f"{', '.join(PARAMETRIZATIONS)}")
        if self.optimizer not in ("projection", "tao"):
            raise ValueError(f"fem.optimizer {self.optimizer!r} is not 'projection' or 'tao'")
        if not (0 < self.inner_rtol < 1 and self.inner_max_it >= 1 and self.outer_step > 0):
            raise ValueError("fem.inner_rtol must be in (0, 1), fem.inner_max_it >= 1, fem.outer_step > 0")
        if self.tao_type not in TAO_TYPES:
            raise ValueError(f"fem.tao_type {self.tao_type!r} is not one of {', '.join(TAO_TYPES)}")
        if not (self.D_min > 0 and self.D_max > 0):
            raise ValueError("fem.D_min and fem.D_max must be > 0")
        if self.parametrization == "direct" and self.delta0 <= 0:
            raise ValueError("fem.delta0 is the initial D with parametrization 'direct': must be > 0")
        if self.g_scaling not in ("diagonal", "none"):
            raise ValueError(f"fem.g_scaling {self.g_scaling!r} is not 'diagonal' or 'none'")
        if self.delta_scale is not None and not self.delta_scale > 0:
            raise ValueError("fem.delta_scale must be > 0")
        if not self.dt_h > 0:
            raise ValueError("fem.dt_h must be > 0")
        if not 0.5 <= self.theta <= 1.0:
            raise ValueError("fem.theta must be in [0.5, 1] (0.5 Crank-Nicolson, 1 implicit Euler)")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("fem.alpha, fem.beta, fem.gamma must be >= 0")
        if self.D_rtol < 0 or self.D_window < 1:
            raise ValueError("fem.D_rtol must be >= 0 and fem.D_window >= 1")
        if self.max_iterations < 0 or self.lmvm_memory < 1:
            raise ValueError("fem.max_iterations must be >= 0 and fem.lmvm_memory >= 1")
        if self.checkpoint_every < 0 or self.vtk_every < 1:
            raise ValueError("fem.checkpoint_every must be >= 0 and fem.vtk_every >= 1")
        for k in list(self.petsc_options) + list(self.tao_options) + list(self.inner_options):
            if not isinstance(k, str) or k.startswith("-"):
                raise ValueError(f"PETSc option {k!r}: give names without a leading '-'")

