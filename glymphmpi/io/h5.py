"""HDF5 trees: nested dicts of arrays, scalars, strings and JSON, written atomically; never pickle.

Also the collective (``mpio``) row-block writer of one dataset.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from glymphmpi.errors import InputError
from glymphmpi.io.atomic import atomic_path, fsync_dir, json_default, tmp_name

log = logging.getLogger(__name__)


def _h5():
    import h5py

    return h5py


# The layout: every dataset carries attrs["kind"], one of KINDS; groups are dicts (keys are strings).
# Nothing else is ever read: a dataset of any other kind (e.g. the "pickle" datasets of old versions)
# or of a non-numeric dtype is refused with an UnsafeFileError naming the file.
KINDS = {
    "array": "numeric or bool ndarray (gzip when large)",
    "str": "UTF-8 string",
    "bool": "Python bool",
    "scalar": "int (64-bit) or float",
    "int": "integer beyond 64 bits (e.g. an RNG state), stored as its decimal string",
    "list": "non-empty list/tuple of numbers, stored as a 1D array (read back as a list)",
    "json": "other lists/tuples (nested lists, dicts, strings, None), stored as a JSON string",
}
_NUMERIC = "biuf"  # bool, int, unsigned, float dtype kinds


class UnsafeFileError(InputError):
    """A file holds a dataset outside the typed layout (e.g. a pickle): it is refused, never executed."""


def _json_plain(value, where: str) -> str:
    def default(o):
        if isinstance(o, np.ndarray) and o.dtype.kind in _NUMERIC:
            return o.tolist()
        if isinstance(o, (np.generic, Path)):
            return json_default(o)
        raise TypeError(f"cannot store {type(o).__name__} inside {where!r}: only numbers, strings, bools, "
                        "None, lists and dicts with string keys (JSON), or numeric arrays")
    return json.dumps(value, default=default, allow_nan=True)


def write_node(grp, key: str, value, where: str = "", compress: bool = True) -> None:
    """Write ``value`` under ``grp[key]`` in the typed layout (dicts become groups; None is skipped).

    ``compress``: gzip (level 1, shuffled) arrays of more than 4096 elements; off for files that are
    written often and read back only by glymphmpi (checkpoints, per-loop stores), where it cost most
    of the write time (0.5 s per rOMT checkpoint at 50^3, against about 0.05 s without).

    Raises:
        TypeError: a value outside the layout (an arbitrary object), naming its key.
    """
    h5py = _h5()
    where = f"{where}/{key}" if where else key
    if value is None:
        return
    if isinstance(value, dict):
        sub = grp.create_group(key)
        for k, v in value.items():
            write_node(sub, str(k), v, where, compress)
        return
    if isinstance(value, str):
        ds = grp.create_dataset(key, data=value, dtype=h5py.string_dtype())
        kind = "str"
    elif isinstance(value, (bool, np.bool_)):
        ds = grp.create_dataset(key, data=np.bool_(value))
        kind = "bool"
    elif isinstance(value, (int, np.integer)) and not -(2**63) <= int(value) < 2**63:
        ds = grp.create_dataset(key, data=str(int(value)), dtype=h5py.string_dtype())
        kind = "int"
    elif isinstance(value, (int, float, np.integer, np.floating)):
        ds = grp.create_dataset(key, data=value)
        kind = "scalar"
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC:
            raise TypeError(f"cannot store an array of dtype {value.dtype} at {where!r}: numeric or bool arrays only")
        opts = ({"compression": "gzip", "compression_opts": 1, "shuffle": True}
                if compress and value.size > 4096 else {})
        ds = grp.create_dataset(key, data=value, **opts)
        kind = "array"
    elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            and not (isinstance(v, (int, np.integer)) and not -(2**63) <= int(v) < 2**63) for v in value):
        ds = grp.create_dataset(key, data=np.asarray(value))
        kind = "list"
    elif isinstance(value, (list, tuple)):
        ds = grp.create_dataset(key, data=_json_plain(value, where), dtype=h5py.string_dtype())
        kind = "json"
    else:
        raise TypeError(f"cannot store {type(value).__name__} at {where!r}: arrays, numbers, strings, bools, "
                        "dicts and JSON-able lists only (never pickle)")
    ds.attrs["kind"] = kind


def _refuse(node, why: str):
    raise UnsafeFileError(f"dataset {node.name!r} {why}; refused (glymphmpi stores typed arrays, numbers, "
                          "strings and JSON only, never code): delete the file or use --fresh", node.file.filename)


def read_node(node):
    """Read a group (dict) or dataset written by :func:`write_node`.

    Raises:
        UnsafeFileError: a dataset of another kind (e.g. pickle) or dtype (opaque, object).
    """
    h5py = _h5()
    if isinstance(node, h5py.Group):
        return {k: read_node(node[k]) for k in node.keys()}
    if not isinstance(node, h5py.Dataset):
        _refuse(node, f"is a {type(node).__name__}")
    kind = node.attrs.get("kind", "")
    if isinstance(kind, bytes):
        kind = kind.decode(errors="replace")
    kind = str(kind)
    is_text = h5py.check_string_dtype(node.dtype) is not None
    if kind in ("str", "int", "json"):
        if not is_text or node.shape != ():
            _refuse(node, f"of kind {kind!r} is not a string")
        text = node.asstr()[()]
        if kind == "str":
            return text
        try:
            return int(text) if kind == "int" else json.loads(text)
        except ValueError:
            _refuse(node, f"of kind {kind!r} does not parse")
    if kind not in ("", "array", "bool", "scalar", "list"):
        _refuse(node, f"has kind {kind[:40]!r}")
    if node.dtype.kind not in _NUMERIC:  # opaque, compound, object, vlen or string data
        _refuse(node, f"has non-numeric dtype {node.dtype}")
    if kind == "bool":
        return bool(node[()])
    if kind == "scalar":
        return node[()].item()
    if kind == "list":
        return node[()].tolist()
    return node[()]


# Files up to this size (uncompressed arrays) are built in memory and written with one plain write:
# a full disk is then an ordinary OSError. HDF5 failing to write or close a file on disk
# (ENOSPC) leaves library objects behind that crash the process later (exit 139).
IN_MEMORY_LIMIT = 1 << 30


def tree_nbytes(tree) -> int:
    """Upper bound of the bytes a tree's values take uncompressed."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values()) + 64 * len(tree)
    if isinstance(tree, np.ndarray):
        return int(tree.nbytes)
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(v) for v in tree) + 8
    return len(tree) if isinstance(tree, (str, bytes)) else 8


