"""Training of the PINN on one process or many (DistributedDataParallel).

One epoch visits every data point and every PDE point once: both sets are
permuted with a generator that is identical on all ranks and cut into
``batches`` global minibatches; each rank takes its contiguous shard of each
global minibatch (``torch.tensor_split``). The loss of a shard is scaled so
that DDP's gradient averaging yields the gradient of the global minibatch
mean (see :mod:`glymphmpi.pinn.losses`); the network and D therefore stay
identical on all ranks and equal to a one-process run with the same global
batches, up to summation order.

Adam's learning rate decays exponentially from ``lr_start`` to ``lr_end``
over the epochs (``ExponentialLR`` stepped once per epoch). During the first
``delta_freeze_epochs`` epochs delta gets no update (its gradient is dropped
after the DDP all-reduce, on every rank alike), so D cannot run off while the
network is still far from the data. RAR and RAE act
before the epochs listed in the config. The state (model, optimiser,
scheduler, PDE point set, generator and RNG states, histories) is saved
every ``checkpoint_every`` epochs and on SIGTERM/SIGUSR1, and a run resumes
from it (same results as an uninterrupted run).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from glymphmpi.errors import GlymphError, InputError
from glymphmpi.parallel import tune_malloc
from glymphmpi.pinn.config import PinnConfig
from glymphmpi.pinn.diagnostics import abs_residual, predict, residual_over_time
from glymphmpi.pinn.distributed import SERIAL, DistContext
from glymphmpi.pinn.losses import p_at, shard_losses
from glymphmpi.pinn.network import DiffusionCoefficient, PinnModel, PinnNet
from glymphmpi.pinn.samplers import InteriorSampler, rae_exchange, rar_add

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The automatic schedule (``epochs = 0``): about AUTO_STEPS optimizer steps of minibatches of about
# AUTO_BATCH data points (and as many PDE points), whatever the data size, so the cost of a member is
# nearly fixed; epochs = steps / batches within [AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS].
AUTO_STEPS = 11000
AUTO_BATCH = 512
AUTO_MIN_EPOCHS = 12
AUTO_MAX_EPOCHS = 3000
SMOKE_STEPS = 1000  # fewer optimizer steps with D free than this: a smoke test, not an estimate
CONVERGED_D_CHANGE = 0.02  # D moving by more than this (relative) over the last 10% of the epochs: not converged
CONVERGED_RESIDUAL_FALL = 0.05  # residual norm still falling by more than this over the last 10%: not converged


class TrainingFailed(GlymphError):
    """The training produced a non-finite loss or D (diverged): the run is failed, never complete."""


# ------------------------------------------------------------------ problem
@dataclass
class Problem:
    """What the PINN trains on (numpy, float64; identical on every rank).

    Attributes:
        data_xt: (Nd, 4) data points: voxel centres (mm) of every mask voxel at every scan time (h).
        data_c: (Nd,) observed concentrations.
        mask: (ni, nj, nk) bool domain; ``interior``: the mask eroded by one voxel (PDE points).
        affine: (4, 4) voxel -> mm.
        times_h: (p,) scan times.
        lo, hi: (4,) input box (x, y, z, t).
        out_scale: magnitude of the normalised data (max |data_c|), the network's output scale.
        intensity_scale: the data are divided by it (``data_c = scans / intensity_scale``,
            a robust intensity: the 99th percentile of |scans| in the mask), so that training does
            not depend on the units of the images; predictions and residuals are multiplied back.
    """

    data_xt: np.ndarray
    data_c: np.ndarray
    mask: np.ndarray
    interior: np.ndarray
    affine: np.ndarray
    times_h: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    out_scale: float
    intensity_scale: float = 1.0

    @property
    def mask_xyz(self) -> np.ndarray:
        ijk = np.argwhere(self.mask).astype(np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def build_problem(scans: np.ndarray, mask: np.ndarray, affine: np.ndarray, times_h) -> Problem:
    """Problem from (p, ni, nj, nk) scans, a mask, an affine and the scan times."""
    scans = np.asarray(scans, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    times = np.asarray(times_h, dtype=np.float64)
    if scans.ndim != 4 or scans.shape[1:] != mask.shape or scans.shape[0] != times.size:
        raise InputError(f"scans {scans.shape} do not match mask {mask.shape} and {times.size} times")
    if times.size < 2 or np.any(np.diff(times) <= 0):
        raise InputError("need at least two strictly increasing scan times")
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                      border_value=0)
    if interior.sum() < 1:
        raise InputError("the mask has no interior voxels (all six neighbours inside) for PDE points")
    ijk = np.argwhere(mask).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    p, n = times.size, xyz.shape[0]
    data_xt = np.concatenate((np.tile(xyz, (p, 1)), np.repeat(times, n)[:, None]), axis=1)
    raw = scans[:, mask].reshape(-1)
    if not np.all(np.isfinite(raw)):
        raise InputError(f"the scans hold {int(np.sum(~np.isfinite(raw)))} NaN/Inf values inside the mask")
    intensity = robust_scale(raw)
    data_c = raw / intensity
    half = 0.5 * np.abs(affine[:3, :3]).sum(axis=1)
    lo = np.concatenate((xyz.min(0) - half, [times[0]]))
    hi = np.concatenate((xyz.max(0) + half, [times[-1]]))
    scale = float(np.max(np.abs(data_c)))
    return Problem(data_xt, data_c, mask, interior, np.asarray(affine, dtype=np.float64), times, lo, hi, scale,
                   intensity)


def robust_scale(values: np.ndarray) -> float:
    """A robust intensity of the data: the 99th percentile of |values| (their maximum if that is 0).

    Computed without arithmetic on the values (an order statistic), so that huge or tiny units
    neither overflow nor underflow. All zero: :class:`InputError`.
    """
    a = np.abs(np.asarray(values, dtype=np.float64))
    s = float(np.quantile(a, 0.99, method="higher")) if a.size else 0.0
    if s <= 0:
        s = float(a.max()) if a.size else 0.0
    if not s > 0:
        raise InputError("the scans are zero everywhere inside the mask: there is nothing to fit")
    return s


def resolve_schedule(cfg: PinnConfig, problem: Problem) -> PinnConfig:
    """``cfg`` with its automatic values made concrete for this data.

    * ``batches = 0``: about :data:`AUTO_BATCH` data points per minibatch.
    * ``epochs = 0``: about :data:`AUTO_STEPS` optimizer steps (``AUTO_STEPS / batches`` epochs within
      [AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS]); and, unless ``rar_epochs`` is given, RAR at 1/3 and 2/3
      of the epochs.
    * ``delta_freeze_epochs = -1``: half the epochs (a quarter gave 2-3x the bias in D: the network
      fits the data better before D moves).
    * ``rar_add = 0`` / ``rar_pool = 0``: half / eight times the interior voxels.
    """
    import dataclasses

    nd, n_int = int(problem.data_c.size), int(problem.interior.sum())
    ch: dict = {}
    batches = cfg.batches or max(1, min(nd, math.ceil(nd / AUTO_BATCH)))
    ch["batches"] = batches
    epochs = cfg.epochs
    if epochs == 0:
        epochs = int(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, round(AUTO_STEPS / batches))))
        ch["epochs"] = epochs
        if not cfg.rar_epochs:
            ch["rar_epochs"] = (epochs // 3, 2 * epochs // 3)
    if cfg.delta_freeze_epochs < 0:
        ch["delta_freeze_epochs"] = epochs // 2
    if cfg.rar_add == 0:
        ch["rar_add"] = max(1, n_int // 2)
    if cfg.rar_pool == 0:
        ch["rar_pool"] = max(1, 8 * n_int)
    return dataclasses.replace(cfg, **ch)


def problem_from_subject(subject) -> Problem:
    return build_problem(subject.scans, subject.mask, subject.affine, subject.times_h)


# ------------------------------------------------------------------ state I/O
# The training state is stored as one torch.save blob inside checkpoint.h5. It holds only tensors and plain
# values (dict, list, tuple, str, int, float, bool, None); numpy arrays travel as tagged tensors. It is read
# back with torch.load(weights_only=True), which refuses anything else: a planted file cannot run code.
_NDARRAY = "__ndarray__"


def _plain(obj):
    """``obj`` with numpy arrays/scalars replaced by tensors/Python values (torch's weights-only types)."""
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.array(obj, copy=True))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _unplain(obj):
    if isinstance(obj, dict):
        if set(obj) == {_NDARRAY}:
            return obj[_NDARRAY].numpy()
        return {k: _unplain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unplain(v) for v in obj)
    return obj


