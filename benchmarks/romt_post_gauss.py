"""Accuracy of the rOMT post-processing on the Gaussian spheres (issue check).

Given a finished ``glymph romt`` run on ``glymph synth gaussian-spheres``
(its truth.json next to subject.toml), prints

* the mean cosine between the flux vectors (start-to-end displacements of
  all kept pathlines) and the true direction of motion (the diagonal);
  the reference code reports 0.90;
* the mean of the speed map over the voxels within ``--radius`` voxels of
  the centre path (the segment from the first to the last sphere centre),
  relative to the ideal speed |displacement per loop| / (hours per loop);
  the reference reports +9%.

Usage: .venv/bin/python benchmarks/romt_post_gauss.py RUN_DIR SUBJECT_DIR [--radius 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def evaluate(run_dir, subject_dir, radius: float = 2.0) -> dict:
    import nibabel as nib

    from glymphmpi.io.vtk import read_vtp

    run_dir, subject_dir = Path(run_dir), Path(subject_dir)
    truth = json.loads((subject_dir / "truth.json").read_text())
    direction = np.asarray(truth["direction"], dtype=np.float64)
    fv = read_vtp(run_dir / "vtk" / "flux_vectors.vtp")
    disp = fv["point_data"]["displacement_mm"].astype(np.float64)
    length = np.linalg.norm(disp, axis=1)
    ok = length > 0
    cos = (disp[ok] @ direction) / length[ok]
    img = nib.load(run_dir / "maps" / "speed.nii.gz")
    speed = np.asarray(img.dataobj, dtype=np.float64)
    vox = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    centres = np.asarray(truth["centres_voxel"], dtype=np.float64)
    a, b = centres[0], centres[-1]
    ii = np.indices(speed.shape).reshape(3, -1).T.astype(np.float64)
    t = np.clip((ii - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
    dist = np.linalg.norm(ii - (a + t[:, None] * (b - a)), axis=1).reshape(speed.shape)
    near = (dist <= radius) & (speed > 0)
    times = np.asarray(truth["times_h"], dtype=np.float64)
    step_vox = np.asarray(truth["displacement_per_loop_voxel"], dtype=np.float64)
    ideal = float(np.mean(np.linalg.norm(step_vox * vox, axis=1) / np.diff(times)))
    mean_near = float(speed[near].mean()) if near.any() else float("nan")
    return {"n_flux_vectors": int(ok.sum()), "mean_cosine": float(cos.mean()),
            "median_cosine": float(np.median(cos)), "speed_near_path_mm_per_h": mean_near,
            "ideal_speed_mm_per_h": ideal, "relative_speed_error": mean_near / ideal - 1.0,
            "voxels_near_path": int(near.sum()), "radius_voxels": radius}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("subject_dir")
    ap.add_argument("--radius", type=float, default=2.0)
    args = ap.parse_args()
    print(json.dumps(evaluate(args.run_dir, args.subject_dir, args.radius), indent=2))


if __name__ == "__main__":
    main()
