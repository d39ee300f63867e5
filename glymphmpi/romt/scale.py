"""Scale-free rOMT: the images are rescaled to a fixed reference intensity before solving.

The objective ``sum dt rho |v|^2 + beta ||rho_nt - target||^2 + gamma smooth(v)`` is
not invariant to a constant factor c on the images (the kinetic term grows like c,
the fit like c^2, the smoothness not at all), so fixed weights would mean different
things for images in % signal change, mmol/L or arbitrary units. Every series is
therefore solved on ``images * REFERENCE_INTENSITY / s``, where ``s`` is the series'
robust intensity scale (:func:`intensity_scale`), and the densities are converted
back; velocities are the same for any c (to round-off), and the stopping tests are
relative. ``REFERENCE_INTENSITY`` is the scale of the rOMT paper's Gaussian spheres
(about 10 at 50^3), at which beta = 5000 and gamma = 80 were set.
"""

from __future__ import annotations

import numpy as np

REFERENCE_INTENSITY = 10.0
METHOD = "mass-weighted median of the positive voxels of all images, mapped to 10"


def intensity_scale(images: np.ndarray) -> float:
    """The mass-weighted median intensity of a series: the level q such that half of the
    total mass (sum of positive values) lies in voxels with values <= q.

    Scale-equivariant (``intensity_scale(c x) = c intensity_scale(x)``), insensitive to the
    near-zero tails that fill a large box, and to a few hot voxels (they carry little mass).
    """
    v = np.asarray(images, dtype=np.float64)
    v = np.sort(v[v > 0])
    if v.size == 0:
        raise ValueError("no positive intensity in the images")
    c = np.cumsum(v)
    return float(v[min(int(np.searchsorted(c, 0.5 * c[-1])), v.size - 1)])


def normalisation_factor(images: np.ndarray) -> tuple[float, float]:
    """(s, f): the robust scale s of the series and the factor f = REFERENCE_INTENSITY / s applied to it."""
    s = intensity_scale(images)
    return s, REFERENCE_INTENSITY / s
