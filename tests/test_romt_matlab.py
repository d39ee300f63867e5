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


def _frames(tmp_path, n=3):
    import scipy.io

    rng = np.random.default_rng(1)
    frames = [rng.random((6, 7, 5)).astype(np.float32) for _ in range(n)]
    paths = []
    for i, f in enumerate(frames):
        p = tmp_path / f"C1_psnrv{i + 1}.mat"
        scipy.io.savemat(p, {"rho_n": f})
        paths.append(str(p))
    mask = np.zeros((6, 7, 5))
    mask[1:5, 1:6, 1:4] = 1
    scipy.io.savemat(tmp_path / "mask1.mat", {"rho_n": mask})
    return frames, paths, str(tmp_path / "mask1.mat")


def test_subject_init_cli_takes_mat_frames(tmp_path, capsys):
    """`glymph subject init *.mat --voxel-size --frame-interval-h --mask` (the rOMT/urOMT users' migration path)."""
    from glymphmpi.cli import main
    from glymphmpi.subject import load_subject

    frames, paths, mask = _frames(tmp_path)
    out = tmp_path / "subj"
    assert main(["subject", "init", *paths, "--out", str(out), "--id", "C1", "--mask", mask,
                 "--voxel-size", "0.1", "--frame-interval-h", str(5 / 60)]) == 0
    s = load_subject(out / "subject.toml")
    np.testing.assert_allclose(s.times_h, [0.0, 5 / 60, 10 / 60])
    np.testing.assert_allclose(s.voxel_size_mm, [0.1, 0.1, 0.1])
    np.testing.assert_allclose(s.scans[1], frames[1], rtol=1e-6)
    out2 = tmp_path / "subj2"
    assert main(["subject", "init", *paths, "--out", str(out2), "--id", "C1", "--mask", mask,
                 "--voxel-size", "0.1", "0.1", "0.2", "--times", "1,2,4"]) == 0
    s2 = load_subject(out2 / "subject.toml")
    np.testing.assert_allclose(s2.times_h, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(s2.voxel_size_mm, [0.1, 0.1, 0.2])


@pytest.mark.parametrize("extra, msg", [
    ([], "--voxel-size is required"),
    (["--voxel-size", "0.1"], "either --times or --frame-interval-h"),
    (["--voxel-size", "0.1", "--times", "0,1"], "--times has 2 values for 3 frames"),
    (["--voxel-size", "0.1", "--times", "0,2,1"], "--times must increase"),
    (["--voxel-size", "0.1", "0.2", "--frame-interval-h", "1"], "one number or three"),
    (["--voxel-size", "-1", "--frame-interval-h", "1"], "voxel size must be positive"),
])
def test_subject_init_cli_mat_bad_settings_exit_2_with_one_line(tmp_path, capsys, extra, msg):
    from glymphmpi.cli import main

    _, paths, mask = _frames(tmp_path)
    rc = main(["subject", "init", *paths, "--out", str(tmp_path / "s"), "--id", "C1", "--mask", mask, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "s" / "subject.toml").exists()
