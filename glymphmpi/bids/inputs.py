"""One participant from raw BIDS to a concentration series: route, grid check, mask, r1, conversion.

Every problem is an :class:`~glymphmpi.errors.InputError` whose one line names the file, the
session or the setting, raised before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glymphmpi.concentration import routes as R
from glymphmpi.concentration.relaxivity import lookup_r1, normalise_agent
from glymphmpi.errors import InputError
from glymphmpi.subject import AFFINE_TOL_MM, load_nifti

from .layout import Participant, discover

log = logging.getLogger(__name__)

REGISTRATION_HINT = ("register every session to one grid first (out of scope here: e.g. ANTs antsRegistration, "
                     "FSL FLIRT, FreeSurfer mri_robust_register, then resample)")


@dataclass(frozen=True)
class Options:
    """Choices of the concentration stage (``glymph concentration`` / ``glymph bids``).

    Attributes:
        route: ``auto`` (t1map if every session has a T1 map, else t1w), ``t1map``, ``t1w``, ``enhancement``.
        r1: relaxivity in L/(mmol s) (overrides the table).
        agent: contrast agent (overrides ``ce-``/sidecar).
        field_T: field strength in T (overrides MagneticFieldStrength).
        t1_0: assumed baseline T1 in s (t1w route without a baseline T1 map).
        tissue: tissue whose tabulated T1_0 is assumed when ``t1_0`` is not given (wm, gm, csf).
        mask_dir, mask_desc: the mask derivative ``DIR/sub-<l>/anat/sub-<l>_desc-<desc>_mask.nii.gz``.
        injection_time: ISO date-time; with ``acq_time`` in sessions.tsv.
        baseline: the baseline session's label (default: the earliest session).
    """

    route: str = "auto"
    r1: float | None = None
    agent: str | None = None
    field_T: float | None = None
    t1_0: float | None = None
    tissue: str = "wm"
    mask_dir: str | None = None
    mask_desc: str = "brain"
    injection_time: str | None = None
    baseline: str | None = None

    def validate(self) -> None:
        if self.route not in ("auto",) + R.ROUTES:
            raise InputError(f"--route {self.route!r}: choose auto, {', '.join(R.ROUTES)}")
        if self.r1 is not None and not (self.r1 > 0 and np.isfinite(self.r1)):
            raise InputError(f"--r1 must be a positive number (L/(mmol s)), got {self.r1}")
        if self.t1_0 is not None and not (R.T1_MIN_S <= self.t1_0 <= R.T1_MAX_S):
            raise InputError(f"--t1-0 must be a T1 in seconds between {R.T1_MIN_S} and {R.T1_MAX_S}, got {self.t1_0}")
        if self.field_T is not None and not (0 < self.field_T < 30):
            raise InputError(f"--field-strength must be in tesla (0 to 30), got {self.field_T}")
        if self.tissue not in R.T1_0_DEFAULTS_S[3.0]:
            raise InputError(f"--tissue {self.tissue!r}: choose {', '.join(R.T1_0_DEFAULTS_S[3.0])}")
        if not self.mask_desc.isalnum():
            raise InputError(f"--mask-desc {self.mask_desc!r}: letters and digits only")


@dataclass
class Prepared:
    """A participant ready for the derivative writer."""

    participant: Participant
    conversion: R.Conversion
    mask: np.ndarray
    mask_source: str
    affine: np.ndarray
    anatomy: np.ndarray
    anatomy_source: Path
    baseline_index: int
    sources: list  # per session: the image files used
    r1_source: str
    warnings: list = field(default_factory=list)

    @property
    def times_h(self) -> list[float]:
        return [s.time_h for s in self.participant.sessions]


def _load(path: Path, what: str, ref=None):
    data, aff = load_nifti(path, what)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what} must be 3D, got shape {data.shape}", path)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{what} has {int((~np.isfinite(data)).sum())} non-finite values (NaN/Inf)", path)
    if ref is not None:
        rshape, raff, rname = ref
        if data.shape != rshape:
            raise InputError(f"{what}: grid {data.shape} differs from {rshape} of {rname}; {REGISTRATION_HINT}", path)
        diff = float(np.abs(aff - raff).max())
        if diff > AFFINE_TOL_MM:
            raise InputError(f"{what}: affine differs from that of {rname} by {diff:.3g} mm (tolerance "
                             f"{AFFINE_TOL_MM}); {REGISTRATION_HINT}", path)
    return data, aff


def choose_route(p: Participant, route: str) -> str:
    if route == "auto":
        if p.has_all("T1map"):
            return "t1map"
        if p.has_all("T1w"):
            return "t1w"
        missing = [s.name for s in p.sessions if "T1w" not in s.images]
        raise InputError(f"sub-{p.label}: neither a T1map nor a T1w in every session (no T1w in "
                         f"{', '.join(missing)}); give --route", p.root / p.id)
    need = "T1map" if route == "t1map" else "T1w"
    for s in p.sessions:
        if need not in s.images:
            raise InputError(f"route {route} needs a {need} in every session; {s.name} has "
                             f"{', '.join(s.images) or 'none'}", p.root / p.id / s.name / "anat")
    return route


def _baseline(p: Participant, route: str, label: str | None) -> int:
    if label is not None:
        lab = label[4:] if label.startswith("ses-") else label
        idx = next((i for i, s in enumerate(p.sessions) if s.label == lab), None)
        if idx is None:
            raise InputError(f"--baseline-session ses-{lab}: sub-{p.label} has no such session")
    elif route in ("t1w", "enhancement"):
        idx = next((i for i, s in enumerate(p.sessions) if "ce" not in s.images["T1w"].entities), 0)
    else:
        idx = 0
    if idx != 0:
        raise InputError(f"sub-{p.label}: the baseline {p.sessions[idx].name} must be the earliest session "
                         f"(it is at {p.sessions[idx].time_h} h, {p.sessions[0].name} at {p.sessions[0].time_h} h)")
    post = [s for s in p.sessions[1:] for im in s.images.values() if "ce" not in im.entities]
    if route in ("t1w", "enhancement") and "ce" in p.sessions[idx].images["T1w"].entities:
        raise InputError(f"sub-{p.label}: the baseline {p.sessions[idx].name} has a ce- entity (post-contrast)",
                         p.sessions[idx].images["T1w"].path)
    del post
    return idx


def _field_and_agent(p: Participant, suffix: str, opts: Options) -> tuple[str | None, float | None]:
    agents, fields = set(), []
    for s in p.sessions[1:]:
        im = s.images[suffix]
        if "ce" in im.entities:
            agents.add(im.entities["ce"])
        ing = im.sidecar.get("ContrastBolusIngredient")
        if isinstance(ing, str) and normalise_agent(ing):
            agents.add(ing)
    for s in p.sessions:
        f = s.images[suffix].sidecar.get("MagneticFieldStrength")
        if isinstance(f, (int, float)) and not isinstance(f, bool):
            fields.append(float(f))
    agent = opts.agent
    if agent is None:
        names = {normalise_agent(a) or a for a in agents}
        if len(names) > 1:
            raise InputError(f"sub-{p.label}: the sessions name different agents ({', '.join(sorted(names))}); "
                             "give --agent or --r1", p.root / p.id)
        agent = next(iter(agents), None)
    field_T = opts.field_T
    if field_T is None and fields:
        if max(fields) - min(fields) > 0.1:
            raise InputError(f"sub-{p.label}: MagneticFieldStrength differs between sessions ({sorted(set(fields))})")
        field_T = fields[0]
    return agent, field_T


def _t1_seconds(data: np.ndarray, img, mask) -> tuple[np.ndarray, str]:
    """T1 in seconds by the sidecar's Units (BIDS default s); a median above 50 s is taken for milliseconds: refused."""
    units = img.sidecar.get("Units")
    where = img.sidecar_path or img.path
    if units in ("ms", "millisecond", "milliseconds"):
        data, note = data / 1000.0, "ms (sidecar Units), divided by 1000"
    elif units in (None, "s", "second", "seconds"):
        note = "s (BIDS default; no Units in the sidecar)" if units is None else "s (sidecar Units)"
    else:
        raise InputError(f"T1map Units {units!r}: expected 's' or 'ms'", where)
    inside = data[mask] if mask is not None and mask.any() else data[data > 0]
    med = float(np.median(inside)) if inside.size else 0.0
    if med > 50:
        raise InputError(f"T1map median {med:g} s inside the mask looks like milliseconds; set \"Units\": \"ms\" in "
                         "the sidecar (BIDS T1map values are seconds)", where)
    return data, note


