"""Subject: scans + times + mask, loaded from a TOML file and validated.

A subject file (docs/architecture.md, "Data contracts")::

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
from typing import Annotated

import numpy as np

from glymphmpi.config import Pattern, SubjectConfig, build, load_toml
from glymphmpi.errors import InputError

log = logging.getLogger(__name__)

AFFINE_TOL_MM = 1e-4
ID_MAX = 64
#: a subject id, matched in full (``\\Z``: a trailing newline does not pass)
ID_RE = re.compile(rf"\A[A-Za-z0-9._-]{{1,{ID_MAX}}}\Z")
ID_WHAT = f"1-{ID_MAX} letters, digits, '.', '_' and '-'"
#: the values the solvers' arithmetic holds: squares and sums of squares of the scans stay finite
#: and nonzero in float64 (data outside is refused up front, never silently rescaled)
MAX_ABS_VALUE = 1e100
MIN_PEAK_VALUE = 1e-100
# `glymph subject check` warns when the mass inside the mask changes by more than this (percent of the
# earlier scan) between consecutive scans: the balanced rOMT model conserves mass.
MASS_CHANGE_LIMIT_PCT = 5.0


@dataclass(frozen=True)
class ScanEntry:
    """One ``[[scans]]`` table of a subject file.

    Attributes:
        time_h: hours after injection (finite; strictly increasing over the scans).
        path: the scan's 3D NIfTI, relative to the subject file.
    """

    time_h: float
    path: Annotated[str, Pattern(r"[^\x00-\x1f\x7f]+", "a file path without control characters")]


@dataclass(frozen=True)
class SubjectFile:
    """The keys of a subject file (validated by the same machinery as the settings).

    Attributes:
        id: the subject's identifier.
        mask: the domain's NIfTI (nonzero voxels are inside), relative to the subject file.
        scans: the scans, one table each.
        anatomy: optional display image.
        description: free text.
    """

    id: Annotated[str, Pattern(ID_RE.pattern.removeprefix("\\A").removesuffix("\\Z"), ID_WHAT)]
    mask: Annotated[str, Pattern(r"[^\x00-\x1f\x7f]+", "a file path without control characters")]
    scans: list
    anatomy: Annotated[str, Pattern(r"[^\x00-\x1f\x7f]+", "a file path without control characters")] | None = None
    description: str = ""


def valid_id(sid) -> bool:
    """A safe subject id (see :data:`ID_RE`)."""
    return isinstance(sid, str) and ID_RE.match(sid) is not None


@dataclass
class Subject:
    """A validated subject.

    Attributes:
        id: safe identifier (letters, digits, ``.``, ``_``, ``-``).
        path: the subject TOML file (None when built in memory).
        times_h: (p,) scan times in hours, strictly increasing.
        scans: (p, ni, nj, nk) float64 concentrations, negatives clipped to 0 unless the subject was
            loaded with ``keep_negative`` (the FEM's least-squares fit, whose noise model is zero-mean).
        mask: (ni, nj, nk) bool, the domain.
        affine: (4, 4) voxel index -> world mm.
        scan_paths: source file of each scan.
        anatomy: optional display image path.
        clipped_mass: per scan, the (voxel-volume weighted) negative mass clipped (zeros when kept).
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
        from nibabel.affines import apply_affine

        if ijk is None:
            ijk = np.argwhere(self.mask)
        return apply_affine(self.affine, ijk)

    def mass_change_pct(self) -> list[float | None]:
        """(p-1,) change of the mass inside the mask from each scan to the next, in percent of the
        earlier scan's mass (None where that mass is not positive)."""
        m = self.mass_per_scan()
        return [float(100.0 * (b - a) / a) if a > 0 else None for a, b in zip(m[:-1], m[1:])]

    def mass_balance_warning(self, limit_pct: float = MASS_CHANGE_LIMIT_PCT) -> str | None:
        """A plain-words warning when the mass changes by more than ``limit_pct`` between
        consecutive scans (the balanced rOMT model conserves it), else None."""
        bad = [(k, c) for k, c in enumerate(self.mass_change_pct()) if c is None or abs(c) > limit_pct]
        if not bad:
            return None
        t = self.times_h
        steps = ", ".join(f"t = {t[k]:g} -> {t[k + 1]:g} h: " + ("from 0" if c is None else f"{c:+.1f}%")
                          for k, c in bad)
        return (f"the mass inside the mask changes by more than {limit_pct:g}% between scans ({steps}); "
                f"the balanced model cannot explain this: tracer enters or leaves the mask: "
                f'use romt.model = "unbalanced"')

    def describe(self) -> dict:
        return {
            "id": self.id,
            "shape": list(self.shape),
            "voxel_size_mm": [round(float(v), 6) for v in self.voxel_size_mm],
            "times_h": [float(t) for t in self.times_h],
            "mask_voxels": int(self.mask.sum()),
            "mask_volume_ml": round(self.mask_volume_ml, 6),
            "mass_per_scan": [float(m) for m in self.mass_per_scan()],
            "mass_change_pct": self.mass_change_pct(),
            "mass_warning": self.mass_balance_warning(),
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
    _check_qform_sform(img, data.shape, path, what)
    return data, affine


def _check_qform_sform(img, shape, path, what: str) -> None:
    """Both orientations set and disagreeing: refuse beyond half a voxel, warn beyond AFFINE_TOL_MM.

    nibabel (and most tools) use the sform when its code is set; a qform that maps the grid more
    than half a voxel elsewhere means the file's orientation is ambiguous (e.g. a flip applied
    to one of them), which no tolerance should paper over.
    """
    from nibabel.affines import apply_affine

    header = getattr(img, "header", None)
    if header is None or not hasattr(header, "get_sform"):
        return
    try:
        sform, scode = header.get_sform(coded=True)
        qform, qcode = header.get_qform(coded=True)
    except Exception:  # noqa: BLE001 - a header that cannot say is not a disagreement
        return
    if sform is None or qform is None or not scode or not qcode:
        return
    n = np.asarray(shape[:3], dtype=float) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    diff = float(np.abs(apply_affine(sform, corners) - apply_affine(qform, corners)).max())
    if diff > 0.5 * float(voxel_sizes(sform).min()):
        raise InputError(f"{what}: qform and sform disagree by up to {diff:.3g} mm over the grid (more than "
                         "half a voxel): the orientation is ambiguous; fix the header", path)
    if diff > AFFINE_TOL_MM:
        log.warning("%s: qform and sform disagree by up to %.3g mm; using the sform", path, diff)


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


def load_subject(path, config: SubjectConfig | None = None, keep_negative: bool = False) -> Subject:
    """Load and validate a subject TOML file (see module docstring).

    ``keep_negative``: keep negative values (noise around zero concentration) instead of clipping
    them to 0, for a method whose fit assumes zero-mean noise (the FEM): clipped noise has mean
    +0.40 sigma and variance 0.34 sigma^2 where there is no tracer. The negative mass is checked
    against ``config.max_negative_mass_fraction`` either way.
    """
    config = config or SubjectConfig()
    path = Path(path)
    doc = load_toml(path)
    head = build(SubjectFile, doc, path)
    sid = head.id
    scans_doc = head.scans
    if len(scans_doc) < 2:
        raise InputError(f"needs at least 2 scans, found {len(scans_doc)}", path)
    entries = []
    for n, entry in enumerate(scans_doc):
        if not isinstance(entry, dict):
            raise InputError(f"scans[{n}] must be a table with time_h and path", path)
        entries.append(build(ScanEntry, entry, path, f"scans[{n}]"))
    times = [e.time_h for e in entries]
    seen: dict = {}
    for n, e in enumerate(entries):
        key = (path.parent / e.path).resolve()
        if key in seen:
            raise InputError(f"scans[{n}] and scans[{seen[key]}] name the same file {e.path!r}", path)
        seen[key] = n
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
    mask_path = base / head.mask
    mdata, maff = load_nifti(mask_path, "mask")
    mdata = _check_image(mdata, maff, mask_path, "mask")
    mask = mdata != 0
    if not mask.any():
        raise InputError("mask is empty (no nonzero voxel)", mask_path)

    scans = np.empty((len(times),) + mask.shape)
    scan_paths = []
    clipped = np.zeros(len(times))
    vol_mm3 = abs(np.linalg.det(maff[:3, :3]))
    negs, pos, peaks = [], [], []
    for n, entry in enumerate(entries):
        sp = base / entry.path
        data, aff = load_nifti(sp, "scan")
        data = _check_image(data, aff, sp, "scan", mask.shape, maff, mask_path)
        inside = data[mask]
        if not np.any(inside != 0) and n > 0:
            raise InputError("scan is all zero inside the mask", sp)
        top = float(np.abs(inside).max())
        if top > MAX_ABS_VALUE:
            raise InputError(f"values up to {top:.3g} inside the mask: beyond what the solvers' float64 arithmetic "
                             f"holds (|value| <= {MAX_ABS_VALUE:g}); rescale the images (results do not depend "
                             "on their units)", sp)
        peaks.append(top)
        negs.append(-inside[inside < 0].sum())
        pos.append(inside[inside > 0].sum())
        scans[n] = data if keep_negative else np.maximum(data, 0.0)
        scan_paths.append(sp)
    ref = max(pos)
    if ref <= 0:
        raise InputError("every scan is zero or negative inside the mask", path)
    if max(peaks) < MIN_PEAK_VALUE:
        raise InputError(f"the largest value inside the mask is {max(peaks):.3g}: below what the solvers' float64 "
                         f"arithmetic resolves (>= {MIN_PEAK_VALUE:g}); rescale the images", path)
    for n, neg in enumerate(negs):
        share = neg / ref
        if share > config.max_negative_mass_fraction:
            raise InputError(
                f"negative values hold {100 * share:.2f}% of the largest scan's mass inside the mask "
                f"(limit {100 * config.max_negative_mass_fraction:.2f}%, subject.max_negative_mass_fraction)",
                scan_paths[n],
            )
        clipped[n] = 0.0 if keep_negative else neg * vol_mm3
    n_negative = sum(v > 0 for v in negs)
    if keep_negative and n_negative:
        log.info("%s: negative values kept in %d scan(s) (the fit's noise model is zero-mean)", path, n_negative)
    if clipped.any():
        log.warning(
            "%s: clipped negative values to 0 in %d scan(s); clipped mass %s (conc x mm^3), %.3g%% of the total",
            path, int((clipped > 0).sum()), np.array2string(clipped, precision=4),
            100 * clipped.sum() / max(np.abs(scans[:, mask]).sum() * vol_mm3, 1e-300),
        )
    anatomy = base / head.anatomy if head.anatomy is not None else None
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
    if not valid_id(sid):
        raise InputError(f"id {sid[:40]!r}: must be {ID_WHAT}")
    write_nifti(out / "mask.nii.gz", np.asarray(mask).astype(np.uint8), affine)
    entries = []
    for i, (t, img) in enumerate(zip(times_h, scans)):
        name = scan_name.format(i=i, t=t)
        write_nifti(out / name, np.asarray(img, dtype=dtype), affine, keep_dtype=True)
        entries.append({"time_h": float(t), "path": name})
    import tomli_w

    doc: dict = {"id": sid, "mask": "mask.nii.gz"}
    if description:
        doc["description"] = description
    if anatomy is not None:
        write_nifti(out / "anatomy.nii.gz", np.asarray(anatomy, dtype=np.float32), affine)
        doc["anatomy"] = "anatomy.nii.gz"
    # the scans as [[scans]] tables (tomli_w would inline them), every value escaped by tomli_w
    text = tomli_w.dumps(doc) + "".join(f"\n[[scans]]\n{tomli_w.dumps(e)}" for e in entries)
    toml_path = out / "subject.toml"
    atomic_write_bytes(toml_path, text.encode())
    return toml_path


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
