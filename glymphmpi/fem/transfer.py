"""Voxel <-> mesh transfer on the voxel-centre mesh (exact nodal sampling).

Mesh nodes are voxel centres (see :mod:`glymphmpi.fem.mesh`), so scans are
sampled at the dofs without interpolation, and dof values map back to the
same voxels; mask voxels without a node take the nearest node's value.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def sample(images: np.ndarray, dof_voxel: np.ndarray) -> np.ndarray:
    """Values of images at the dofs.

    Args:
        images: (p, ni, nj, nk) or (ni, nj, nk) voxel arrays.
        dof_voxel: (n,) flat voxel index of each dof.
    Returns:
        (p, n) or (n,) values.
    """
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        return arr.ravel()[dof_voxel]
    return arr.reshape(arr.shape[0], -1)[:, dof_voxel]


def nearest_node_index(nodes: np.ndarray) -> np.ndarray:
    """(ni*nj*nk,) flat index of the nearest node voxel for every voxel."""
    idx = ndimage.distance_transform_edt(~nodes, return_distances=False, return_indices=True)
    return np.ravel_multi_index(tuple(idx), nodes.shape).ravel()


def to_voxels(values: np.ndarray, owned_voxel: np.ndarray, mask: np.ndarray, nodes: np.ndarray,
              comm) -> np.ndarray | None:
    """Gather owned dof values into voxel images on rank 0.

    Args:
        values: (p, n_owned) or (n_owned,) owned dof values.
        owned_voxel: (n_owned,) flat voxel index of each owned dof.
        mask: (ni, nj, nk) bool domain; voxels outside are 0.
        nodes: (ni, nj, nk) bool meshed voxels; other mask voxels take the
            value of the nearest meshed voxel.
        comm: communicator.
    Returns:
        (p, ni, nj, nk) or (ni, nj, nk) on rank 0, None elsewhere.
    """
    vals = np.atleast_2d(np.asarray(values))
    parts = comm.gather((owned_voxel, vals), root=0)
    if comm.rank != 0:
        return None
    flat = np.zeros((vals.shape[0], mask.size))
    for vox, v in parts:
        flat[:, vox] = v
    missing = np.flatnonzero(mask.ravel() & ~nodes.ravel())
    if missing.size:
        flat[:, missing] = flat[:, nearest_node_index(nodes)[missing]]
    flat[:, ~mask.ravel()] = 0.0
    out = flat.reshape((vals.shape[0],) + mask.shape)
    return out if np.ndim(values) > 1 else out[0]
