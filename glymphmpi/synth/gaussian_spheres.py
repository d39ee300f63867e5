"""The rOMT paper's Gaussian-sphere series (Chen et al., rOMT_spdup test data).

Image i (1-based, i = 1..5) is ``100/sqrt(2 pi) exp(-(X^2+Y^2+Z^2)/2)`` on a
meshgrid of ``x = linspace(-6, 6, n) - 1.6 + (i-1)*0.8`` (same y, z); for
i >= 2 it is blurred with a Gaussian of standard deviation ``sqrt(0.2) * i``
voxels, kernel radius ``ceil(2 std)`` and replicated edges, as MATLAB's
``imgaussfilt3`` does by default (a fresh blur of the clean image each time).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d


def gaussian_kernel(std: float) -> np.ndarray:
    """imgaussfilt3's default kernel: size 2*ceil(2 std)+1, normalised to sum 1."""
    r = int(math.ceil(2.0 * std))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2.0 * std**2))
    return k / k.sum()


def blur_replicate(img: np.ndarray, std: float) -> np.ndarray:
    """Separable Gaussian blur with replicated edges (MATLAB 'replicate' padding)."""
    k = gaussian_kernel(std)
    out = img
    for ax in range(img.ndim):
        out = correlate1d(out, k, axis=ax, mode="nearest")
    return out


def clean_image(i: int, n: int = 50) -> np.ndarray:
    x = np.linspace(-6.0, 6.0, n) - 1.6 + (i - 1) * 0.8
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    return 100.0 / math.sqrt(2.0 * math.pi) * np.exp(-(X**2 + Y**2 + Z**2) / 2.0)


def blur_std(i: int) -> float:
    return math.sqrt(0.2) * i


def gaussian_spheres(n: int = 50, n_images: int = 5) -> tuple[np.ndarray, dict]:
    """The image series and its truth.

    Returns:
        images: (n_images, n, n, n) float64.
        truth: centre of each image in voxel index coordinates (0-based), the
            ideal centre velocity per loop in voxels per unit model time for a
            loop of model length T = 4 (the rOMT default nt*dt), and the
            blur standard deviations.
    """
    images = np.empty((n_images, n, n, n))
    for i in range(1, n_images + 1):
        img = clean_image(i, n)
        images[i - 1] = blur_replicate(img, blur_std(i)) if i >= 2 else img
    h = 12.0 / (n - 1)  # grid spacing in the formula's units
    centres = np.array([[(1.6 - (i - 1) * 0.8 + 6.0) / h] * 3 for i in range(1, n_images + 1)])
    step = np.diff(centres, axis=0)  # voxels per image interval
    T = 4.0
    vel = step / T
    return images, {
        "n": n,
        "centres_voxel": centres.tolist(),
        "displacement_per_loop_voxel": step.tolist(),
        "velocity_voxel_per_model_time": vel.tolist(),
        "speed_voxel_per_model_time": float(np.linalg.norm(vel[0])),
        "direction": (vel[0] / np.linalg.norm(vel[0])).tolist(),
        "model_time_per_loop": T,
        "blur_std_voxel": [0.0] + [blur_std(i) for i in range(2, n_images + 1)],
    }


def write(out_dir, n: int = 50, n_images: int = 5, sid: str = "gauss", dt_h: float = 1.0,
          mask_fraction: float = 0.0):
    """Write the series as a subject (mask = whole box unless ``mask_fraction`` > 0)."""
    from pathlib import Path

    from glymphmpi.io import atomic_write_json
    from glymphmpi.subject import write_subject

    images, truth = gaussian_spheres(n, n_images)
    mask = np.ones(images.shape[1:], bool)
    if mask_fraction > 0:
        mask = images.max(axis=0) > mask_fraction * images.max()
    affine = np.eye(4)
    times = [k * dt_h for k in range(n_images)]
    path = write_subject(out_dir, sid, times, images, mask, affine,
                         description="rOMT Gaussian spheres (Chen et al.)", dtype=np.float64)
    truth["times_h"] = times
    atomic_write_json(Path(out_dir) / "truth.json", truth)
    return path
