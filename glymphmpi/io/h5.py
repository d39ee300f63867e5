"""HDF5 trees: nested dicts of arrays, scalars and strings, written atomically.

Also the collective (``mpio``) row-block writer of one dataset.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from glymphmpi.io.atomic import atomic_path, fsync_dir, json_default, tmp_name

log = logging.getLogger(__name__)


def _h5():
    import h5py

    return h5py


def write_node(grp, key: str, value) -> None:
    """Write ``value`` under ``grp[key]`` (dicts become groups)."""
    h5py = _h5()
    if value is None:
        return
    if isinstance(value, dict):
        sub = grp.create_group(key)
        for k, v in value.items():
            write_node(sub, str(k), v)
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


def read_node(node):
    h5py = _h5()
    if isinstance(node, h5py.Group):
        return {k: read_node(node[k]) for k in node.keys()}
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

    Dicts become groups, arrays datasets (gzip when large). ``attrs`` go on
    the root (dicts and lists as JSON strings).
    """
    h5py = _h5()
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            for k, v in (attrs or {}).items():
                fh.attrs[k] = v if not isinstance(v, (dict, list)) else json.dumps(v, default=json_default)
            for k, v in tree.items():
                write_node(fh, str(k), v)
            fh.attrs["complete"] = True
    return path


def read_h5_tree(path) -> tuple[dict, dict]:
    """Read a file written by :func:`write_h5_tree`: (tree, root attrs)."""
    h5py = _h5()
    with h5py.File(path, "r") as fh:
        if not fh.attrs.get("complete", False):
            raise OSError(f"{path}: incomplete HDF5 file")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}
        return {k: read_node(fh[k]) for k in fh.keys()}, attrs


def read_h5_attrs(path) -> dict[str, Any]:
    """The root attributes of an HDF5 file (bytes decoded)."""
    h5py = _h5()
    with h5py.File(path, "r") as fh:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}


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
    tmp = Path(comm.bcast(str(tmp_name(path)) if comm.rank == 0 else None, root=0))
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
        fsync_dir(path.parent)
    comm.Barrier()
    return path
