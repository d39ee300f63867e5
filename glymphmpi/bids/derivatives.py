"""The BIDS derivative dataset written by ``glymph bids`` / ``glymph concentration``.

Layout (OUTPUT_DIR)::

    dataset_description.json        DatasetType derivative, GeneratedBy (name, version, command), SourceDatasets
    .bidsignore                     code/, cohort/, report/ and the method run folders
    code/cohort.toml                every participant processed so far (the group level reads it)
    code/cohort-<labels>.toml       the participants of one participant-level call
    sub-<l>/sub-<l>_subject.toml    the internal contract (docs/architecture.md): scans, times, mask, anatomy
    sub-<l>/sub-<l>_desc-concentration_provenance.json   route, r1 and every assumption, warnings
    sub-<l>/anat/sub-<l>_desc-<mask>_mask.nii.gz (+ .json)
    sub-<l>/anat/sub-<l>_desc-baseline_<T1w|T1map>.nii.gz     the anatomy shown in the report
    sub-<l>/ses-<s>/anat/sub-<l>_ses-<s>_desc-concentration_map.nii.gz (+ .json: Units, route, r1, ...)
    sub-<l>/anat/sub-<l>_desc-<method><map>_map.nii.gz (+ .json: Units)        method maps
    sub-<l>/ses-<s>/anat/sub-<l>_ses-<s>_desc-<method><map>_map.nii.gz          per scan time (fit, misfit, ...)
    sub-<l>/<method>/               the method run folders (summary.json, results.h5, maps/, figures/)
    sub-<l>.html                    the per-subject QC report
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from glymphmpi import __version__
from glymphmpi.io import atomic_write_bytes, atomic_write_json, write_nifti

BIDS_VERSION = "1.9.0"
BIDSIGNORE = "code/\ncohort/\nreport/\n*/romt/\n*/fem/\n*/pinn/\n*/pinn-select/\n*/romt-post/\n*/report/\n*.html\n" \
             "*_subject.toml\n*_provenance.json\n"

#: units of the maps the methods write (maps/<name>.nii.gz); names ending in _NN are per scan
MAP_UNITS = {
    "speed": "mm/h", "peclet": "1 (Peclet number)", "peclet_ratio": "1 (advective over diffusive flux)",
    "pathline_points": "count (pathline points per voxel)", "relative_source": "1/h (source over concentration)",
    "source": "concentration units per hour", "fit": "concentration units (model at the scan time)",
    "misfit": "concentration units (model minus data)", "pinn_pred": "concentration units (network at the scan time)",
    "D": "mm^2/h", "speed_mean": "mm/h",
}


def derivative_name(sid: str, desc: str, suffix: str = "map", ses: str | None = None, ext=".nii.gz") -> str:
    return f"{sid}{'_' + ses if ses else ''}_desc-{desc}_{suffix}{ext}"


def write_dataset_description(out: Path, bids_dir: Path, argv: list[str] | None = None) -> Path:
    """``dataset_description.json`` of the derivative (rewritten only when it changes)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if argv is None else argv)
    cmd = " ".join(["glymph"] + argv[1:]) if argv and argv[0].endswith(("glymph", "__main__.py")) else " ".join(argv)
    doc = {
        "Name": "glymphmpi: tracer concentration and transport estimates",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "glymphmpi", "Version": __version__,
                         "Description": "MR signal to concentration, then rOMT / FEM / PINN transport estimates",
                         "Command": cmd}],
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
    }
    src = Path(bids_dir) / "dataset_description.json"
    try:
        raw = json.loads(src.read_text())
        if isinstance(raw, dict) and raw.get("DatasetDOI"):
            doc["SourceDatasets"][0]["DOI"] = raw["DatasetDOI"]
    except (OSError, json.JSONDecodeError):
        pass
    p = out / "dataset_description.json"
    atomic_write_json(p, doc)
    ign = out / ".bidsignore"
    if not ign.exists():
        atomic_write_bytes(ign, BIDSIGNORE.encode())
    return p