def _to_blob(obj) -> np.ndarray:
    buf = io.BytesIO()
    torch.save(_plain(obj), buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def _from_blob(arr, where="checkpoint") -> dict:
    """The state of a blob written by :func:`_to_blob`; anything but tensors and plain values is refused."""
    try:
        obj = torch.load(io.BytesIO(np.asarray(arr, dtype=np.uint8).tobytes()), weights_only=True,
                         map_location="cpu")
    except Exception as exc:  # pickle.UnpicklingError for foreign objects, RuntimeError for damaged data
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{where}: the PINN state holds something other than tensors and plain values, "
                         f"refused ({msg}); delete it or run with --fresh") from None
    return _unplain(obj)


# ------------------------------------------------------------------ trainer
@dataclass
class MemberResult:
    """One ensemble member's outcome."""

    seed: int
    D: float
    history: dict
    events: list = field(default_factory=list)
    residual_t: np.ndarray | None = None
    t_grid: np.ndarray | None = None
    residual_norm: float = float("nan")
    prediction: np.ndarray | None = None  # (p, n_mask) at the scan times
    train_s: float = 0.0
    rank_spread: float = 0.0  # max |theta_rank - theta_rank0| over ranks and parameters (delta included)
    early_stop_reason: str = ""  # non-empty: stopped as hopeless (see PinnConfig.early_stop_epochs)
    warnings: list = field(default_factory=list)  # non-convergence (D still moving, residual not fallen)
    free_steps: int = 0  # optimizer steps with D free (after delta_freeze_epochs)


