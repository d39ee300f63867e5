"""Bring rOMT/urOMT users' data: a series of MATLAB ``.mat`` volumes -> a glymph subject.

The authors' code (rOMT, urOMT) reads one ``.mat`` file per frame holding a 3D array
(variable ``rho_n`` in their rat data), a mask ``.mat`` and optionally an anatomy
``.mat``; voxel size and frame interval are not stored in the files, so they are given.
The arrays are written as NIfTI with the affine ``diag(voxel_size_mm, 1)`` (index
order kept: MATLAB's (x, y, z) become (i, j, k)) and a subject.toml. Values are kept as
they are (the subject loader clips negatives and says how much mass that removed).
``.mat`` files are read as data (scipy.io.loadmat for v5, h5py for v7.3); nothing in
them is executed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glymphmpi.errors import InputError


def read_mat_array(path, variable: str | None = None) -> np.ndarray:
    """The 3D numeric array ``variable`` of a .mat file (the only array when None)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        import scipy.io

        d = {k: v for k, v in scipy.io.loadmat(str(path)).items() if not k.startswith("__")}
    except NotImplementedError:  # v7.3: HDF5; MATLAB stores arrays transposed
        import h5py

        with h5py.File(path, "r") as fh:
            d = {k: np.asarray(fh[k][()]).T for k in fh.keys() if isinstance(fh[k], h5py.Dataset)}
    except (ValueError, OSError) as exc:
        raise InputError(f"not a readable MATLAB file ({exc})", path) from None
    arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and v.ndim == 3}
    if variable is None:
        if len(arrays) != 1:
            raise InputError(f"holds {len(arrays)} 3D arrays ({', '.join(sorted(arrays)) or 'none'}): name one",
                             path)
        return np.asarray(next(iter(arrays.values())), dtype=np.float64)
    if variable not in arrays:
        raise InputError(f"no 3D numeric variable {variable!r} (3D arrays: {', '.join(sorted(arrays)) or 'none'})",
                         path)
    return np.asarray(arrays[variable], dtype=np.float64)


def init_from_mat(mat_paths, out_dir, sid: str, voxel_size_mm, frame_interval_h: float, mask_path,
                  variable: str | None = "rho_n", anatomy_path=None, t0_h: float = 0.0,
                  times_h=None) -> Path:
    """Write a subject from a series of .mat volumes (``glymph subject init`` for rOMT/urOMT data).

    Args:
        mat_paths: the frames in time order.
        out_dir: the subject folder to write (NIfTI scans, mask, subject.toml).
        voxel_size_mm: (3,) or a number; frame_interval_h: hours between frames; t0_h: first time.
        mask_path: a .mat (its only 3D array, nonzero = inside) or a NIfTI.
        variable: the frames' variable name (None: the only 3D array of each file).
        anatomy_path: optional .mat display image.
        times_h: the frames' times in hours (overrides frame_interval_h and t0_h).
    Returns:
        the subject.toml path.
    """
    from glymphmpi.subject import load_nifti, write_subject

    paths = [Path(p) for p in mat_paths]
    if len(paths) < 2:
        raise InputError(f"need at least 2 frames, got {len(paths)}")
    if not (np.isfinite(frame_interval_h) and frame_interval_h > 0):
        raise InputError(f"frame interval must be a positive number of hours, got {frame_interval_h}")
    vox = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    if not np.all(np.isfinite(vox) & (vox > 0)):
        raise InputError(f"voxel size must be positive mm, got {vox.tolist()}")
    scans = [read_mat_array(p, variable) for p in paths]
    shape = scans[0].shape
    for p, s in zip(paths, scans):
        if s.shape != shape:
            raise InputError(f"frame shape {s.shape} differs from the first frame's {shape}", p)
        if not np.all(np.isfinite(s)):
            raise InputError("non-finite values", p)
    mp = Path(mask_path)
    mask = (load_nifti(mp, "mask")[0] if mp.name.endswith((".nii", ".nii.gz")) else read_mat_array(mp)) != 0
    if mask.shape != shape:
        raise InputError(f"mask shape {mask.shape} differs from the frames' {shape}", mp)
    anatomy = read_mat_array(anatomy_path) if anatomy_path is not None else None
    affine = np.diag([*vox, 1.0])
    if times_h is not None:
        times = [float(t) for t in times_h]
        if len(times) != len(paths) or not all(np.isfinite(times)):
            raise InputError(f"{len(times)} times for {len(paths)} frames (or a non-finite time)")
    else:
        times = [t0_h + i * frame_interval_h for i in range(len(paths))]
    return write_subject(out_dir, sid, times, scans, mask, affine, anatomy=anatomy,
                         description=f"converted from {len(paths)} MATLAB frames ({paths[0].name} ...)")
