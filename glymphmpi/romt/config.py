"""rOMT settings (table ``[romt]``); light module, no heavy imports.

Mapping to the reference code (rOMT_spdup): it minimises
``1e-4 * kinetic + 1/2 * fit + 0.008 * smoothness``. Dividing by the kinetic
weight 1e-4 gives ``kinetic + 5000 * fit + 80 * smoothness``, which is the
objective used here (Chen et al., Table 1: beta = 5000) with

    Phi(v) = sum_k dt rho_k^T |v_k|^2 + beta ||rho_nt - rho_target||^2
             + gamma sum_k dt sum_d ||grad v_{k,d}||^2 / 2

so ``beta = 0.5 / 1e-4 = 5000`` and ``gamma = 0.008 / 1e-4 = 80`` reproduce
the reference's balance; multiply our objective values by 1e-4 to compare
with the reference's printed ones.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from glymphmpi.config import NonNegative, NonNegativeInt, Positive, PositiveInt, Range
from glymphmpi.romt.post_config import RomtPostConfig


@dataclasses.dataclass(frozen=True)
class RomtConfig:
    """Settings of the rOMT solver.

    Attributes:
        nt: time steps per loop (pair of images).
        dt: model time per step (loop length T = nt * dt model time units).
        sigma: diffusion coefficient, voxel^2 per model time.
        beta: weight of the end-point fit ``||rho_nt - rho_target||^2``.
        gamma: weight of the H1 smoothness term of the velocity.
        boundary: ``open`` (a trilinear corner outside the box loses its
            share) or ``closed`` (the reference's dTri=1: a particle whose
            nonzero-weight corners are not all inside loses all its mass).
        mode: ``sequential`` (loop k starts from loop k-1's final density) or
            ``parallel`` (every loop starts from its measured image) or
            ``coupled`` (blocks of loops in parallel, each chained as in sequential
            mode, then sweeps that re-solve the blocks whose start moved by more
            than coupled_rtol, at most one sweep per rank group: the sequential
            chain's start densities, its velocities to round-off's reach, or with
            ``coupled_warm = false`` exactly; :func:`glymphmpi.romt.schedule._solve_coupled`).
        warm_start: sequential mode (coupled mode: inside a block of loops; a block's first loop
            starts from ``init``): loop k's Gauss-Newton starts from loop k-1's velocity
            (and source), as the authors' consecutive runs do (the flow changes slowly from one
            pair of scans to the next), or from that velocity without the source, or from
            ``init``, whichever has the lowest objective; the gradient tolerance stays relative
            to the first loop's initial gradient. Off by default: on the rat it saved no
            iterations (loop 1 chose the drift start; loops 2-3 took 15 and 21+), and a
            warm-started chain stopped on the first loop's gradient scale, less converged
            than a cold one (spheres: velocities 8-16% from coupled mode's, misfit up to 2x).
        coupled_rtol: relative L2 change of a loop's start density below which
            coupled mode does not solve it again (keeps its earlier solve).
        coupled_warm: coupled mode re-solves a loop from its own previous solution (default): few
            Gauss-Newton iterations, but a loop's velocity at the stop depends on where the
            iterations started, so the result is near the sequential chain, not on it. False: every
            loop is solved as sequential mode solves it, and the result is sequential mode's on one
            rank per loop, bit for bit, in about that mode's time. Rat, 6 loops on 2 ranks: 335 s
            and 15% (relative L2 of the velocity) from sequential mode on one rank, 23% from it on
            2 ranks, against 504 s and 0%; sequential mode on 1 and on 2 ranks are 20% apart from
            round-off alone, and took 489 s and 596 s.
        model: ``balanced`` (rho_t + div(rho v) = sigma lap rho) or ``unbalanced``
            (urOMT: + chi rho r, a relative source r per model time where chi
            is nonzero; :mod:`glymphmpi.romt.unbalanced`).
        alpha: weight of the unbalanced model's source cost
            ``alpha sum_k dt sum chi r_k^2 rho_k``. With the images at the reference
            intensity it means the same for any units (the source cost and the kinetic
            energy both scale with rho). Measured on the rat frames 7 -> 9 (mass +65%,
            beta 5000): alpha 10 let Gauss-Newton's steps in r overflow exp(dt r)
            (misfit 0.64 after 10 iterations), 300: misfit 0.073 (converged at
            gn_tol 1e-3 after 18), 1e3 (default): 0.040 (converged at gn_tol 5e-4
            after 15; 0.052 at 1e-3 after 12), 1e4 (the authors' value; their fit
            weight is about 10x weaker than beta = 5000): 0.050 after 10, not converged.
        source_time: ``loop`` (default: one relative source r per particle for the whole
            loop, constant over its nt steps) or ``step`` (an r_k per time step, as urOMT).
            The images at a loop's two ends cannot tell when within the loop mass was added;
            per step, only the source cost decides, the nt columns of J_r at a voxel are
            nearly parallel, and Gauss-Newton with the diagonal preconditioner spends its
            iterations shifting source between steps. Measured on the rat, frames 11 -> 13
            (mass +15.7%), one rank, defaults otherwise: the objective (the same function for
            both: a per-loop source is a per-step one with equal steps) after 15 / 30 / 57
            iterations 1.44e7 / 8.38e6 / 5.45e6 per step against 7.88e6 / 5.49e6 / 4.71e6 per
            loop; per step stopped on the 30-iteration limit, per loop passed the GMW test
            after 15 (misfit 0.0125).
        source_mask: NIfTI of chi (nonzero: the source may act; same grid as
            the scans); empty: the subject mask.
        max_iterations: Gauss-Newton iterations per loop at most (the
            reference's fixed 6 iterations: max_iterations = 6, gn_tol = 0,
            gn_gtol = 0, gn_ftol = 0).
        gn_tol: tau of the Gill-Murray-Wright stopping rule that the FAIR image
            registration toolbox uses (:func:`glymphmpi.romt.gn.gmw_converged`): stop
            when an iteration lowered the objective by at most tau times the start
            objective, moved the unknowns by at most sqrt(tau) of their norm, and the
            gradient is below tau^(1/3) times the start objective; 0 disables it.
        gn_gtol: stop when ||g|| <= gn_gtol * ||g_0||.
        gn_ftol: stop when the relative objective decrease of an iteration
            is below gn_ftol.
        pcg_max_iterations: PCG iterations per Gauss-Newton step at most.
        pcg_rtol: PCG relative residual tolerance.
        ls_max_halvings: Armijo backtracking halvings at most.
        armijo_c: Armijo sufficient-decrease constant.
        init: initial velocity of a loop: ``drift`` (the uniform velocity that
            moves the centre of mass of rho_0 onto that of the target over
            the loop, on the active set; zero when the centres agree) or
            ``zero`` (the reference). From zero, Gauss-Newton needs many more
            iterations to make a translation uniform (the J^T J null space
            is steered only by the weak kinetic and smoothness terms).
        mask_dilation: velocities are unknowns only on the subject mask
            dilated by this many voxels (negative: the whole box).
        crop_margin: solve on the bounding box of the active set and of the
            images' support widened by this many voxels (negative: the whole
            grid); equal to the whole-grid solve to ~1e-13 (see
            :func:`glymphmpi.romt.solve.crop_box`), cheaper DCTs. A loop in which
            particles carrying more than 0.1% of the mass jump further than
            this in one step is a warning naming the margin that keeps them in.
        mask_images: multiply the images by the subject mask before solving.
        smooth_sigma_voxels: Gaussian smoothing of the images inside the mask
            before solving (normalised convolution: no mass leaks out of the
            mask), standard deviation in voxels; 0: none. Real scans carry
            voxel-scale noise that no transport can reproduce (the rat series:
            45% of the L2 norm below 1 voxel); the authors smooth with an
            anisotropic "affine diffusion", a Gaussian is used here because it
            is linear, scale-free and has one parameter. Default 1 voxel, on for
            every series: both images of a loop are smoothed alike, so a pure
            transport stays a pure transport.
        backend: ``numpy`` (scipy/numba kernels) or ``torch`` (the same operators on torch
            tensors, :mod:`glymphmpi.romt.backend_torch`; equal to numpy to round-off in float64;
            Gauss-Newton's iterates stay on the host, the recursions and PCG run on ``device``).
        device: torch backend: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``,
            ``cuda`` (MPI ranks take cuda:(local rank % GPUs)) or ``cuda:N``; a CUDA request
            without a GPU is an error.
        precision: torch backend: ``float64`` or ``float32`` tensors on the device.
        fft_workers: threads of scipy.fft (0: all cores, divided by the
            number of MPI ranks on the node).
        tune_malloc: raise glibc's mmap/trim thresholds (process-wide) so that
            the solver's large temporaries reuse heap memory instead of
            page-faulting fresh memory every step (3-4x faster kernels).
        checkpoint_every: save the solver state every this many GN iterations.
        checkpoint_min_interval_s: ... but not sooner than this many seconds after
            the checkpointer's last save (its first save is always made; a stop
            signal always saves): at most this much work is lost to a SIGKILL. A
            50^3 checkpoint costs 0.18 s against a 2.3 s GN iteration.
        postprocess: run the Lagrangian post-processing after the solve
            (``glymph romt --no-post`` sets it false).
        post: the post-processing settings, table ``[romt.post]``
            (:class:`~glymphmpi.romt.post_config.RomtPostConfig`; the old
            table name ``[romt_post]`` is still accepted).
    """

    #: old key -> new key (a file or --set using the old one gets a one-line error naming the new)
    RENAMED = {"gn_max_iter": "max_iterations", "pcg_max_iter": "pcg_max_iterations"}

    nt: PositiveInt = 10
    dt: Positive = 0.4
    sigma: NonNegative = 0.002
    beta: Positive = 5000.0
    gamma: NonNegative = 80.0
    boundary: Literal["open", "closed"] = "open"
    mode: Literal["sequential", "parallel", "coupled"] = "sequential"
    warm_start: bool = False
    coupled_rtol: Positive = 1e-3
    coupled_warm: bool = True
    model: Literal["balanced", "unbalanced"] = "balanced"
    alpha: Positive = 1000.0
    source_time: Literal["step", "loop"] = "loop"
    source_mask: str = ""
    max_iterations: PositiveInt = 30
    gn_tol: NonNegative = 5e-4
    gn_gtol: NonNegative = 1e-3
    gn_ftol: NonNegative = 1e-4
    pcg_max_iterations: PositiveInt = 10
    pcg_rtol: Annotated[float, Range(gt=0, lt=1)] = 0.1
    ls_max_halvings: PositiveInt = 12
    armijo_c: NonNegative = 1e-4
    init: Literal["drift", "zero"] = "drift"
    mask_dilation: int = 3
    crop_margin: int = 6
    mask_images: bool = True
    smooth_sigma_voxels: NonNegative = 1.0
    backend: Literal["numpy", "torch"] = "numpy"
    device: str = "auto"
    precision: Literal["float64", "float32"] = "float64"
    fft_workers: NonNegativeInt = 0
    tune_malloc: bool = True
    checkpoint_every: PositiveInt = 1
    checkpoint_min_interval_s: NonNegative = 30.0
    postprocess: bool = True
    post: RomtPostConfig = dataclasses.field(default_factory=RomtPostConfig)
