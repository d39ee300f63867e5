"""Subject: scans + times + mask, loaded from a TOML file and validated.

A subject file (DESIGN.md section 2)::

    id = "sub-01"
    mask = "mask.nii.gz"
    [[scans]]
    time_h = 0.0
    path = "conc_00h.nii.gz"

Paths are relative to the TOML file. Everything is checked before any work
starts; each failure is an :class:`~glymphmpi.errors.InputError` whose one
line names the file and the problem.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glymphmpi.config import SubjectConfig, load_toml
from glymphmpi.errors import InputError

log = logging.getLogger(__name__)

AFFINE_TOL_MM = 1e-4
ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
TOP_KEYS = {"id": str, "mask": str, "scans": list, "anatomy": str, "description": str}
REQUIRED = ("id", "mask", "scans")
SCAN_KEYS = {"time_h", "path"}


@dataclass
class Subject:
    """A validated subject.

    Attributes:
        id: safe identifier (letters, digits, ``.``, ``_``, ``-``).
        path: the subject TOML file (None when built in memory).
        times_h: (p,) scan times in hours, strictly increasing.
        scans: (p, ni, nj, nk) float64 concentrations, negatives clipped.
        mask: (ni, nj, nk) bool, the domain.
        affine: (4, 4) voxel index -> world mm.
        scan_paths: source file of each scan.
        anatomy: optional display image path.
        clipped_mass: per scan, the (voxel-volume weighted) negative mass clipped.
    """

    id: str
    times_h: np.ndarray
    scans: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    scan_paths: list = field(default_factory=list)
    mask_path: Path | None = None
    anatomy: Path | None = None
    clipped_mass: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)

    @property
    def n_scans(self) -> int:
        return len(self.times_h)

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """(3,) voxel sizes in mm: lengths of the affine's columns."""
        return voxel_sizes(self.affine)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def mask_volume_ml(self) -> float:
        return float(self.mask.sum()) * self.voxel_volume_ml

    def mass_per_scan(self, inside_mask: bool = True) -> np.ndarray:
        """(p,) total tracer amount per scan: sum of concentration x voxel volume (mm^3)."""
        vol_mm3 = self.voxel_volume_ml * 1000.0
        data = self.scans * self.mask if inside_mask else self.scans
        return data.reshape(self.n_scans, -1).sum(axis=1) * vol_mm3

    def world_coords(self, ijk: np.ndarray | None = None) -> np.ndarray:
        """World mm coordinates of voxel centres.

        Args:
            ijk: (n, 3) voxel indices; default: every voxel inside the mask.
        Returns:
            (n, 3) coordinates in mm.
        """
        if ijk is None:
            ijk = np.argwhere(self.mask)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def describe(self) -> dict:
        return {
            "id": self.id,
            "shape": list(self.shape),
            "voxel_size_mm": [round(float(v), 6) for v in self.voxel_size_mm],
            "times_h": [float(t) for t in self.times_h],
            "mask_voxels": int(self.mask.sum()),
            "mask_volume_ml": round(self.mask_volume_ml, 6),
            "mass_per_scan": [float(m) for m in self.mass_per_scan()],
        }


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def load_nifti(path, what: str = "image"):
    """Load a NIfTI file as (data float64, affine), naming the file on failure."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found", path)
    if path.is_dir():
        raise InputError(f"{what} is a directory, expected a NIfTI file", path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable NIfTI {what} ({msg})", path) from None
    return data, affine


def _check_image(data, affine, path, what, ref_shape=None, ref_affine=None, ref_path=None):
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what} must be 3D, got shape {data.shape}", path)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{what} affine has non-finite entries", path)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{what} affine is singular", path)
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{what} has {n} non-finite values (NaN/Inf)", path)
    if ref_shape is not None and tuple(data.shape) != tuple(ref_shape):
        raise InputError(f"{what} shape {data.shape} differs from {ref_shape} of {ref_path}", path)
    if ref_affine is not None:
        diff = float(np.abs(affine - ref_affine).max())
        if diff > AFFINE_TOL_MM:
            raise InputError(
                f"{what} affine differs from that of {ref_path} by {diff:.3g} mm (tolerance {AFFINE_TOL_MM})",
                path,
            )
    return data


def load_subject(path, config: SubjectConfig | None = None) -> Subject:
    """Load and validate a subject TOML file (see module docstring)."""
    config = config or SubjectConfig()
    path = Path(path)
    doc = load_toml(path)
    for key in doc:
        if key not in TOP_KEYS:
            raise InputError(f"unknown key {key!r} (valid: {', '.join(TOP_KEYS)})", path)
    for key in REQUIRED:
        if key not in doc:
            raise InputError(f"missing required key {key!r}", path)
    for key, tp in TOP_KEYS.items():
        if key in doc and not isinstance(doc[key], tp):
            raise InputError(f"key {key!r} must be a {tp.__name__}", path)
    sid = doc["id"]
    if not ID_RE.match(sid):
        raise InputError(f"id {sid!r} may contain only letters, digits, '.', '_' and '-'", path)
    scans_doc = doc["scans"]
    if len(scans_doc) < 2:
        raise InputError(f"needs at least 2 scans, found {len(scans_doc)}", path)
    times = []
    for n, entry in enumerate(scans_doc):
        if not isinstance(entry, dict):
            raise InputError(f"scans[{n}] must be a table with time_h and path", path)
        unknown = set(entry) - SCAN_KEYS
        if unknown:
            raise InputError(f"scans[{n}]: unknown key {sorted(unknown)[0]!r} (valid: time_h, path)", path)
        for k in SCAN_KEYS:
            if k not in entry:
                raise InputError(f"scans[{n}]: missing key {k!r}", path)
        t = entry["time_h"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t):
            raise InputError(f"scans[{n}]: time_h must be a finite number, got {t!r}", path)
        if not isinstance(entry["path"], str):
            raise InputError(f"scans[{n}]: path must be a string", path)
        times.append(float(t))
    times_arr = np.asarray(times)
    bad = np.nonzero(np.diff(times_arr) <= 0)[0]
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"scan times must be strictly increasing: scans[{i + 1}].time_h = {times[i + 1]} "
            f"follows {times[i]}",
            path,
        )

    base = path.parent
    mask_path = base / doc["mask"]
    mdata, maff = load_nifti(mask_path, "mask")
    mdata = _check_image(mdata, maff, mask_path, "mask")
    mask = mdata != 0
    if not mask.any():
        raise InputError("mask is empty (no nonzero voxel)", mask_path)

    scans = np.empty((len(times),) + mask.shape)
    scan_paths = []
    clipped = np.zeros(len(times))
    vol_mm3 = abs(np.linalg.det(maff[:3, :3]))
    negs, pos = [], []
    for n, entry in enumerate(scans_doc):
        sp = base / entry["path"]
        data, aff = load_nifti(sp, "scan")
        data = _check_image(data, aff, sp, "scan", mask.shape, maff, mask_path)
        inside = data[mask]
        if not np.any(inside != 0) and n > 0:
            raise InputError("scan is all zero inside the mask", sp)
        negs.append(-inside[inside < 0].sum())
        pos.append(inside[inside > 0].sum())
        scans[n] = np.maximum(data, 0.0)
        scan_paths.append(sp)
    ref = max(pos)
    if ref <= 0:
        raise InputError("every scan is zero or negative inside the mask", path)
    for n, neg in enumerate(negs):
        share = neg / ref
        if share > config.max_negative_mass_fraction:
            raise InputError(
                f"negative values hold {100 * share:.2f}% of the largest scan's mass inside the mask "
                f"(limit {100 * config.max_negative_mass_fraction:.2f}%, subject.max_negative_mass_fraction)",
                scan_paths[n],
            )
        clipped[n] = neg * vol_mm3
    if clipped.any():
        log.warning(
            "%s: clipped negative values to 0 in %d scan(s); clipped mass %s (conc x mm^3), %.3g%% of the total",
            path, int((clipped > 0).sum()), np.array2string(clipped, precision=4),
            100 * clipped.sum() / max(np.abs(scans[:, mask]).sum() * vol_mm3, 1e-300),
        )
    anatomy = base / doc["anatomy"] if "anatomy" in doc else None
    if anatomy is not None and not anatomy.exists():
        raise InputError("anatomy file not found", anatomy)
    return Subject(
        id=sid, times_h=times_arr, scans=scans, mask=mask, affine=maff, path=path.resolve(),
        scan_paths=scan_paths, mask_path=mask_path, anatomy=anatomy, clipped_mass=clipped,
    )


def write_subject(out_dir, sid: str, times_h, scans, mask, affine, anatomy=None,
                  scan_name="conc_{i:02d}.nii.gz", description: str | None = None,
                  dtype=np.float32) -> Path:
    """Write NIfTI scans, mask and subject.toml into ``out_dir`` (atomic writes)."""
    from glymphmpi.io import atomic_write_bytes, write_nifti

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ID_RE.match(sid):
        raise InputError(f"id {sid!r} may contain only letters, digits, '.', '_' and '-'")
    write_nifti(out / "mask.nii.gz", np.asarray(mask).astype(np.uint8), affine)
    entries = []
    for i, (t, img) in enumerate(zip(times_h, scans)):
        name = scan_name.format(i=i, t=t)
        write_nifti(out / name, np.asarray(img, dtype=dtype), affine, keep_dtype=True)
        entries.append({"time_h": float(t), "path": name})
    lines = [f"id = {_toml_str(sid)}", 'mask = "mask.nii.gz"']
    if description:
        lines.append(f"description = {_toml_str(description)}")
    if anatomy is not None:
        write_nifti(out / "anatomy.nii.gz", np.asarray(anatomy, dtype=np.float32), affine)
        lines.append('anatomy = "anatomy.nii.gz"')
    for e in entries:
        lines += ["", "[[scans]]", f"time_h = {e['time_h']!r}", f"path = {_toml_str(e['path'])}"]
    text = "\n".join(lines) + "\n"
    toml_path = out / "subject.toml"
    atomic_write_bytes(toml_path, text.encode())
    return toml_path


def _toml_str(text: str) -> str:
    """A TOML basic string (tomli_w escapes it correctly)."""
    import tomli_w

    return tomli_w.dumps({"v": text}).split("=", 1)[1].strip()


def init_from_4d(series_path, times_h, out_dir, sid: str, mask_path=None,
                 auto_mask_fraction: float | None = None) -> Path:
    """Split a 4D NIfTI into 3D scans and write a subject.toml (``glymph subject init``)."""
    data, affine = load_nifti(series_path, "4D series")
    if data.ndim != 4:
        raise InputError(f"expected a 4D NIfTI (x, y, z, time), got shape {data.shape}", series_path)
    times = [float(t) for t in times_h]
    if len(times) != data.shape[3]:
        raise InputError(f"{len(times)} times given for {data.shape[3]} volumes", series_path)
    if np.any(np.diff(times) <= 0):
        raise InputError(f"times must be strictly increasing, got {times}")
    if not np.all(np.isfinite(data)):
        raise InputError("4D series has non-finite values (NaN/Inf)", series_path)
    if mask_path is not None:
        m, maff = load_nifti(mask_path, "mask")
        m = _check_image(m, maff, mask_path, "mask", data.shape[:3], affine, series_path)
        mask = m != 0
    elif auto_mask_fraction is not None:
        peak = data.max(axis=3)
        mask = peak > auto_mask_fraction * peak.max()
    else:
        raise InputError("give --mask FILE or --auto-mask FRACTION")
    if not mask.any():
        raise InputError("mask is empty", mask_path or series_path)
    scans = np.moveaxis(data, 3, 0)
    return write_subject(out_dir, sid, times, scans, mask, affine)