def auto_mask(baseline: np.ndarray, suffix: str) -> tuple[np.ndarray, str]:
    """A domain mask from the baseline image when no mask derivative is given (reported as automatic)."""
    from scipy import ndimage

    if suffix == "T1map":
        m = (baseline > 0.1) & (baseline < 3.0)
        how = ("automatic: baseline T1 between 0.1 and 3 s (tissue, not CSF or background), largest component, "
               "holes filled")
    else:
        thr = otsu(baseline[baseline > 0]) if (baseline > 0).any() else 0.0
        m = baseline > thr
        how = f"automatic: baseline T1w above Otsu's threshold {thr:.4g}, largest component, holes filled"
    lab, n = ndimage.label(m)
    if n:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(m), how


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between)
    return float(centres[int(np.argmax(between))])


def prepare(bids_dir, label: str, opts: Options) -> Prepared:
    """Discover, check and convert one participant (nothing is written)."""
    opts.validate()
    p = discover(bids_dir, label, opts.injection_time)
    route = choose_route(p, opts.route)
    b = _baseline(p, route, opts.baseline)
    suffix = "T1map" if route == "t1map" else "T1w"
    base_img = p.sessions[b].images[suffix]
    ref_data, ref_aff = _load(base_img.path, f"{p.sessions[b].name} {suffix}")
    ref = (ref_data.shape, ref_aff, f"{p.sessions[b].name} {suffix} {base_img.path.name}")
    warnings: list[str] = []

    # mask
    if opts.mask_dir:
        mpath = Path(opts.mask_dir) / p.id / "anat" / f"{p.id}_desc-{opts.mask_desc}_mask.nii.gz"
        if not mpath.is_file() and mpath.with_suffix("").is_file():
            mpath = mpath.with_suffix("")
        if not mpath.is_file():
            raise InputError(f"no mask for {p.id} (--mask-dir {opts.mask_dir}, --mask-desc {opts.mask_desc})", mpath)
        mdata, _ = _load(mpath, "mask", ref)
        mask = mdata != 0
        mask_source = str(mpath)
    else:
        mask, mask_source = auto_mask(ref_data, suffix)
        warnings.append(f"no --mask-dir: the domain mask is {mask_source} ({int(mask.sum())} voxels); check it "
                        "in the figures")
    if not mask.any():
        raise InputError("the domain mask is empty", mask_source)

    # images of every session on the reference grid
    series, sources, seq = [], [], []
    for s in p.sessions:
        im = s.images[suffix]
        data, _ = _load(im.path, f"{s.name} {suffix}", ref)
        if route == "t1map":
            data, unit_note = _t1_seconds(data, im, mask)
            im.sidecar.setdefault("_glymph_units", unit_note)
        if route == "t1w":
            tr, fa = im.sidecar.get("RepetitionTime"), im.sidecar.get("FlipAngle")
            for key, v in (("RepetitionTime", tr), ("FlipAngle", fa)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise InputError(f"sidecar lacks {key} (a positive number; the t1w route needs RepetitionTime in s "
                                     f"and FlipAngle in degrees)", im.sidecar_path or im.path)
            if tr > 1.0:
                raise InputError(f"RepetitionTime {tr} looks like milliseconds; BIDS wants seconds",
                                 im.sidecar_path or im.path)
            seq.append((float(tr), float(fa)))
        series.append(data)
        sources.append([im.path])
    series = np.stack(series)

    # relaxivity
    r1, r1_source = None, ""
    if route != "enhancement":
        if opts.r1 is not None:
            r1, r1_source = float(opts.r1), f"--r1 {opts.r1} L/(mmol s) (given on the command line)"
        else:
            agent, field_T = _field_and_agent(p, suffix, opts)
            r1, r1_source = lookup_r1(agent, field_T, str(p.root / p.id))

    if route == "t1map":
        conv = R.convert_t1map(series, series[b], r1, mask)
        conv.meta["T1_units"] = base_img.sidecar.get("_glymph_units", "s")
    elif route == "t1w":
        t1map = p.sessions[b].images.get("T1map")
        if t1map is not None:
            t10, _ = _load(t1map.path, f"{p.sessions[b].name} T1map", ref)
            t10, _ = _t1_seconds(t10, t1map, mask)
            conv = R.convert_t1w(series, seq, b, r1, mask, t1_0=t10)
            sources[b].append(t1map.path)
        else:
            if opts.t1_0 is not None:
                t1_0, note = float(opts.t1_0), "--t1-0 given on the command line"
            else:
                _, field_T = _field_and_agent(p, suffix, opts)
                t1_0 = R.assumed_t1_0(opts.tissue, field_T)
                note = f"tabulated T1_0 of {opts.tissue} at {field_T or 3.0:g} T ({R.T1_0_SOURCE})"
            conv = R.convert_t1w(series, seq, b, r1, mask, t1_0_assumed=t1_0, t1_0_note=note)
    else:
        conv = R.convert_enhancement(series, b, mask)
    if r1 is not None:
        conv.meta["r1_source"] = r1_source
    conv.meta["baseline_session"] = p.sessions[b].name
    conv.meta["time_source"] = p.time_source
    conv.meta["mask"] = mask_source
    warnings = conv.warnings + warnings
    return Prepared(p, conv, mask, mask_source, ref_aff, ref_data, base_img.path, b, sources, r1_source, warnings)
