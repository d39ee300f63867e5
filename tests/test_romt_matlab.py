"""rOMT/urOMT users' MATLAB frames -> a glymph subject (issue 15 §6)."""

from __future__ import annotations

import numpy as np
import pytest

from glymphmpi.errors import InputError
from glymphmpi.romt.matlab import init_from_mat


def test_mat_frames_become_a_subject(tmp_path):
    import scipy.io

    from glymphmpi.subject import load_subject

    rng = np.random.default_rng(0)
    frames = [rng.random((6, 7, 5)).astype(np.float32) for _ in range(3)]
    paths = []
    for i, f in enumerate(frames):
        p = tmp_path / f"C1_psnrv{i + 1}.mat"
        scipy.io.savemat(p, {"rho_n": f})
        paths.append(p)
    mask = np.zeros((6, 7, 5))
    mask[1:5, 1:6, 1:4] = 1
    scipy.io.savemat(tmp_path / "mask1.mat", {"rho_n": mask})
    toml = init_from_mat(paths, tmp_path / "subj", "C1", (0.1, 0.1, 0.2), 5 / 60, tmp_path / "mask1.mat")
    s = load_subject(toml)
    assert s.shape == (6, 7, 5)
    np.testing.assert_allclose(s.times_h, [0.0, 5 / 60, 10 / 60])
    np.testing.assert_allclose(s.voxel_size_mm, [0.1, 0.1, 0.2])
    np.testing.assert_allclose(s.scans[2], frames[2], rtol=1e-6)
    assert s.mask.sum() == mask.sum()
    with pytest.raises(InputError, match="no 3D numeric variable 'rho'"):
        init_from_mat(paths, tmp_path / "x", "C1", 0.1, 1.0, tmp_path / "mask1.mat", variable="rho")
    with pytest.raises(InputError, match="frame interval"):
        init_from_mat(paths, tmp_path / "x", "C1", 0.1, float("nan"), tmp_path / "mask1.mat")
