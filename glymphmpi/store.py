"""Run output directory, results/checkpoint HDF5, summary.json, atomic writes.

Layout of a run directory (DESIGN.md section 2)::

    OUT/summary.json   written last, atomically; status "complete" when done
    OUT/results.h5     results; root attrs carry the provenance
    OUT/checkpoint.h5  restart state
    OUT/maps/ figures/ vtk/ log.txt

Every write goes to a temporary file in the same directory, is flushed and
fsync'ed, then renamed over the target: a kill at any instant leaves either
the old or the new file, never a partial one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from glymphmpi import __version__
from glymphmpi.errors import InputError, Preempted

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- atomic
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns() % 10**9}{suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_nifti(path, data, affine, header_extra: dict | None = None, keep_dtype: bool = False) -> Path:
    """Write a NIfTI image atomically (``.nii`` or ``.nii.gz``) with the given affine.

    float64 data is stored as float32 unless ``keep_dtype``.
    """
    import nibabel as nib

    path = Path(path)
    arr = np.asarray(data)
    if arr.dtype == np.float64 and not keep_dtype:
        arr = arr.astype(np.float32)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    if header_extra and "descrip" in header_extra:
        img.header["descrip"] = str(header_extra["descrip"])[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


# ----------------------------------------------------------------- HDF5 trees
def _h5():
    import h5py

    return h5py


def _write_node(grp, key: str, value) -> None:
    h5py = _h5()
    if value is None:
        return
    if isinstance(value, dict):
        sub = grp.create_group(key)
        for k, v in value.items():
            _write_node(sub, str(k), v)
        return
    if isinstance(value, str):
        ds = grp.create_dataset(key, data=value, dtype=h5py.string_dtype())
        ds.attrs["kind"] = "str"
        return
    if isinstance(value, (bool, np.bool_)):
        ds = grp.create_dataset(key, data=np.bool_(value))
        ds.attrs["kind"] = "bool"
        return
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and not (
            isinstance(value, int) and not -(2**63) <= value < 2**63):
        ds = grp.create_dataset(key, data=value)
        ds.attrs["kind"] = "scalar"
        return
    if isinstance(value, np.ndarray) and value.dtype != object:
        opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if value.size > 4096 else {}
        grp.create_dataset(key, data=value, **opts)
        return
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value
    ):
        ds = grp.create_dataset(key, data=np.asarray(value))
        ds.attrs["kind"] = "list"
        return
    ds = grp.create_dataset(key, data=np.void(pickle.dumps(value, protocol=4)))
    ds.attrs["kind"] = "pickle"


def _read_node(node):
    h5py = _h5()
    if isinstance(node, h5py.Group):
        return {k: _read_node(node[k]) for k in node.keys()}
    kind = node.attrs.get("kind", "")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind == "str":
        return node.asstr()[()]
    if kind == "bool":
        return bool(node[()])
    if kind == "scalar":
        return node[()].item()
    if kind == "list":
        return node[()].tolist()
    if kind == "pickle":
        return pickle.loads(node[()].tobytes())
    return node[()]


def write_h5_tree(path, tree: dict, attrs: dict | None = None) -> Path:
    """Write a nested dict of arrays/scalars/strings to HDF5 atomically.

    Dicts become groups, arrays datasets (gzip when large), other Python objects
    (e.g. RNG states) pickled into opaque datasets. ``attrs`` go on the root.
    """
    h5py = _h5()
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            for k, v in (attrs or {}).items():
                fh.attrs[k] = v if not isinstance(v, (dict, list)) else json.dumps(v, default=_json_default)
            for k, v in tree.items():
                _write_node(fh, str(k), v)
            fh.attrs["complete"] = True
    return path


def read_h5_tree(path) -> tuple[dict, dict]:
    """Read a file written by :func:`write_h5_tree`: (tree, root attrs)."""
    h5py = _h5()
    with h5py.File(path, "r") as fh:
        if not fh.attrs.get("complete", False):
            raise OSError(f"{path}: incomplete HDF5 file")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
        return {k: _read_node(fh[k]) for k in fh.keys()}, attrs


# ----------------------------------------------------------------- provenance
def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config=None, subject_id: str | None = None, mpi_size: int = 1) -> dict:
    from glymphmpi.config import to_json

    return {
        "version": __version__,
        "git_sha": git_sha(),
        "config": to_json(config) if config is not None else "{}",
        "subject": subject_id or "",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "mpi_size": int(mpi_size),
        "hostname": socket.gethostname(),
    }


# ----------------------------------------------------------------- parallel
def parallel_h5_available() -> bool:
    return bool(_h5().get_config().mpi)


def write_h5_collective(path, name: str, local: np.ndarray, offset: int, global_len: int, comm,
                        attrs: dict | None = None) -> Path:
    """Ranks write their row blocks of one dataset into one file together (``mpio``).

    Args:
        path: target file (written to a temporary name, renamed by rank 0).
        name: dataset name.
        local: this rank's rows, shape (n_local, ...).
        offset: first global row of this rank.
        global_len: total rows.
        comm: communicator; with one rank, or without MPI-enabled h5py, the
            blocks are gathered and rank 0 writes (said in a debug log).
    """
    h5py = _h5()
    path = Path(path)
    tmp = Path(comm.bcast(str(_tmp_name(path)) if comm.rank == 0 else None, root=0))
    shape = (global_len,) + tuple(local.shape[1:])
    if comm.size > 1 and parallel_h5_available():
        with h5py.File(tmp, "w", driver="mpio", comm=comm) as fh:
            ds = fh.create_dataset(name, shape=shape, dtype=local.dtype)
            with ds.collective:
                ds[offset:offset + local.shape[0]] = local
            for k, v in (attrs or {}).items():
                fh.attrs[k] = v
            fh.attrs["complete"] = True
    else:
        if comm.size > 1:
            log.debug("h5py without MPI: gathering %s on rank 0", name)
        blocks = comm.gather((offset, local), root=0)
        if comm.rank == 0:
            with h5py.File(tmp, "w") as fh:
                ds = fh.create_dataset(name, shape=shape, dtype=local.dtype)
                for off, blk in blocks:
                    ds[off:off + blk.shape[0]] = blk
                for k, v in (attrs or {}).items():
                    fh.attrs[k] = v
                fh.attrs["complete"] = True
    comm.Barrier()
    if comm.rank == 0:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    comm.Barrier()
    return path


# ----------------------------------------------------------------- signals
class StopFlag:
    """Records SIGTERM/SIGUSR1 so that a solver can checkpoint and exit 75.

    Install once at the CLI edge (``with StopFlag.installed(): ...``); solvers
    poll :meth:`requested` (collective via :meth:`agreed`).
    """

    _signal: int | None = None

    @classmethod
    def _handler(cls, signum, frame):  # noqa: ARG003
        cls._signal = signum
        log.warning("received signal %d: will checkpoint and stop", signum)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, signals=(signal.SIGTERM, signal.SIGUSR1)):
        old = {s: signal.signal(s, cls._handler) for s in signals}
        try:
            yield cls
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @classmethod
    def requested(cls) -> bool:
        return cls._signal is not None

    @classmethod
    def agreed(cls, comm) -> bool:
        """Collective: True on all ranks if any rank received a signal."""
        if comm is None or comm.size == 1:
            return cls.requested()
        from mpi4py import MPI

        return bool(comm.allreduce(cls.requested(), op=MPI.LOR))

    @classmethod
    def reset(cls) -> None:
        cls._signal = None


# ----------------------------------------------------------------- checkpoints
class Checkpointer:
    """Save/load restart state every N iterations and on SIGTERM/SIGUSR1.

    State is a dict of arrays, scalars, strings and picklable objects (RNG
    states). Files: ``checkpoint.h5`` and the previous one
    ``checkpoint.prev.h5``; :meth:`load` returns the newest that loads.

    Args:
        path: checkpoint file (``OUT/checkpoint.h5``).
        every: save when ``iteration % every == 0`` (0 disables periodic saves).
        comm: communicator; only rank 0 writes unless ``per_rank``.
        per_rank: each rank keeps its own file ``checkpoint.rank{r}.h5``.
    """

    def __init__(self, path, every: int = 1, comm=None, per_rank: bool = False):
        path = Path(path)
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank
        self.per_rank = per_rank
        if per_rank:
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        self.path = path
        self.prev = path.with_name(f"{path.stem}.prev{path.suffix}")
        self.every = int(every)
        self.writes = self.per_rank or self.rank == 0

    def save(self, state: dict, iteration: int) -> None:
        if self.writes:
            tree = {"state": state, "iteration": int(iteration)}
            tmp = _tmp_name(self.path)
            h5py = _h5()
            try:
                with h5py.File(tmp, "w") as fh:
                    fh.attrs["version"] = __version__
                    fh.attrs["iteration"] = int(iteration)
                    fh.attrs["saved"] = time.time()
                    for k, v in tree.items():
                        _write_node(fh, k, v)
                    fh.attrs["complete"] = True
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                if self.path.exists():
                    os.replace(self.path, self.prev)
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
            finally:
                if tmp.exists():
                    tmp.unlink()
        if self.comm is not None and self.comm.size > 1:
            self.comm.Barrier()

    def load(self) -> tuple[dict, int] | None:
        """Newest valid (state, iteration), or None when there is none."""
        for p in (self.path, self.prev):
            if not p.exists():
                continue
            try:
                tree, _ = read_h5_tree(p)
                return tree["state"], int(tree["iteration"])
            except Exception as exc:  # a damaged file: try the older one
                log.warning("%s: unreadable checkpoint (%s); trying an older one", p, exc)
        return None

    def step(self, iteration: int, state_fn) -> None:
        """Call once per iteration: saves when due or when a stop signal arrived.

        Args:
            iteration: the number of completed iterations.
            state_fn: zero-argument callable returning the state dict (only
                called when a save happens).
        Raises:
            Preempted: after saving, if SIGTERM/SIGUSR1 was received.
        """
        stop = StopFlag.agreed(self.comm)
        if stop or (self.every > 0 and iteration % self.every == 0):
            self.save(state_fn(), iteration)
        if stop:
            raise Preempted(f"stopped by a signal at iteration {iteration}; checkpoint in {self.path}")

    def remove(self) -> None:
        if self.writes:
            for p in (self.path, self.prev):
                if p.exists():
                    p.unlink()


# ----------------------------------------------------------------- run dirs
class RunDir:
    """One method's output directory for one subject (see module docstring).

    Args:
        out: directory path.
        comm: communicator (rank 0 creates and writes shared files).
        force: overwrite complete output.
        fresh: ignore (delete) an existing checkpoint instead of resuming.
    """

    SUBDIRS = ("maps", "figures", "vtk")

    def __init__(self, out, comm=None, force: bool = False, fresh: bool = False):
        self.root = Path(out)
        self.comm = comm
        self.rank = 0 if comm is None else comm.rank
        self.size = 1 if comm is None else comm.size
        self.force = force
        self.fresh = fresh
        self.t0 = time.time()

    summary = property(lambda self: self.root / "summary.json")
    results = property(lambda self: self.root / "results.h5")
    checkpoint = property(lambda self: self.root / "checkpoint.h5")
    maps = property(lambda self: self.root / "maps")
    figures = property(lambda self: self.root / "figures")
    vtk = property(lambda self: self.root / "vtk")
    log = property(lambda self: self.root / "log.txt")

    def status(self) -> dict | None:
        return read_summary(self.root)

    def is_complete(self) -> bool:
        s = self.status()
        return bool(s and s.get("status") == "complete")

    def prepare(self) -> RunDir:
        """Create the directory; refuse complete output without ``force``."""
        err = None
        if self.rank == 0:
            if self.root.exists() and not self.root.is_dir():
                err = f"{self.root}: exists and is not a directory"
            elif self.is_complete() and not self.force:
                err = f"{self.root}: complete output exists (summary.json); use --force to overwrite"
            else:
                if self.force and self.is_complete():
                    self.summary.unlink()
                    for name in ("results.h5",):
                        if (self.root / name).exists():
                            (self.root / name).unlink()
                    self.fresh = True
                if self.fresh:
                    for p in self.root.glob("checkpoint*.h5"):
                        p.unlink()
                for d in (self.root, *(self.root / s for s in self.SUBDIRS)):
                    d.mkdir(parents=True, exist_ok=True)
                if self.summary.exists():  # a failed/unfinished marker from before
                    self.summary.unlink()
        if self.comm is not None and self.size > 1:
            err = self.comm.bcast(err, root=0)
        if err:
            raise InputError(err)
        return self

    def checkpointer(self, every: int = 1, per_rank: bool = False) -> Checkpointer:
        return Checkpointer(self.checkpoint, every=every, comm=self.comm, per_rank=per_rank)

    def write_results(self, tree: dict, config=None, subject_id=None, extra_attrs=None) -> Path | None:
        if self.rank != 0:
            return None
        attrs = provenance(config, subject_id, self.size)
        attrs.update(extra_attrs or {})
        return write_h5_tree(self.results, tree, attrs)

    def write_map(self, name: str, data, affine) -> Path | None:
        if self.rank != 0:
            return None
        fname = name if name.endswith((".nii", ".nii.gz")) else name + ".nii.gz"
        return write_nifti(self.maps / fname, data, affine)

    def write_summary(self, method: str, subject_id: str, results: dict, status: str = "complete") -> dict:
        """Write summary.json last (atomically): marks the run complete."""
        summary = {
            "status": status,
            "method": method,
            "subject": subject_id,
            "runtime_s": round(time.time() - self.t0, 3),
            "mpi_ranks": self.size,
            "version": __version__,
            "git_sha": git_sha(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
        }
        summary.update(results)
        if self.rank == 0:
            atomic_write_json(self.summary, summary)
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()
        return summary

    def write_failure(self, method: str, subject_id: str, reason: str, exit_code: int) -> None:
        """Record a failed or preempted run (status is then not "complete")."""
        if self.rank != 0 or not self.root.is_dir():
            return
        status = "preempted" if exit_code == 75 else "failed"
        atomic_write_json(self.summary, {
            "status": status, "method": method, "subject": subject_id, "error": reason,
            "exit_code": exit_code, "resumable": self.checkpoint.exists(),
            "version": __version__, "hostname": socket.gethostname(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        })


def read_summary(out) -> dict | None:
    p = Path(out) / "summary.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def remove_tree(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read_results_attrs(path) -> dict[str, Any]:
    h5py = _h5()
    with h5py.File(path, "r") as fh:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
