"""NIfTI writer (atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glymphmpi.io.atomic import atomic_path


def write_nifti(path, data, affine, header_extra: dict | None = None, keep_dtype: bool = False) -> Path:
    """Write a NIfTI image atomically (``.nii`` or ``.nii.gz``) with the given affine.

    float64 data is stored as float32 unless ``keep_dtype``; bool as uint8.
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
