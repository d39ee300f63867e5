"""Settings of the rOMT Lagrangian post-processing (table ``[romt.post]``, nested in ``[romt]``).

Light module (no heavy imports). ``glymph romt`` and ``glymph romt-post`` read it as
``cfg.post`` of :class:`~glymphmpi.romt.config.RomtConfig`; on its own it resolves with
``glymphmpi.methods.load_config("romt.post", path, overrides)`` (the old name ``romt_post``
is an alias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from glymphmpi.config import NonNegative, NonNegativeInt, PositiveInt, Range, UnitFraction


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
        figure_view: the pathline figures' view: "3d" (an oblique 3D view) or a
            projection seen from one side of a world axis ("+x": from +x, y
            increasing to the right, z up; "-x": from -x, y decreasing to the
            right, as the rOMT papers' lateral rat views; "+y"/"-y" show x and
            z, "+z"/"-z" show x and y).
    """

    seed_rule: Literal["max", "sum", "both", "either"] = "max"
    seed_max_fraction: UnitFraction = 0.1
    seed_sum_min: NonNegative = 0.0
    seed_every: PositiveInt = 1
    max_seeds: NonNegativeInt = 0
    integrator: Literal["euler", "rk2", "rk4"] = "rk2"
    substeps: PositiveInt = 1
    time_interpolation: Literal["constant", "linear"] = "linear"
    log_density_floor: UnitFraction = 1e-4
    stop_density_fraction: UnitFraction = 1e-3
    stop_speed_mm_per_h: NonNegative = 1e-6
    min_points: NonNegativeInt = 3
    min_distance_voxels: NonNegative = 3.0
    smooth_sigma_voxels: NonNegative = 0.0
    write_maps: bool = True
    write_vtk: bool = True
    write_figures: bool = True
    figure_max_lines: NonNegativeInt = 1500
    figure_max_vectors: NonNegativeInt = 400
    figure_dpi: Annotated[int, Range(ge=1)] = 110
    figure_view: Literal["3d", "+x", "-x", "+y", "-y", "+z", "-z"] = "3d"
