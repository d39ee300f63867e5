"""Settings of the PINN method (light module: no torch import).

Defaults follow Zapf et al. 2022 (Sci. Rep. 12:15475): a tanh network,
D(delta) = Dmin + sigmoid(delta) * Dmax with Dmin = 0.1 and Dmax = 1.2 mm^2/h
and delta = 0 at the start, loss J + w_r L_r with p = 1 residual norm and
residual-based adaptive refinement (RAR), PDE points only in the interior of
the mask, 20 minibatches per epoch, Adam with exponential learning-rate decay
from 1e-3 to 1e-4 over the run.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("tanh", "sin", "silu")
D_PARAMS = ("sigmoid", "direct")
P_SCHEDULES = ("1", "2", "2to1")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


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
        d_param: ``sigmoid``: D = d_min + sigmoid(delta) * d_max;
            ``direct``: D = delta.
        d_min, d_max: bounds of the sigmoid parametrisation (mm^2/h).
        delta0: initial delta (sigmoid: 0 gives D = 0.7 mm^2/h; direct: the
            initial D itself, mm^2/h).
        p_schedule: residual norm: ``1``, ``2``, or ``2to1`` (p = 2, then
            p = 1 from epoch ``p_switch_epoch``).
        p_switch_epoch: epoch of the 2 -> 1 switch (default: half the epochs).
        w_r: weight of the PDE loss L_r.
        epochs: training epochs (each sees every data and PDE point once).
        batches: minibatches per epoch (data and PDE points alike).
        lr_start, lr_end: Adam learning rate decays exponentially from
            ``lr_start`` to ``lr_end`` over the epochs.
        delta_freeze_epochs: delta is held at ``delta0`` for this many epochs
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
        rar_add: points added per RAR step.
        rae_epochs: epochs at which RAE replaces the ``rae_fraction`` of the
            PDE points with the lowest residual by the highest-residual points
            of a candidate pool (count stays the same).
        rae_fraction: share of the PDE points exchanged per RAE step.
        rar_pool: candidate pool size of RAR/RAE.
        residual_times: points of the time grid of the residual diagnostic r(t).
        residual_voxels: interior voxels used for r(t) (0: all; else a fixed
            random subset of this size).
        ensemble: trainings with seeds seed, seed+1, ... (mean and spread of D).
        seed: random seed.
        checkpoint_every: checkpoint every N epochs (0: only on a signal).
        log_every: log a line every N epochs.
        early_stop_epochs: epochs at which a hopeless run is stopped (empty:
            never): D stuck at the lower bound (within ``early_stop_d_margin``
            x d_max of d_min, sigmoid parametrisation) or the residual norm
            (mean |dc/dt - D lap c| on a quick grid) not below
            ``(1 - early_stop_min_drop)`` x its value after the first epoch.
            The run then ends normally with ``early_stopped`` and the reason in
            its summary (pinn-select never selects such a run).
        early_stop_d_margin: see ``early_stop_epochs``.
        early_stop_min_drop: see ``early_stop_epochs``.
        maps: write NIfTI maps of the prediction at the scan times.
        figures: write PNG figures.
    """

    depth: int = 6
    width: int = 64
    activation: str = "tanh"
    dtype: str = "float32"
    device: str = "auto"
    compile: bool = False
    d_param: str = "sigmoid"
    d_min: float = 0.1
    d_max: float = 1.2
    delta0: float = 0.0
    p_schedule: str = "1"
    p_switch_epoch: int = 0
    w_r: float = 1.0
    epochs: int = 2000
    batches: int = 20
    lr_start: float = 1e-3
    lr_end: float = 1e-4
    delta_freeze_epochs: int = 0
    lbfgs_steps: int = 0
    pde_points: int = 0
    resample_every: int = 0
    rar_epochs: tuple[int, ...] = ()
    rar_add: int = 100_000
    rae_epochs: tuple[int, ...] = ()
    rae_fraction: float = 0.1
    rar_pool: int = 1_000_000
    residual_times: int = 200
    residual_voxels: int = 20_000
    ensemble: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 50
    early_stop_epochs: tuple[int, ...] = ()
    early_stop_d_margin: float = 0.01
    early_stop_min_drop: float = 0.1
    maps: bool = True
    figures: bool = True

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not one of {', '.join(ACTIVATIONS)}")
        if self.d_param not in D_PARAMS:
            raise ValueError(f"d_param {self.d_param!r} not one of {', '.join(D_PARAMS)}")
        if self.p_schedule not in P_SCHEDULES:
            raise ValueError(f"p_schedule {self.p_schedule!r} not one of {', '.join(P_SCHEDULES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not one of {', '.join(DTYPES)}")
        for name in ("depth", "width", "epochs", "batches", "ensemble", "residual_times"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pde_points", "resample_every", "lbfgs_steps", "checkpoint_every", "rar_add",
                     "residual_voxels", "p_switch_epoch", "delta_freeze_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr_start > 0 and self.lr_end > 0):
            raise ValueError("lr_start and lr_end must be > 0")
        if self.w_r < 0:
            raise ValueError("w_r must be >= 0")
        if not 0 < self.rae_fraction < 1:
            raise ValueError("rae_fraction must be in (0, 1)")
        if self.d_param == "sigmoid" and not (self.d_min >= 0 and self.d_max > 0):
            raise ValueError("need d_min >= 0 and d_max > 0")
        if self.d_param == "direct" and self.delta0 <= 0:
            raise ValueError("d_param 'direct' needs delta0 > 0 (the initial D in mm^2/h)")
        if (self.rar_epochs or self.rae_epochs) and self.rar_pool < 1:
            raise ValueError("rar_pool must be >= 1 when RAR/RAE is on")
        if not (0 <= self.early_stop_d_margin < 1 and 0 <= self.early_stop_min_drop < 1):
            raise ValueError("early_stop_d_margin and early_stop_min_drop must be in [0, 1)")
        if any(e < 2 for e in self.early_stop_epochs):
            raise ValueError("early_stop_epochs must be >= 2 (the baseline is taken after epoch 1)")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")

    @property
    def switch_epoch(self) -> int:
        """Epoch from which p = 1 under the ``2to1`` schedule."""
        return self.p_switch_epoch or self.epochs // 2

