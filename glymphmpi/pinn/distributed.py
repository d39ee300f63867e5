"""torch.distributed set-up for the PINN: device choice, process group, a small comm adapter.

Rank and world size come from the launcher (torchrun, ``mpirun``/Open MPI,
SLURM ``srun``) through :func:`glymphmpi.parallel.torch_dist_env`. The
backend is gloo on CPUs and nccl on GPUs. The communicator gives the run
directory and checkpointer (written for mpi4py communicators) the handful of
collectives they use, over the torch process group, so that the CLI works
under torchrun where there is no MPI world. :class:`DistContext` is that
communicator, always present (a serial one on one process).
"""

from __future__ import annotations

import datetime
import gc
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glymphmpi.errors import MissingDependency

log = logging.getLogger(__name__)


def select_device(pref: str, local_rank: int = 0) -> tuple[torch.device, str]:
    """(device, sentence for the log). ``cuda`` without a GPU is an error."""
    has_cuda = torch.cuda.is_available()
    if pref == "cuda" and not has_cuda:
        raise MissingDependency("pinn.device = 'cuda' was asked for but torch sees no CUDA GPU "
                                f"(torch {torch.__version__}); use pinn.device=cpu or auto")
    if pref == "cuda" or (pref == "auto" and has_cuda):
        idx = local_rank % max(1, torch.cuda.device_count())
        return torch.device("cuda", idx), f"running on GPU {torch.cuda.get_device_name(idx)}"
    if pref == "auto":
        return torch.device("cpu"), "no CUDA GPU found: running on CPU"
    return torch.device("cpu"), "running on CPU (pinn.device = cpu)"


@dataclass
class DistContext:
    """The PINN's communicator: rank, world size, device, backend and the collectives.

    Always present: one process gets a serial context (size 1, no process
    group), whose collectives are the identity, so callers never test for a
    missing communicator. It also offers the mpi4py-like subset that the run
    directory, checkpointer and stop flag use (``rank``, ``size``, ``bcast``,
    ``Barrier``, ``allgather``, ``gather``, ``allreduce``), so it is the
    ``comm`` handed to ``solve`` (under torchrun there is no MPI world).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.size > 1

    # ---------------------------------------------------------- tensors
    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_shards(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's 1-D shard (rank order); ``counts`` are the shard sizes."""
        if not self.active:
            return local
        m = max(counts)
        buf = torch.zeros(m, dtype=local.dtype, device=local.device)
        buf[:local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def all_gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of an equally shaped tensor (rank order)."""
        if not self.active:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return parts

    def average_gradients(self, params) -> None:
        """Sum the gradients over the ranks in place (the loss carries the 1/size factor)."""
        if self.active:
            for prm in params:
                if prm.grad is not None:
                    dist.all_reduce(prm.grad)

    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model wrapped for gradient averaging (DistributedDataParallel; itself on one process)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        return DDP(model, **kw)

    # ---------------------------------------------------------- Python objects (mpi4py-like)
    def bcast(self, obj, root: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
        if self.active:
            dist.barrier()

    barrier = Barrier

    def allgather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj, root: int = 0):
        out = self.allgather(obj)
        return out if self.rank == root else None

    def allreduce(self, obj, op=None):
        """Reduce Python values; ``op`` is an mpi4py op (LOR, LAND, SUM, MAX, MIN) or None (SUM)."""
        vals = self.allgather(obj)
        name = _op_name(op)
        if name == "LOR":
            return any(vals)
        if name == "LAND":
            return all(vals)
        if name == "MAX":
            return max(vals)
        if name == "MIN":
            return min(vals)
        total = vals[0]
        for v in vals[1:]:
            total = total + v
        return total


SERIAL = DistContext()
"""One process on the CPU (the default of library calls such as :func:`glymphmpi.pinn.trainer.fit`)."""


def init_distributed(device_pref: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Initialise the process group when the launcher started several processes.

    One process: no process group. Several: gloo (CPU) or nccl (GPU), env://.
    """
    from glymphmpi.parallel import torch_dist_env

    env = torch_dist_env()
    rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device, msg = select_device(device_pref, local)
    if rank == 0:
        log.info("%s", msg)
    if size == 1:
        return DistContext(0, 1, 0, device, "none", False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    if rank == 0:
        log.info("torch.distributed: %d processes, backend %s, master %s:%s", size, backend,
                 env["MASTER_ADDR"], env["MASTER_PORT"])
    return DistContext(rank, size, local, device, backend, owns)


def teardown(ctx: DistContext) -> None:
    """Collective clean-up that avoids the exit-time abort seen after DDP.

    The caller drops its references to DDP models first; then: garbage
    collection, barrier, destroy the process group (STACK_NOTES).
    """
    gc.collect()
    if ctx.owns_group and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _op_name(op) -> str:
    if op is None:
        return "SUM"
    try:
        from mpi4py import MPI

        for name in ("LOR", "LAND", "MAX", "MIN", "SUM"):
            if op == getattr(MPI, name):
                return name
    except ImportError:  # pragma: no cover
        pass
    return str(op).upper()