class Trainer:
    """Trains one PINN (one ensemble member) on a :class:`Problem`.

    Args:
        problem: the data and domain.
        cfg: settings.
        ctx: the communicator (serial: one process on the CPU).
        seed: seed of the network initialisation and all point draws.
    """

    def __init__(self, problem: Problem, cfg: PinnConfig, ctx: DistContext = SERIAL, seed: int = 0):
        cfg = resolve_schedule(cfg, problem)
        self.pb, self.cfg = problem, cfg
        self.ctx = ctx
        self.seed = int(seed)
        self.dtype = DTYPES[cfg.dtype]
        dev = self.ctx.device
        if dev.type == "cpu":
            tune_malloc()
        self.gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = PinnNet(cfg.depth, cfg.width, cfg.activation, problem.lo, problem.hi, problem.out_scale,
                          compiled=cfg.compile, x_scale=cfg.x_scale, t_scale=cfg.t_scale)
        dcoef = DiffusionCoefficient(cfg.d_param, cfg.delta0, cfg.d_min, cfg.d_max)
        self.model = PinnModel(net, dcoef).to(device=dev, dtype=self.dtype)
        self.ddp = self.ctx.data_parallel(self.model)
        # fused Adam: one kernel per parameter instead of about a dozen ops (on CPU and CUDA alike)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr_start, fused=True)
        gamma = (cfg.lr_end / cfg.lr_start) ** (1.0 / cfg.epochs)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=gamma)
        self.data_xt = torch.as_tensor(problem.data_xt, dtype=self.dtype, device=dev)
        self.data_c = torch.as_tensor(problem.data_c, dtype=self.dtype, device=dev)
        self.sampler = InteriorSampler.from_mask(problem.interior, problem.affine, problem.times_h[0],
                                                 problem.times_h[-1], dtype=self.dtype)
        self.n_base = cfg.pde_points or self.data_xt.shape[0]
        self.pde = self.sampler.draw(self.n_base, self.gen)  # global set, CPU
        self.epoch = 0
        self.history: dict[str, list] = {k: [] for k in (
            "epoch", "D", "loss", "loss_data", "loss_pde", "p", "lr", "n_pde", "seconds")}
        self.residual_checks: dict[str, list] = {"epoch": [], "residual_norm": []}
        self.events: list[dict] = []
        self.train_s = 0.0

    # -------------------------------------------------------------- state
    def D(self) -> float:
        return float(self.model.dcoef().detach().cpu())

    def state(self) -> dict:
        """Everything needed to continue bit-for-bit (torch objects serialised to bytes)."""
        return {
            "model": self.model.state_dict(), "optim": self.opt.state_dict(),
            "sched": self.sched.state_dict(), "pde": self.pde, "n_base": self.n_base,
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "epoch": self.epoch, "history": self.history, "events": self.events,
            "residual_checks": self.residual_checks, "seed": self.seed, "train_s": self.train_s,
        }

    def load_state(self, st: dict) -> None:
        if st["seed"] != self.seed:
            raise InputError(f"checkpoint is of seed {st['seed']}, not {self.seed}")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.sched.load_state_dict(st["sched"])
        self.pde, self.n_base = st["pde"].to(self.dtype), int(st["n_base"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        if st.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.epoch = int(st["epoch"])
        self.history, self.events = st["history"], st["events"]
        self.residual_checks, self.train_s = st["residual_checks"], float(st["train_s"])

    # -------------------------------------------------------------- refinement
    def abs_residual(self, pts: torch.Tensor) -> torch.Tensor:
        """|residual| at global points (sharded evaluation, gathered; CPU tensor)."""
        return abs_residual(self.model, pts, self.ctx).cpu()

    def refine(self) -> None:
        """RAR / RAE / resampling due before the current epoch."""
        cfg, e = self.cfg, self.epoch
        if cfg.resample_every and e > 0 and e % cfg.resample_every == 0:
            self.pde = torch.cat((self.sampler.draw(self.n_base, self.gen), self.pde[self.n_base:]))
        if e in cfg.rar_epochs:
            self.pde, added = rar_add(self.pde, self.sampler, self.abs_residual, cfg.rar_pool,
                                      cfg.rar_add, self.gen)
            self.events.append({"epoch": e, "kind": "rar", "t": added[:, 3].double().numpy()})
            log.debug("epoch %d: RAR added %d points (now %d)", e, added.shape[0], self.pde.shape[0])
        if e in cfg.rae_epochs:
            self.pde, removed, inserted = rae_exchange(self.pde, self.sampler, self.abs_residual,
                                                       cfg.rar_pool, cfg.rae_fraction, self.gen)
            self.events.append({"epoch": e, "kind": "rae", "t": inserted[:, 3].double().numpy(),
                                "t_removed": removed[:, 3].double().numpy()})
            log.debug("epoch %d: RAE exchanged %d points", e, inserted.shape[0])

    # -------------------------------------------------------------- one epoch
    def run_epoch(self) -> dict:
        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        t_start = time.perf_counter()
        self.refine()
        p = p_at(cfg.p_schedule, self.epoch, cfg.switch_epoch)
        nd, npde = self.data_xt.shape[0], self.pde.shape[0]
        dperm = torch.randperm(nd, generator=self.gen)
        pperm = torch.randperm(npde, generator=self.gen)
        sums = torch.zeros(2, dtype=torch.float64, device=dev)
        self.ddp.train()
        for db, pb in zip(torch.tensor_split(dperm, cfg.batches), torch.tensor_split(pperm, cfg.batches)):
            nb_d, nb_p = db.numel(), pb.numel()  # global minibatch sizes
            if ctx.size > 1:
                db, pb = torch.tensor_split(db, ctx.size)[ctx.rank], torch.tensor_split(pb, ctx.size)[ctx.rank]
            di = db.to(dev)
            xp = self.pde.index_select(0, pb).to(dev)  # index_select: the fast path of a row gather
            self.opt.zero_grad(set_to_none=True)
            c_pred, res = self.ddp(self.data_xt.index_select(0, di), xp)
            J, L, sq, rp = shard_losses(c_pred, self.data_c.index_select(0, di), res, p, nb_d, nb_p, ctx.size)
            (J + cfg.w_r * L).backward()
            if self.epoch < cfg.delta_freeze_epochs:
                self.model.dcoef.delta.grad = None  # Adam leaves a parameter without gradient untouched
            self.opt.step()
            sums += torch.stack((sq, rp)).to(torch.float64)
        self.sched.step()
        sums = ctx.allreduce_sum(sums)
        J, L = float(sums[0]) / nd, float(sums[1]) / npde
        self.epoch += 1
        dt = time.perf_counter() - t_start
        self.train_s += dt
        rec = {"epoch": self.epoch, "D": self.D(), "loss": J + cfg.w_r * L, "loss_data": J, "loss_pde": L,
               "p": p, "lr": self.opt.param_groups[0]["lr"], "n_pde": npde, "seconds": dt}
        for k, v in rec.items():
            self.history[k].append(v)
        return rec

    # -------------------------------------------------------------- L-BFGS
    def lbfgs(self, steps: int, chunk: int = 32768) -> None:
        """Full-batch L-BFGS (gradients accumulated over chunks, averaged over ranks)."""
        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        p = p_at(cfg.p_schedule, self.epoch, cfg.switch_epoch)
        opt = torch.optim.LBFGS(self.model.parameters(), lr=1.0, max_iter=steps, history_size=50,
                                line_search_fn="strong_wolfe")
        nd, npde = self.data_xt.shape[0], self.pde.shape[0]
        dshard = torch.tensor_split(torch.arange(nd), ctx.size)[ctx.rank]
        pshard = torch.tensor_split(torch.arange(npde), ctx.size)[ctx.rank]
        nch = max(1, -(-max(dshard.numel(), pshard.numel()) // chunk))

        def closure():
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for di, pi in zip(torch.tensor_split(dshard, nch), torch.tensor_split(pshard, nch)):
                c_pred, res = self.model(self.data_xt[di.to(dev)], self.pde[pi].to(dev))
                J, L, _, _ = shard_losses(c_pred, self.data_c[di.to(dev)], res, p, nd, npde, 1)
                loss = J + cfg.w_r * L
                loss.backward()
                total += loss.detach().double()
            ctx.average_gradients(self.model.parameters())  # by hand: no DDP hooks here
            return ctx.allreduce_sum(total).to(self.dtype)

        opt.step(closure)
        self.history["D"].append(self.D())
        self.history["epoch"].append(self.epoch)
        for k in ("loss", "loss_data", "loss_pde", "p", "lr", "n_pde", "seconds"):
            self.history[k].append(self.history[k][-1] if self.history[k] else float("nan"))


# ------------------------------------------------------------------ ensembles
def fit(problem: Problem, cfg: PinnConfig, ctx: DistContext = SERIAL, checkpointer=None,
        callback=None, quiet: bool | None = None) -> list[MemberResult]:
    """Train ``cfg.ensemble`` members (seeds ``cfg.seed + k``), checkpointing and resuming.

    Args:
        problem: data and domain.
        cfg: settings.
        ctx: the communicator (serial by default).
        checkpointer: a :class:`glymphmpi.store.Checkpointer` or None.
        callback: ``callback(trainer, record)`` after every epoch (tests use it).
        quiet: progress bar off.
    Returns:
        One :class:`MemberResult` per member (diagnostics included).
    Raises:
        Preempted: after a checkpoint, when SIGTERM/SIGUSR1 arrived.
    """
    from glymphmpi.log import progress

    cfg = resolve_schedule(cfg, problem)
    if ctx.rank == 0:
        log.info("schedule: %d epochs x %d minibatches, delta held for %d epochs, RAR at epochs %s, "
                 "lr %.3g -> %.3g, p %s, w_r %g, %d member%s", cfg.epochs, cfg.batches, cfg.delta_freeze_epochs,
                 list(cfg.rar_epochs) or "none", cfg.lr_start, cfg.lr_end, cfg.p_schedule, cfg.w_r, cfg.ensemble,
                 "" if cfg.ensemble == 1 else "s")
    done: list[dict] = []
    resume = checkpointer.load() if checkpointer is not None else None
    start_member, trainer_state = 0, None
    if resume is not None:
        st = _from_blob(resume[0]["blob"], getattr(checkpointer, "path", "checkpoint"))
        done, start_member, trainer_state = st["done"], st["member"], st["trainer"]
        if ctx.rank == 0:
            log.info("resuming from checkpoint: member %d, epoch %d", start_member,
                     trainer_state["epoch"] if trainer_state else 0)
    results = [MemberResult(**d) for d in done]
    for m in range(start_member, cfg.ensemble):
        seed = cfg.seed + m
        tr = Trainer(problem, cfg, ctx, seed)
        if trainer_state is not None:
            tr.load_state(trainer_state)
            trainer_state = None
        if ctx.rank == 0:
            log.info("member %d/%d (seed %d): %d data points, %d PDE points, D0 = %.4g mm^2/h, "
                     "%d ranks on %s, %s", m + 1, cfg.ensemble, seed, tr.data_xt.shape[0], tr.pde.shape[0],
                     tr.D(), ctx.size, ctx.device, cfg.dtype)

        def state_fn(tr=tr, m=m):
            return {"blob": _to_blob({"done": [r.__dict__ for r in results], "member": m,
                                      "trainer": tr.state()}), "member": m, "epoch": tr.epoch}

        bar = progress(range(tr.epoch, cfg.epochs), quiet=quiet if ctx.rank == 0 else True,
                       desc=f"pinn member {m + 1}", initial=tr.epoch, total=cfg.epochs)
        stop_reason = ""
        for _ in bar:
            rec = tr.run_epoch()
            _require_finite(rec, m)
            if callback is not None:
                callback(tr, rec)
            if tr.epoch == _late_epoch(cfg) and "late" not in tr.residual_checks:
                _, norm = _residual_check(tr, problem, cfg, quick=True)  # 90% of the epochs: still falling?
                tr.residual_checks["late"] = [norm]
                tr.residual_checks["epoch"].append(tr.epoch)
                tr.residual_checks["residual_norm"].append(norm)
            if tr.epoch == _baseline_epoch(cfg) and "baseline" not in tr.residual_checks:
                _, norm = _residual_check(tr, problem, cfg, quick=True)  # when D starts to move
                tr.residual_checks["baseline"] = [norm]
                tr.residual_checks["epoch"].append(tr.epoch)
                tr.residual_checks["residual_norm"].append(norm)
            if cfg.early_stop_epochs:
                stop_reason = _hopeless(tr, problem, cfg)
                if stop_reason:
                    if ctx.rank == 0:
                        log.warning("member %d stopped early at epoch %d: %s", m + 1, tr.epoch, stop_reason)
                    break
            if cfg.checkpoint_every and tr.epoch % cfg.checkpoint_every == 0 and tr.epoch < cfg.epochs:
                _, norm = _residual_check(tr, problem, cfg, quick=True)
                tr.residual_checks["epoch"].append(tr.epoch)
                tr.residual_checks["residual_norm"].append(norm)
            if ctx.rank == 0 and (tr.epoch % cfg.log_every == 0 or tr.epoch == cfg.epochs):
                log.info("epoch %d: D = %.5f mm^2/h, J = %.3e, L_r = %.3e (p = %d), lr = %.2e, %.2f s/epoch",
                         tr.epoch, rec["D"], rec["loss_data"], rec["loss_pde"], rec["p"], rec["lr"],
                         rec["seconds"])
            if checkpointer is not None:
                checkpointer.step(m * cfg.epochs + tr.epoch, state_fn)
        if cfg.lbfgs_steps and not stop_reason:
            tr.lbfgs(cfg.lbfgs_steps)
            _require_finite({"loss": 0.0, "D": tr.D(), "epoch": tr.epoch}, m)
            if ctx.rank == 0:
                log.info("after %d L-BFGS iterations: D = %.5f mm^2/h", cfg.lbfgs_steps, tr.D())
        spread = rank_spread(tr.model, ctx)
        warnings = [] if stop_reason else _convergence(tr, problem, cfg)
        s = problem.intensity_scale  # back to the units of the data
        t_grid, r = _residual_check(tr, problem, cfg, quick=False)
        r = r * s
        pred = None
        if ctx.rank == 0:
            xyz = torch.as_tensor(problem.mask_xyz, dtype=tr.dtype)
            pred = s * np.stack([predict(tr.model.net, torch.cat(
                (xyz, torch.full((xyz.shape[0], 1), float(t), dtype=tr.dtype)), 1)).double().cpu().numpy()
                for t in problem.times_h])
        res = MemberResult(seed=seed, D=tr.D(), history=tr.history, events=tr.events,
                           residual_t=r, t_grid=t_grid, residual_norm=float(np.mean(r)),
                           prediction=pred, train_s=tr.train_s, rank_spread=spread,
                           early_stop_reason=stop_reason, warnings=warnings,
                           free_steps=max(0, tr.epoch - cfg.delta_freeze_epochs) * cfg.batches)
        if not (math.isfinite(res.D) and math.isfinite(res.residual_norm)):
            raise TrainingFailed(f"member {m + 1}: D = {res.D} mm^2/h, residual norm {res.residual_norm} is not "
                                 "finite: the training diverged")
        res.history = dict(tr.history, residual_check_epoch=tr.residual_checks["epoch"],
                           residual_check_norm=[v * s for v in tr.residual_checks["residual_norm"]])
        results.append(res)
        if ctx.rank == 0:
            log.info("member %d: D = %.5f mm^2/h, residual norm %.4e, %.1f s training", m + 1, res.D,
                     res.residual_norm, res.train_s)
            for w in warnings:
                log.warning("member %d: %s", m + 1, w)
        del tr
        if stop_reason:  # a hopeless set-up: the other members would not fare better
            break
    return results


def _late_epoch(cfg: PinnConfig) -> int:
    """The epoch of the residual check that tells whether the residual norm is still falling at the end:
    the last 10% of the epochs begin there."""
    return cfg.epochs - max(1, math.ceil(0.1 * cfg.epochs))


def _baseline_epoch(cfg: PinnConfig) -> int:
    """The epoch after which the reference residual norm is taken: the first one with delta free."""
    return cfg.delta_freeze_epochs + 1


def _require_finite(rec: dict, member: int) -> None:
    """A non-finite loss or D ends the run as failed (identical on every rank: losses are all-reduced)."""
    if not (math.isfinite(rec["loss"]) and math.isfinite(rec["D"])):
        raise TrainingFailed(f"member {member + 1}, epoch {rec['epoch']}: loss = {rec['loss']}, D = {rec['D']} "
                             "is not finite: the training diverged (lower pinn.lr_start or check the scans)")


def _hopeless(tr: Trainer, problem: Problem, cfg: PinnConfig) -> str:
    """Why this run is hopeless at this epoch ("" if it is not, or not a check epoch).

    The reference residual norm is the one when delta is released (after epoch
    ``delta_freeze_epochs + 1``; kept in the checkpointed ``residual_checks``, so a resumed run
    decides the same). Check epochs up to that one judge nothing: D could not have moved yet.
    """
    checks = tr.residual_checks
    if tr.epoch not in cfg.early_stop_epochs or tr.epoch <= _baseline_epoch(cfg):
        return ""
    reasons = []
    if cfg.d_param == "sigmoid" and tr.D() <= cfg.d_min + cfg.early_stop_d_margin * cfg.d_max:
        reasons.append(f"D = {tr.D():.4g} mm^2/h stuck at the lower bound {cfg.d_min:g}")
    base = checks["baseline"][0] if "baseline" in checks else None
    _, norm = _residual_check(tr, problem, cfg, quick=True)
    checks["epoch"].append(tr.epoch)
    checks["residual_norm"].append(norm)
    if base is not None and norm > (1.0 - cfg.early_stop_min_drop) * base:
        reasons.append(f"residual norm {norm:.3g} not below {1 - cfg.early_stop_min_drop:.2f} x its value "
                       f"{base:.3g} when delta was released (epoch {_baseline_epoch(cfg)})")
    return "; ".join(reasons)


def _convergence(tr: Trainer, problem: Problem, cfg: PinnConfig) -> list[str]:
    """Non-convergence warnings of a finished member: D still moving over the last 10% of the epochs
    (by more than CONVERGED_D_CHANGE relative), the residual norm not fallen by
    ``early_stop_min_drop`` since delta was released, or the residual norm still falling by more than
    CONVERGED_RESIDUAL_FALL over the last 10% of the epochs (the network still training: a settled D
    is not yet a converged one)."""
    out = []
    D = tr.history["D"]
    free = len(D) - cfg.delta_freeze_epochs
    k = max(1, math.ceil(0.1 * len(D)))
    if free > k and D[-1] != 0:
        change = abs(D[-1] - D[-1 - k]) / abs(D[-1])
        if change > CONVERGED_D_CHANGE:
            out.append(f"not converged: D still moving over the last {k} epochs ({D[-1 - k]:.4g} -> {D[-1]:.4g} "
                       f"mm^2/h, {change:.1%} > {CONVERGED_D_CHANGE:.0%})")
    checks = tr.residual_checks
    if "baseline" in checks and tr.epoch > _baseline_epoch(cfg):
        _, norm = _residual_check(tr, problem, cfg, quick=True)
        checks["epoch"].append(tr.epoch)
        checks["residual_norm"].append(norm)
        base = checks["baseline"][0]
        if norm > (1.0 - cfg.early_stop_min_drop) * base:
            out.append(f"not converged: the PDE residual norm did not fall since D was released "
                       f"({norm / base:.2f} x its value at epoch {_baseline_epoch(cfg)})")
        late = checks.get("late", [None])[0]
        still_falling = late is not None and norm < (1.0 - CONVERGED_RESIDUAL_FALL) * late
        if still_falling and _late_epoch(cfg) > _baseline_epoch(cfg):
            out.append(f"not converged: the PDE residual norm still fell by {1 - norm / late:.1%} over the last "
                       f"{tr.epoch - _late_epoch(cfg)} epochs ({late:.3g} -> {norm:.3g}; more than "
                       f"{CONVERGED_RESIDUAL_FALL:.0%}): the network was still training, D may still change")
    return out


def summary_fields(members: list[MemberResult], problem: Problem, cfg: PinnConfig, ctx: DistContext) -> dict:
    """The summary of an ensemble: D (mean, spread, members), residual norm in the data's units,
    the resolved schedule, convergence warnings and whether the number is an estimate at all."""
    cfg = resolve_schedule(cfg, problem)
    Ds = np.array([m.D for m in members])
    warnings = [f"member {k + 1}: {w}" for k, m in enumerate(members) for w in m.warnings]
    early = [m.early_stop_reason for m in members if m.early_stop_reason]
    steps = min(m.free_steps for m in members)
    reason = ""
    if early:
        reason = "stopped early as hopeless: " + "; ".join(early)
    elif steps < SMOKE_STEPS:
        reason = (f"smoke test, not an estimate: {steps} optimizer steps with D free (an estimate needs at "
                  f"least {SMOKE_STEPS}; the automatic schedule, pinn.epochs = 0, gives about {AUTO_STEPS})")
    last = members[0].history
    return {
        "D_mm2_per_h": float(Ds.mean()),
        "D_std_mm2_per_h": float(Ds.std(ddof=1)) if Ds.size > 1 else 0.0,
        "D_members_mm2_per_h": Ds.tolist(),
        "estimate": not reason, "estimate_reason": reason,
        "converged": not reason and not warnings, "warnings": warnings,
        "residual_norm": float(np.mean([m.residual_norm for m in members])),
        "intensity_scale": problem.intensity_scale,
        "final_loss_data": float(np.mean([m.history["loss_data"][-1] for m in members])),
        "final_loss_pde": float(np.mean([m.history["loss_pde"][-1] for m in members])),
        "epochs": cfg.epochs, "batches": cfg.batches, "delta_freeze_epochs": cfg.delta_freeze_epochs,
        "rar_epochs": list(cfg.rar_epochs), "ensemble": cfg.ensemble, "members_trained": len(members),
        "pde_points_final": int(last["n_pde"][-1]),
        "device": str(ctx.device), "world_size": ctx.size, "backend": ctx.backend, "dtype": cfg.dtype,
        "train_s": float(sum(m.train_s for m in members)),
        "early_stopped": bool(early), "early_stop_reason": "; ".join(early),
        "max_rank_difference": float(max(m.rank_spread for m in members)),
    }


def rank_spread(model, ctx: DistContext) -> float:
    """Largest difference of D and of the parameters between any rank and rank 0 (0 on one process)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    parts = ctx.all_gather_tensor(flat)
    return float(max((q - parts[0]).abs().max() for q in parts))


def residual_voxels(problem: Problem, cfg: PinnConfig, quick: bool = False) -> np.ndarray:
    """(M, 3) interior voxel centres for r(t) (a fixed random subset when there are many)."""
    ijk = np.argwhere(problem.interior).astype(np.float64)
    xyz = ijk @ problem.affine[:3, :3].T + problem.affine[:3, 3]
    limit = min(cfg.residual_voxels or xyz.shape[0], 2000 if quick else xyz.shape[0])
    if xyz.shape[0] > limit:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(xyz.shape[0], limit, replace=False))
        xyz = xyz[idx]
    return xyz


def _residual_check(tr: Trainer, problem: Problem, cfg: PinnConfig, quick: bool):
    """r(t) (full after training; 20 times x <= 2000 voxels at checkpoints)."""
    xyz = torch.as_tensor(residual_voxels(problem, cfg, quick), dtype=tr.dtype)
    nt = min(20, cfg.residual_times) if quick else cfg.residual_times
    t_grid = np.linspace(problem.times_h[0], problem.times_h[-1], nt)
    r, norm = residual_over_time(tr.model, xyz, t_grid, tr.ctx)
    return (t_grid, r) if not quick else (r, norm)