def create_h5(tmp, fill, nbytes: int) -> None:
    """Create the HDF5 file ``tmp`` with ``fill(h5py.File)``, safely on a full disk.

    Up to :data:`IN_MEMORY_LIMIT` bytes the file is built in memory (HDF5 core driver)
    and written with a plain write; larger files are written directly after checking
    that the file system has ``nbytes`` free.

    Raises:
        OSError: (ENOSPC) the disk is full or would be.
    """
    h5py = _h5()
    tmp = Path(tmp)
    if nbytes <= IN_MEMORY_LIMIT:
        with h5py.File(tmp, "w", driver="core", backing_store=False) as fh:
            fill(fh)
            fh.flush()
            image = fh.id.get_file_image()
        with open(tmp, "wb") as out:
            out.write(image)
        return
    free = shutil.disk_usage(tmp.parent).free
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: needs up to {nbytes / 2**20:.0f} MiB, "
                                    f"{free / 2**20:.0f} MiB free")
    with h5py.File(tmp, "w") as fh:
        fill(fh)


def write_h5_tree(path, tree: dict, attrs: dict | None = None, node_attrs: dict | None = None,
                  compress: bool = True) -> Path:
    """Write a nested dict to HDF5 atomically in the typed layout (:data:`KINDS`).

    Dicts become groups, arrays datasets (gzip when large, unless ``compress`` is false), lists JSON. ``attrs``
    go on the root (dicts and lists as JSON strings). ``node_attrs`` maps a node's
    path in the tree (``"loops/000/velocity"``) to attributes of that node (strings
    and numbers, e.g. ``{"units": "mm/h"}``), written in the same atomic write.

    Raises:
        TypeError: a value outside the layout (nothing is written then).
        OSError: the file cannot be written (e.g. a full disk; the old file, if any, stays).
    """
    path = Path(path)

    def fill(fh):
        for k, v in (attrs or {}).items():
            fh.attrs[k] = v if not isinstance(v, (dict, list)) else json.dumps(v, default=json_default)
        for k, v in tree.items():
            write_node(fh, str(k), v, compress=compress)
        for where, extra in (node_attrs or {}).items():
            if where not in fh:
                raise ValueError(f"node_attrs: no node {where!r} in the tree")
            for k, v in extra.items():
                if not isinstance(v, (str, int, float, np.integer, np.floating)) or isinstance(v, bool):
                    raise TypeError(f"node_attrs[{where!r}][{k!r}]: a string or a number, got {type(v).__name__}")
                fh[where].attrs[k] = v
        fh.attrs["complete"] = True

    with atomic_path(path) as tmp:
        create_h5(tmp, fill, tree_nbytes(tree))
    return path


def read_h5_tree(path) -> tuple[dict, dict]:
    """Read a file written by :func:`write_h5_tree`: (tree, root attrs).

    Raises:
        UnsafeFileError: a dataset outside the typed layout (one line naming the file).
        OSError: an unreadable or incomplete file.
    """
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
