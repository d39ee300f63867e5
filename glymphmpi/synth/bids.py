"""Synthetic raw BIDS dataset from the brain-diffusion phantom (``glymph synth bids OUT --subjects N``).

The phantom's concentration C(x, t) (glymphmpi.synth.brain_diffusion, scaled to a realistic
peak in mmol/L) goes through the signal equations of glymphmpi.concentration:

* a known T1_0 map (white matter to grey matter by the template's WM probability, CSF-like
  outside the white matter), R1 = 1/T1_0 + r1 C;
* ``t1map`` subjects: one T1 map (s) per session;
* ``t1w`` subjects: one spoiled-gradient-echo T1w per session, S = M0 sin(a)(1 - E1)/(1 - cos(a) E1),
  with a known M0 map, plus a baseline T1 map (so that M0 can be recovered);
* optional Gaussian noise on the images (relative to the baseline image's mean in the mask).

Layout (one session per time point, the baseline session pre-contrast)::

    OUT/dataset_description.json  README  participants.tsv  participants.json
    OUT/sub-01/sub-01_sessions.tsv (session_id, time_after_injection_h, acq_time)  sub-01_sessions.json
    OUT/sub-01/ses-01/anat/sub-01_ses-01_T1map.nii.gz + .json        (t1map route)
    OUT/sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz + .json, sub-02_ses-01_T1map.nii.gz + .json
    OUT/sub-02/ses-02/anat/sub-02_ses-02_ce-gadobutrol_T1w.nii.gz + .json        (t1w route)
    OUT/derivatives/masks/sub-01/anat/sub-01_desc-brain_mask.nii.gz       the domain
    OUT/derivatives/truth/sub-01/subject.toml, conc_*.nii.gz, T1_0, M0, truth.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from glymphmpi.concentration.relaxivity import lookup_r1
from glymphmpi.concentration.routes import T1_0_DEFAULTS_S
from glymphmpi.concentration.signal import spgr_signal
from glymphmpi.errors import InputError

from . import brain_diffusion as bd

BIDS_VERSION = "1.9.0"
INJECTION = datetime(2024, 1, 1, 8, 0, 0)


@dataclass(frozen=True)
class SynthBidsSpec:
    """Settings of the synthetic dataset.

    Attributes:
        subjects: number of participants (sub-01, sub-02, ...).
        routes: the acquisition per subject, cycled (``t1map``: T1 maps; ``t1w``: SPGR T1w + baseline T1 map).
        block: phantom block in voxels.
        times_h: session times after injection (the first is the baseline, C = 0).
        D_mm2_per_h: the phantom's diffusion coefficient.
        peak_mmol_per_L: the concentration is scaled so that its maximum is this.
        agent, field_T: contrast agent and field strength (r1 from the table).
        TR_s, flip_deg: the T1w sequence.
        noise: Gaussian noise std relative to the baseline image's mean inside the mask.
        seed: noise seed (subject n uses seed + n).
        dt_h: the phantom's time step.
    """

    subjects: int = 2
    routes: tuple[str, ...] = ("t1map", "t1w")
    block: tuple[int, int, int] = (12, 12, 12)
    times_h: tuple[float, ...] = (0.0, 7.0, 24.0, 46.0)
    D_mm2_per_h: float = 0.72
    peak_mmol_per_L: float = 0.5
    agent: str = "gadobutrol"
    field_T: float = 3.0
    TR_s: float = 0.01
    flip_deg: float = 12.0
    noise: float = 0.0
    seed: int = 0
    dt_h: float = 0.25
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.subjects < 1 or self.subjects > 99:
            raise InputError(f"--subjects must be between 1 and 99, got {self.subjects}")
        for r in self.routes:
            if r not in ("t1map", "t1w"):
                raise InputError(f"--routes: {r!r} is not one of t1map, t1w")
        if len(self.times_h) < 3 or any(b <= a for a, b in zip(self.times_h, self.times_h[1:])):
            raise InputError("--times: need at least 3 strictly increasing times")
        if self.noise < 0 or self.peak_mmol_per_L <= 0 or self.TR_s <= 0 or not 0 < self.flip_deg < 90:
            raise InputError("need noise >= 0, peak > 0, TR > 0 and 0 < flip angle < 90 degrees")


def t1_0_map(prob: np.ndarray, field_T: float) -> np.ndarray:
    """Known baseline T1 (s): grey matter (WM probability 0) to white matter (1); tabulated values."""
    f = min(T1_0_DEFAULTS_S, key=lambda k: abs(k - field_T))
    wm, gm = T1_0_DEFAULTS_S[f]["wm"], T1_0_DEFAULTS_S[f]["gm"]
    p = np.clip(prob, 0.0, 1.0)
    return gm + (wm - gm) * p


def _json(path: Path, doc: dict) -> None:
    from glymphmpi.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def _text(path: Path, text: str) -> None:
    from glymphmpi.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _nifti(path: Path, data, affine, dtype=np.float32) -> None:
    """A NIfTI with spatial units mm (validators look for them), atomically."""
    from glymphmpi.io import write_nifti

    write_nifti(path, np.asarray(data, dtype=dtype), affine, keep_dtype=True)


def write_bids(out, spec: SynthBidsSpec, prob=None, template_affine=None) -> Path:
    """Write the dataset (see module docstring); returns its root."""
    from glymphmpi.subject import write_subject

    spec.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    r1, r1_source = lookup_r1(spec.agent, spec.field_T)
    pspec = bd.PhantomSpec(block=tuple(spec.block), D_mm2_per_h=spec.D_mm2_per_h, times_h=tuple(spec.times_h),
                           noise=0.0, dt_h=spec.dt_h)
    if prob is None:
        prob, template_affine = bd.load_wm_template(pspec.resolution_mm)
    _, clean, mask, affine, truth = bd.make_phantom(pspec, prob, template_affine)
    sl = bd.choose_block(prob, template_affine, pspec)
    wm = prob[sl]
    scale = spec.peak_mmol_per_L / float(clean.max())
    conc = clean * scale
    t10 = t1_0_map(np.where(mask, wm, 0.0), spec.field_T)
    t10 = np.where(mask, t10, T1_0_DEFAULTS_S[3.0]["csf"])
    m0 = 1000.0 * (0.8 + 0.2 * np.clip(wm, 0, 1))  # arbitrary units, a proton-density-like map

    _json(out / "dataset_description.json", {
        "Name": "glymphmpi synthetic contrast-enhanced MRI (brain-diffusion phantom)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["glymphmpi"],
        "GeneratedBy": [{"Name": "glymphmpi", "Description": "glymph synth bids"}],
    })
    _text(out / "README", "Synthetic dataset written by `glymph synth bids` (glymphmpi): the brain-diffusion\n"
                          "phantom's tracer concentration through the MR signal equations. One session per time\n"
                          "point after contrast injection; ses-01 is the pre-contrast baseline. The truth is in\n"
                          "derivatives/truth, the domain masks in derivatives/masks.\n")
    _text(out / ".bidsignore", "")
    parts = ["participant_id\troute\n"]
    masks = out / "derivatives" / "masks"
    _json(masks / "dataset_description.json", {
        "Name": "domain masks", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "glymphmpi", "Description": "glymph synth bids: the phantom's white-matter block"}],
    })
    truth_root = out / "derivatives" / "truth"
    _json(truth_root / "dataset_description.json", {
        "Name": "ground truth of the synthetic dataset", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "glymphmpi", "Description": "glymph synth bids"}],
    })
    ses_labels = [f"{i + 1:02d}" for i in range(len(spec.times_h))]
    for n in range(spec.subjects):
        label = f"{n + 1:02d}"
        sub = f"sub-{label}"
        route = spec.routes[n % len(spec.routes)]
        parts.append(f"{sub}\t{route}\n")
        rng = np.random.default_rng(spec.seed + n)
        sdir = out / sub
        rows = ["session_id\ttime_after_injection_h\tacq_time\n"]
        for k, (ses, t) in enumerate(zip(ses_labels, spec.times_h)):
            acq = (INJECTION + timedelta(hours=float(t))).strftime("%Y-%m-%dT%H:%M:%S")
            rows.append(f"ses-{ses}\t{float(t):g}\t{acq}\n")
            adir = sdir / f"ses-{ses}" / "anat"
            R1 = 1.0 / t10 + r1 * conc[k]
            T1 = 1.0 / R1
            base_side = {"MagneticFieldStrength": spec.field_T, "Manufacturer": "glymphmpi synthetic"}
            if k > 0:
                base_side["ContrastBolusIngredient"] = "GADOLINIUM"
            if route == "t1map" or k == 0:
                img = T1.copy()
                if spec.noise > 0:
                    img = img + spec.noise * float(t10[mask].mean()) * rng.standard_normal(img.shape)
                ce = f"_ce-{spec.agent}" if (route == "t1map" and k > 0) else ""
                stem = f"{sub}_ses-{ses}{ce}_T1map"
                _nifti(adir / f"{stem}.nii.gz", img, affine)
                _json(adir / f"{stem}.json", {**base_side, "Units": "s"})
            if route == "t1w":
                S = spgr_signal(m0, T1, spec.TR_s, spec.flip_deg)
                if spec.noise > 0:
                    S0 = spgr_signal(m0, t10, spec.TR_s, spec.flip_deg)
                    S = S + spec.noise * float(S0[mask].mean()) * rng.standard_normal(S.shape)
                ce = f"_ce-{spec.agent}" if k > 0 else ""
                stem = f"{sub}_ses-{ses}{ce}_T1w"
                _nifti(adir / f"{stem}.nii.gz", S, affine)
                _json(adir / f"{stem}.json", {**base_side, "RepetitionTime": spec.TR_s, "FlipAngle": spec.flip_deg,
                                              "MRAcquisitionType": "3D", "PulseSequenceType": "spoiled gradient echo"})
        _text(sdir / f"{sub}_sessions.tsv", "".join(rows))
        _json(sdir / f"{sub}_sessions.json", {
            "time_after_injection_h": {"LongName": "time after contrast injection",
                                       "Description": "hours from the injection of the contrast agent to the "
                                                      "acquisition; the baseline session is pre-contrast",
                                       "Units": "h"},
            "acq_time": {"Description": "acquisition time of the session (the injection was at "
                                        f"{INJECTION.strftime('%Y-%m-%dT%H:%M:%S')})"},
        })
        _nifti(masks / sub / "anat" / f"{sub}_desc-brain_mask.nii.gz", mask.astype(np.uint8), affine, np.uint8)
        tdir = truth_root / sub
        write_subject(tdir, sub, spec.times_h, conc, mask, affine,
                      description=f"truth of {sub}: the phantom's concentration (mmol/L), D = "
                                  f"{spec.D_mm2_per_h} mm^2/h")
        _nifti(tdir / "T1_0.nii.gz", t10, affine)
        _nifti(tdir / "M0.nii.gz", m0, affine)
        _json(tdir / "truth.json", {**truth, "route": route, "r1_L_per_mmol_s": r1, "r1_source": r1_source,
                                    "agent": spec.agent, "field_T": spec.field_T, "TR_s": spec.TR_s,
                                    "flip_deg": spec.flip_deg, "image_noise": spec.noise,
                                    "concentration_scale": scale, "peak_mmol_per_L": spec.peak_mmol_per_L,
                                    "sessions": [f"ses-{s}" for s in ses_labels]})
    _text(out / "participants.tsv", "".join(parts))
    _json(out / "participants.json", {"route": {"Description": "how the synthetic data were acquired: T1 maps "
                                                               "(t1map) or SPGR T1-weighted images (t1w)"}})
    return out
