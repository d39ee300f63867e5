"""Settings of the rOMT Lagrangian post-processing (table ``[romt.post]``, nested in ``[romt]``).

Light module (no heavy imports). ``glymph romt`` and ``glymph romt-post`` read it as
``cfg.post`` of :class:`~glymphmpi.romt.config.RomtConfig`; on its own it resolves with
``glymphmpi.methods.load_config("romt.post", path, overrides)`` (the old name ``romt_post``
is an alias).
"""

from __future__ import annotations

from dataclasses import dataclass

SEED_RULES = ("max", "sum", "both", "either")
INTEGRATORS = ("euler", "rk2", "rk4")
TIME_INTERPOLATIONS = ("constant", "linear")


@dataclass(frozen=True)
class RomtPostConfig:
    """Pathlines, speed and Peclet maps, flux vectors from an rOMT run.

    Attributes:
        seed_rule: which voxels inside the mask start a pathline: ``"max"``
            (the maximum over all model steps of the interpolated density is
            above ``seed_max_fraction`` of its global maximum), ``"sum"``
            (the sum over all model steps is above ``seed_sum_min``),
            ``"both"`` (both rules) or ``"either"`` (at least one).
        seed_max_fraction: threshold of the ``max`` rule, a fraction of the
            global maximum density (dimensionless, in [0, 1)).
        seed_sum_min: threshold of the ``sum`` rule, in density units summed
            over the model steps (every interpolated density counts once).
        seed_every: keep every k-th seed of the candidates (C order of the
            voxels), 1 keeps all.
        max_seeds: at most this many seeds (evenly thinned), 0 for no limit.
        integrator: ``"euler"``, ``"rk2"`` (midpoint) or ``"rk4"``.
        substeps: integrator steps per model step (the model step is the
            solver's own ``dt``, so a pathline moves as the transport does).
        time_interpolation: the diffusive part of the augmented velocity
            inside a model step: ``"constant"`` (the mean of the two end
            densities' values) or ``"linear"`` (linear between them); the
            rOMT velocity itself is piecewise constant per step, as solved.
        log_density_floor: the guard of ``grad log rho``: where the density is
            below this fraction of its maximum, the diffusive velocity
            ``-sigma grad log rho`` is set to zero (and Pe is undefined).
        stop_density_fraction: a particle stops where the interpolated
            density falls below this fraction of the global maximum.
        stop_speed_mm_per_h: a particle stops where the augmented speed falls
            below this (mm/h).
        min_points: cleanup: drop pathlines with fewer distinct points.
        min_distance_voxels: cleanup: drop pathlines whose start-to-end
            distance (index space) is shorter than this.
        smooth_sigma_voxels: optional Gaussian smoothing (normalised
            convolution, inside the mask) of the speed and Pe maps; 0 = off.
        write_maps: write maps/*.nii.gz.
        write_vtk: write vtk/pathlines.vtp and vtk/flux_vectors.vtp.
        write_figures: write figures/*.png.
        figure_max_lines: pathlines drawn in the 3D figures (evenly thinned).
        figure_max_vectors: flux vectors drawn in the 3D figures (evenly thinned).
        figure_dpi: resolution of the PNG figures.
    """

    seed_rule: str = "max"
    seed_max_fraction: float = 0.1
    seed_sum_min: float = 0.0
    seed_every: int = 1
    max_seeds: int = 0
    integrator: str = "rk2"
    substeps: int = 1
    time_interpolation: str = "linear"
    log_density_floor: float = 1e-4
    stop_density_fraction: float = 1e-3
    stop_speed_mm_per_h: float = 1e-6
    min_points: int = 3
    min_distance_voxels: float = 3.0
    smooth_sigma_voxels: float = 0.0
    write_maps: bool = True
    write_vtk: bool = True
    write_figures: bool = True
    figure_max_lines: int = 1500
    figure_max_vectors: int = 400
    figure_dpi: int = 110

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.seed_rule not in SEED_RULES:
            raise ValueError(f"seed_rule {self.seed_rule!r} unknown (valid: {', '.join(SEED_RULES)})")
        if self.integrator not in INTEGRATORS:
            raise ValueError(f"integrator {self.integrator!r} unknown (valid: {', '.join(INTEGRATORS)})")
        if self.time_interpolation not in TIME_INTERPOLATIONS:
            raise ValueError(f"time_interpolation {self.time_interpolation!r} unknown "
                             f"(valid: {', '.join(TIME_INTERPOLATIONS)})")
        if not 0.0 <= self.seed_max_fraction < 1.0:
            raise ValueError("seed_max_fraction must be in [0, 1)")
        for name in ("seed_every", "substeps", "figure_dpi"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_seeds", "min_points", "figure_max_lines", "figure_max_vectors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("seed_sum_min", "log_density_floor", "stop_density_fraction", "stop_speed_mm_per_h",
                     "min_distance_voxels", "smooth_sigma_voxels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.log_density_floor >= 1 or self.stop_density_fraction >= 1:
            raise ValueError("log_density_floor and stop_density_fraction must be < 1")

