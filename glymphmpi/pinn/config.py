"""Settings of the PINN method (light module: no torch import).

Defaults follow Zapf et al. 2022 (Sci. Rep. 12:15475) as far as a CPU allows,
in the set-up measured to recover D on brain phantoms (benchmarks/pinn_table.py,
benchmarks/pinn_defaults.py): a 6 x 64 tanh network, D(delta) = Dmin +
sigmoid(delta) * Dmax with Dmin = 0.1 and Dmax = 1.2 mm^2/h, started at D0 =
0.35 mm^2/h and held there for the first half of the epochs while the
network fits, loss J + w_r L_r with the p = 1 residual norm, residual-based
adaptive refinement (RAR) at 1/3 and 2/3 of the epochs, PDE points only in the
interior of the mask, Adam with exponential learning-rate decay from 5e-3 to
5e-4, and an automatic schedule: about 11000 optimizer steps of minibatches of
about 512 data points, whatever the data size (pinn/trainer.py
resolve_schedule); an ensemble of 2 seeds gives D's spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from glymphmpi.config import NonNegative, NonNegativeInt, Positive, PositiveInt, Range, UnitFraction

EarlyStopEpoch = Annotated[int, Range(ge=2)]


@dataclass(frozen=True)
class PinnConfig:
    """Configuration of ``glymph pinn`` (table ``[pinn]``).

    Attributes:
        depth: hidden layers of the fully connected network.
        width: neurons per hidden layer.
        activation: one of ``tanh``, ``sin``, ``silu``.
        dtype: ``float32`` (default) or ``float64``.
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``
            (an error when no GPU is present).
        compile: ``torch.compile`` the elementwise work of the fused tanh
            layers (faster steps after a one-off compile of tens of seconds).
        x_scale, t_scale: the input box is mapped to [-x_scale, x_scale] in space and
            [-t_scale, t_scale] in time (larger: the network starts with, and learns faster,
            sharper features along that axis).
        d_param: ``sigmoid``: D = d_min + sigmoid(delta) * d_max;
            ``direct``: D = delta.
        d_min, d_max: bounds of the sigmoid parametrisation (mm^2/h).
        delta0: initial delta (sigmoid: the default -1.335 gives D = 0.35 mm^2/h,
            0 gives 0.7; direct: the initial D itself, mm^2/h).
        p_schedule: residual norm: ``1``, ``2``, or ``2to1`` (p = 2, then
            p = 1 from epoch ``p_switch_epoch``).
        p_switch_epoch: epoch of the 2 -> 1 switch (default: half the epochs).
        w_r: weight of the PDE loss L_r.
        epochs: training epochs (each sees every data and PDE point once); 0 =
            automatic: about 11000 optimizer steps whatever the data size, and RAR
            at 1/3 and 2/3 of the epochs unless ``rar_epochs`` is given.
        batches: minibatches per epoch (data and PDE points alike); 0 = about
            512 data points per minibatch.
        lr_start, lr_end: Adam learning rate decays exponentially from
            ``lr_start`` to ``lr_end`` over the epochs.
        delta_freeze_epochs: delta is held at ``delta0`` for this many epochs
            (-1 = half the epochs; a quarter gave 2-3x the bias in D)
            (the network first fits the data, and the PDE at the initial D).
            Without it, Adam moves delta by about the learning rate per step
            while the network is still far from the data, and D runs to a
            bound (seen on the brain-diffusion phantom: from D0 = 0.72 to 1.24
            mm^2/h in 50 epochs at lr 1e-2) from which it returns only slowly.
        lbfgs_steps: optional L-BFGS iterations on the full batch at the end
            (0: none).
        pde_points: PDE points in the base set (0: as many as data points).
        resample_every: draw a fresh base set every N epochs (0: never).
        rar_epochs: epochs at which RAR adds the ``rar_add`` highest-residual
            points of a candidate pool of ``rar_pool`` points.
        rar_add: points added per RAR step (0 = half the interior voxels).
        rae_epochs: epochs at which RAE replaces the ``rae_fraction`` of the
            PDE points with the lowest residual by the highest-residual points
            of a candidate pool (count stays the same).
        rae_fraction: share of the PDE points exchanged per RAE step.
        rar_pool: candidate pool size of RAR/RAE (0 = eight times the interior voxels).
        residual_times: points of the time grid of the residual diagnostic r(t).
        residual_voxels: interior voxels used for r(t) (0: all; else a fixed
            random subset of this size).
        ensemble: trainings with seeds seed, seed+1, ... (mean and spread of D;
            the paper averages 4-5; 2 fit a 24 mm phantom in about 10 CPU minutes).
        seed: random seed.
        checkpoint_every: checkpoint every N epochs (0: only on a signal).
        log_every: log a line every N epochs.
        early_stop_epochs: epochs at which a hopeless run is stopped (empty:
            never): D stuck at the lower bound (within ``early_stop_d_margin``
            x d_max of d_min, sigmoid parametrisation) or the residual norm
            (mean |dc/dt - D lap c| on a quick grid) not below
            ``(1 - early_stop_min_drop)`` x its value when delta was released
            (after epoch ``delta_freeze_epochs + 1``; earlier check epochs judge nothing).
            The run then ends normally with ``early_stopped`` and the reason in
            its summary (pinn-select never selects such a run).
        early_stop_d_margin: see ``early_stop_epochs``.
        early_stop_min_drop: see ``early_stop_epochs``.
        maps: write NIfTI maps of the prediction at the scan times.
        figures: write PNG figures.
    """

    depth: PositiveInt = 6
    width: PositiveInt = 64
    activation: Literal["tanh", "sin", "silu"] = "tanh"
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    x_scale: Positive = 1.0
    t_scale: Positive = 1.0
    d_param: Literal["sigmoid", "direct"] = "sigmoid"
    d_min: NonNegative = 0.1
    d_max: Positive = 1.2
    delta0: float = -1.3350010667323404  # D0 = 0.35 mm^2/h
    p_schedule: Literal["1", "2", "2to1"] = "1"
    p_switch_epoch: NonNegativeInt = 0
    w_r: NonNegative = 1.0
    epochs: NonNegativeInt = 0
    batches: NonNegativeInt = 0
    lr_start: Positive = 5e-3
    lr_end: Positive = 5e-4
    delta_freeze_epochs: Annotated[int, Range(ge=-1)] = -1
    lbfgs_steps: NonNegativeInt = 0
    pde_points: NonNegativeInt = 0
    resample_every: NonNegativeInt = 0
    rar_epochs: tuple[NonNegativeInt, ...] = ()
    rar_add: NonNegativeInt = 0
    rae_epochs: tuple[NonNegativeInt, ...] = ()
    rae_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
    rar_pool: NonNegativeInt = 0
    residual_times: PositiveInt = 200
    residual_voxels: NonNegativeInt = 2000
    ensemble: PositiveInt = 2
    seed: NonNegativeInt = 0
    checkpoint_every: NonNegativeInt = 50
    log_every: PositiveInt = 50
    early_stop_epochs: tuple[EarlyStopEpoch, ...] = ()
    early_stop_d_margin: UnitFraction = 0.01
    early_stop_min_drop: UnitFraction = 0.1
    maps: bool = True
    figures: bool = True

    def validate(self) -> None:
        """What the field declarations cannot say (they hold the choices and bounds)."""
        if self.d_param == "direct" and not self.delta0 > 0:
            raise ValueError(f"delta0: d_param 'direct' needs delta0 > 0 (the initial D in mm^2/h), got {self.delta0}")

    @property
    def switch_epoch(self) -> int:
        """Epoch from which p = 1 under the ``2to1`` schedule."""
        return self.p_switch_epoch or self.epochs // 2  # resolved epochs (trainer.resolve_schedule)