def fingerprint(prep_inputs: list[Path], options: dict) -> str:
    """What the concentration stage depends on: the source files (path, size, mtime) and the options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for p in prep_inputs:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def subject_toml(out: Path, sid: str) -> Path:
    return out / sid / f"{sid}_subject.toml"


def provenance_path(out: Path, sid: str) -> Path:
    return out / sid / f"{sid}_desc-concentration_provenance.json"


def is_current(out: Path, sid: str, fp: str) -> bool:
    """True when the subject TOML exists and was made from the same inputs and options."""
    prov = provenance_path(out, sid)
    if not subject_toml(out, sid).is_file() or not prov.is_file():
        return False
    try:
        return json.loads(prov.read_text()).get("fingerprint") == fp
    except (OSError, json.JSONDecodeError):
        return False


def write_participant(out: Path, prep, fp: str, options: dict) -> Path:
    """Concentration maps, mask, anatomy and sidecars; the subject TOML last (it marks the stage complete)."""
    import tomli_w

    from glymphmpi.subject import ID_RE

    p = prep.participant
    sid = p.id
    conv = prep.conversion
    sdir = out / sid
    toml = subject_toml(out, sid)
    if toml.exists():  # re-made: it is incomplete until the new TOML is written
        toml.unlink()
    aff = prep.affine
    base_rel = lambda q: Path(q).relative_to(sdir).as_posix()  # noqa: E731
    anat = sdir / "anat"
    mask_name = derivative_name(sid, "brain", "mask")
    write_nifti(anat / mask_name, prep.mask.astype(np.uint8), aff)
    atomic_write_json(anat / mask_name.replace(".nii.gz", ".json"), {
        "Type": "Brain", "Description": "the domain of the transport methods",
        "Sources": [str(prep.mask_source)] if not prep.mask_source.startswith("automatic") else [],
        "Automatic": prep.mask_source.startswith("automatic"),
        "Method": prep.mask_source,
    })
    suffix = "T1map" if prep.anatomy_source.name.endswith(("_T1map.nii.gz", "_T1map.nii")) else "T1w"
    anat_name = derivative_name(sid, "baseline", suffix)
    write_nifti(anat / anat_name, prep.anatomy, aff)
    atomic_write_json(anat / anat_name.replace(".nii.gz", ".json"), {
        "Description": "the baseline image, shown under the maps in the report",
        "Sources": [str(prep.anatomy_source)],
        **({"Units": "s"} if suffix == "T1map" else {}),
    })
    scans = []
    for k, ses in enumerate(p.sessions):
        name = derivative_name(sid, "concentration", "map", ses.name)
        path = sdir / ses.name / "anat" / name
        write_nifti(path, conv.concentration[k], aff)
        side = {
            "Units": conv.units,
            "Description": ("tracer concentration" if conv.units == "mmol/L" else
                            "relative signal enhancement: PROPORTIONAL to concentration, not in mmol/L"),
            "Sources": [str(s) for s in prep.sources[k]],
            "time_after_injection_h": ses.time_h,
            "Baseline": k == prep.baseline_index,
            "ClippedVoxels": conv.clipped[k],
            **{key: v for key, v in conv.meta.items() if key != "clipped_voxels_per_session"},
        }
        atomic_write_json(path.with_name(name.replace(".nii.gz", ".json")), side)
        scans.append({"time_h": float(ses.time_h), "path": base_rel(path)})
    prov = {
        "fingerprint": fp,
        "participant": sid,
        "route": conv.route,
        "units": conv.units,
        "sessions": [s.name for s in p.sessions],
        "times_h": [s.time_h for s in p.sessions],
        "time_source": p.time_source,
        "baseline_session": p.sessions[prep.baseline_index].name,
        "mask": prep.mask_source,
        "mask_voxels": int(prep.mask.sum()),
        "clipped_voxels_per_session": conv.clipped,
        "r1_source": prep.r1_source,
        "options": options,
        "conversion": conv.meta,
        "warnings": prep.warnings,
        "version": __version__,
    }
    atomic_write_json(provenance_path(out, sid), prov)
    if not ID_RE.match(sid):  # labels are alphanumeric, so this holds; kept as the contract's check
        raise ValueError(sid)
    doc = {"id": sid, "mask": f"anat/{mask_name}", "anatomy": f"anat/{anat_name}",
           "description": f"{sid} from {p.root}: route {conv.route}, concentration in {conv.units}",
           "scans": scans}
    text = "# written by glymph bids (the internal subject contract)\n" + tomli_w.dumps(doc)
    atomic_write_bytes(toml, text.encode())
    return toml


def _map_entry(name: str):
    """(base name, scan index or None) of ``maps/<name>.nii.gz``: ``fit_02`` -> ("fit", 2), ``pinn_pred_t01`` -> ..."""
    m = re.match(r"^(.*?)_t?(\d{2,3})$", name)
    if m:
        return m.group(1), int(m.group(2))
    return name, None


def export_method_maps(out: Path, sid: str, method: str, sessions: list[str]) -> list[Path]:
    """Copy a complete run's ``maps/*.nii.gz`` to BIDS names with sidecars giving units."""
    import shutil

    rd = out / sid / method
    written = []
    desc_m = re.sub(r"[^A-Za-z0-9]", "", method)
    for f in sorted((rd / "maps").glob("*.nii.gz")) if (rd / "maps").is_dir() else []:
        stem = f.name[: -len(".nii.gz")]
        base, idx = _map_entry(stem)
        desc = desc_m + re.sub(r"[^A-Za-z0-9]", "", base)
        if idx is not None and idx < len(sessions):
            dest = out / sid / sessions[idx] / "anat" / derivative_name(sid, desc, "map", sessions[idx])
        else:
            dest = out / sid / "anat" / derivative_name(sid, desc + ("" if idx is None else f"{idx:02d}"), "map")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name("." + dest.name + ".tmp")
        shutil.copyfile(f, tmp)
        tmp.replace(dest)
        atomic_write_json(dest.with_name(dest.name.replace(".nii.gz", ".json")), {
            "Units": MAP_UNITS.get(base, "see the run folder's summary.json"),
            "Description": f"{method} map {stem}",
            "Sources": [str(f.relative_to(out))],
        })
        written.append(dest)
    return written
