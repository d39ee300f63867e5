"""rOMT Lagrangian post-processing on synthetic fields with exact answers.

The fields are written in the rOMT results.h5 contract layout. Cases:

* uniform translation (constant v, uniform density): straight pathlines of
  length |v| T, speed |v| in mm/h, identical for every integrator (exact);
* translating and diffusing Gaussian: with v constant and the density the
  exact solution, the augmented velocity v - sigma grad log rho moves a
  particle from x0 to c(t) + (x0 - c0) sqrt(1 + 2 sigma t / s0^2); the error
  is pure time discretisation (grad log rho of a Gaussian is linear in x, so
  central differences and trilinear interpolation are exact): RK2 must
  converge at second order;
* pure diffusion (v = 0): Pe = 0 at every point, flux vectors radial;
* consistency with the solver's own transport: the centre of mass of a blob
  moved by glymphmpi.romt.transport for nt steps moves as far as a pathline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from glymphmpi.romt import lagrangian as lg
from glymphmpi.romt import post
from glymphmpi.romt.post_config import RomtPostConfig


def gaussian_loop(shape, nt, dt, vel, sigma, s0, c0, t0=0.0):
    """Velocity (nt, 3, ...) constant = vel and the exact densities (nt+1, ...)."""
    ii = np.indices(shape).astype(np.float64)
    rhos = []
    for k in range(nt + 1):
        t = t0 + k * dt
        c = np.asarray(c0) + np.asarray(vel) * t
        s2 = s0 ** 2 + 2 * sigma * t
        r2 = sum((ii[d] - c[d]) ** 2 for d in range(3))
        rhos.append(np.exp(-r2 / (2 * s2)) * (s0 ** 2 / s2) ** 1.5)
    v = np.broadcast_to(np.asarray(vel, np.float32)[None, :, None, None, None], (nt, 3) + tuple(shape))
    return np.ascontiguousarray(v), np.asarray(rhos, np.float32)


def exact_position(x0, c0, vel, sigma, s0, t):
    return np.asarray(c0) + np.asarray(vel) * t + (np.asarray(x0) - np.asarray(c0)) * np.sqrt(
        1 + 2 * sigma * t / s0 ** 2)


# ----------------------------------------------------------------- pure numerics


@pytest.mark.parametrize("integrator", ["euler", "rk2", "rk4"])
def test_uniform_translation_straight_lines(integrator):
    shape, nt, dt = (20, 16, 12), 10, 0.4
    vel = np.array([0.5, -0.25, 0.3])  # voxels per model time
    v = np.broadcast_to(vel.astype(np.float32)[None, :, None, None, None], (nt, 3) + shape).copy()
    rho = np.ones((nt + 1,) + shape, np.float32)
    t0_h, t1_h = 2.0, 9.0  # 7 h over T = 4 model time: 1.75 h per model time
    steps = lg.ArraySteps([(v, rho, t0_h, t1_h), (v, rho, t1_h, 16.0)], dt, sigma=0.3)
    vox = np.array([0.5, 0.8, 1.2])
    seeds = np.array([[3.0, 10.0, 2.0], [5.2, 12.7, 3.3], [2.0, 9.0, 4.0]])
    lines = lg.trace(steps, seeds, np.ones(shape, bool), vox, lg.TraceSettings(integrator=integrator))
    assert np.all(lines.n_points == 2 * nt + 1)
    # a pathline moves dt * v per model step, like the transport: 2 loops x nt x dt x v in total
    np.testing.assert_allclose(lines.ends() - seeds, np.tile(2 * nt * dt * vel, (3, 1)), atol=1e-5)
    # straight: every node on the segment, equally spaced
    k = np.arange(2 * nt + 1)[:, None, None]
    np.testing.assert_allclose(lines.positions, seeds[None] + k * dt * vel[None, None], atol=1e-5)
    # speeds in mm/h: the first loop has 1.75 h per model time, the second 7/4 h as well
    speed_mm_h = np.linalg.norm(vel * vox) / 1.75
    np.testing.assert_allclose(lines.speed_mm_per_h, speed_mm_h, rtol=1e-5)
    # uniform density: no diffusion, Pe undefined (NaN), flux speed = speed
    assert np.all(lines.diffusive_mm_per_h == 0) and np.all(np.isnan(lines.peclet))
    np.testing.assert_allclose(lines.flux_speed_mm_per_h, speed_mm_h, rtol=1e-5)
    np.testing.assert_allclose(lines.times_h, np.r_[np.linspace(2, 9, nt + 1), np.linspace(9, 16, nt + 1)[1:]])


@pytest.mark.parametrize("mode", ["linear", "constant"])
def test_diffusing_gaussian_matches_exact_pathlines_second_order(mode):
    shape, vel, sigma, s0, c0, T = (24, 22, 20), (0.5, 0.25, 0.0), 0.5, 3.0, (8.0, 9.0, 10.0), 4.0
    seeds = np.asarray(c0) + np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.5, -1], [2, 2, 2], [-2.5, 1, 0.5]])
    exact = exact_position(seeds, c0, vel, sigma, s0, T)
    errs = {}
    for nt in (10, 20):
        dt = T / nt
        v, rho = gaussian_loop(shape, nt, dt, vel, sigma, s0, c0)
        steps = lg.ArraySteps([(v, rho, 0.0, 8.0)], dt, sigma)
        st = lg.TraceSettings(integrator="rk2", time_interpolation=mode, log_density_floor=1e-12,
                              stop_density_fraction=0.0)
        lines = lg.trace(steps, seeds, np.ones(shape, bool), np.ones(3), st)
        assert np.all(lines.n_points == nt + 1)
        errs[nt] = np.abs(lines.ends() - exact).max()
        # the diffusive speed at the seed is sigma |x0 - c0| / s0^2 voxel per model time, 2 h each
        d0 = sigma * np.linalg.norm(seeds - np.asarray(c0), axis=1) / s0 ** 2 / 2.0
        np.testing.assert_allclose(lines.diffusive_mm_per_h[0], d0, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(lines.speed_mm_per_h, np.linalg.norm(vel) / 2.0, rtol=1e-5)
    # the displacement (up to 2.5 voxels) is matched to better than 1e-3 voxel (measured 5.3e-4
    # linear, 2.7e-4 constant) ...
    assert errs[10] < 1e-3, errs
    # ... and halving the step divides the error by about 4 (second order; 3.5 allows float32 data)
    assert errs[10] / errs[20] > 3.5, errs


def test_pure_diffusion_pe_zero_and_radial_flux_vectors():
    shape, sigma, s0, c0, nt, T = (21, 21, 21), 0.8, 2.5, (10.0, 10.0, 10.0), 10, 4.0
    v, rho = gaussian_loop(shape, nt, T / nt, (0, 0, 0), sigma, s0, c0)
    steps = lg.ArraySteps([(v, rho, 0.0, 4.0)], T / nt, sigma)
    seeds = np.array([[12.0, 10, 10], [10, 7.0, 11], [8, 12, 13], [10, 10, 10]])
    st = lg.TraceSettings(log_density_floor=1e-12, stop_density_fraction=0.0)
    lines = lg.trace(steps, seeds, np.ones(shape, bool), np.ones(3), st)
    pe = lines.peclet
    assert np.all(lines.speed_mm_per_h == 0)
    ok = np.isfinite(pe)
    assert ok[:, :3].all() and np.all(pe[ok] == 0)  # Pe = 0 where diffusion is defined
    # the centre seed has no gradient: it does not move and is stopped (speed below the floor)
    assert lines.n_points[3] == 1 and lines.stop_reason[3] == 2
    flux = lg.flux_vectors(lines.subset(np.arange(3)))
    radial = seeds[:3] - np.asarray(c0)
    cos = np.sum(flux["displacement"] * radial, 1) / (
        np.linalg.norm(flux["displacement"], axis=1) * np.linalg.norm(radial, axis=1))
    assert np.all(cos > 0.99999)  # along -sigma grad log rho, i.e. radially outward
    exact = exact_position(seeds[:3], c0, (0, 0, 0), sigma, s0, T)
    # RK2 time error, O(dt^2): 2.1e-3 voxel measured for displacements of 1.8 to 2.9 voxels
    np.testing.assert_allclose(flux["end"], exact, atol=4e-3)


def test_pathline_matches_solver_transport_displacement():
    """Consistency with the model's step: nt transport steps of a blob with constant v
    move its centre of mass by exactly as much as a pathline moves (not 2.5 times)."""
    from glymphmpi.romt.transport import Transport

    shape, nt, dt = (34, 26, 26), 10, 0.4
    vel = np.array([0.9, 0.35, -0.2])
    ii = np.indices(shape).astype(np.float64)
    c0 = np.array([11.0, 12.0, 14.0])  # the blob stays > 7 std from the box edges (no mass lost)
    rho0 = np.exp(-sum((ii[d] - c0[d]) ** 2 for d in range(3)) / (2 * 1.5 ** 2)).ravel()
    active = np.arange(rho0.size)
    tr = Transport(shape, active, dt, sigma=0.0)
    sd = tr.linearize(np.tile(vel[:, None], (1, active.size)))
    rho = rho0.copy()
    dens = [rho0.reshape(shape)]
    for _ in range(nt):
        rho = tr.step(rho, sd)
        dens.append(rho.reshape(shape))
    com = [np.array([(ii[d] * r).sum() / r.sum() for d in range(3)]) for r in (dens[0], dens[-1])]
    moved = com[1] - com[0]
    v = np.broadcast_to(vel.astype(np.float32)[None, :, None, None, None], (nt, 3) + shape).copy()
    steps = lg.ArraySteps([(v, np.asarray(dens, np.float32), 0.0, 1.0)], dt, sigma=0.0)
    lines = lg.trace(steps, c0[None], np.ones(shape, bool), np.ones(3))
    # float32 positions: 1e-5 voxel; a pathline stepping 2.5 times further would be off by 5 voxels
    np.testing.assert_allclose(lines.ends()[0] - c0, moved, atol=1e-5)
    np.testing.assert_allclose(moved, nt * dt * vel, atol=1e-5)


def test_particles_never_leave_the_mask():
    shape, nt, dt = (20, 10, 10), 14, 0.5
    vel = np.array([1.0, 0.0, 0.0])
    v = np.broadcast_to(vel.astype(np.float32)[None, :, None, None, None], (nt, 3) + shape).copy()
    rho = np.ones((nt + 1,) + shape, np.float32)
    mask = np.zeros(shape, bool)
    mask[2:9, 2:8, 2:8] = True  # voxels i = 2..8; a particle at 3 + 0.5 k stops before i = 9
    lines = lg.trace(lg.ArraySteps([(v, rho, 0, 1)], dt, 0.0), np.array([[3.0, 5, 5]]), mask, np.ones(3))
    end = lines.ends()[0]
    assert end[0] == pytest.approx(8.5) and lines.stop_reason[0] == 3 and lines.n_points[0] == 12
    assert np.all(lines.positions[12:, 0, 0] == 8.5)


def test_seed_rules():
    shape = (6, 5, 4)
    mx = np.zeros(shape)
    sm = np.zeros(shape)
    mx[1, 1, 1], mx[2, 2, 2], mx[3, 3, 3] = 1.0, 0.5, 0.05
    sm[2, 2, 2], sm[3, 3, 3], sm[4, 4, 3] = 5.0, 5.0, 0.5
    mask = np.ones(shape, bool)
    mask[1, 1, 1] = False
    f = lambda rule, **kw: {tuple(s) for s in lg.select_seeds(mx, sm, mask, rule, 0.1, 1.0, **kw).astype(int)}  # noqa: E731
    # the max rule uses the maximum inside the mask (0.5), 10% of it = 0.05 (strict)
    assert f("max") == {(2, 2, 2)}
    assert f("sum") == {(2, 2, 2), (3, 3, 3)}
    assert f("both") == {(2, 2, 2)}
    assert f("either") == {(2, 2, 2), (3, 3, 3)}
    assert f("sum", every=2) == {(2, 2, 2)}
    with pytest.raises(ValueError, match="valid"):
        f("median")


def test_cleanup_and_maps():
    # three hand-made lines over 4 nodes
    pos = np.zeros((4, 3, 3), np.float32)
    pos[:, 0] = [[1, 1, 1], [2, 1, 1], [3, 1, 1], [4, 1, 1]]  # 4 distinct points, 3 voxels: kept
    pos[:, 1] = [[1, 3, 1], [1, 3, 1], [5, 3, 1], [5, 3, 1]]  # 2 distinct points: dropped
    pos[:, 2] = [[1, 5, 1], [2, 5, 1], [3, 5, 1], [3, 5, 1]]  # 2 voxels apart: dropped (< 3)
    n_points = np.array([4, 4, 3])
    spd = np.tile(np.array([[1.0], [2.0], [3.0]], np.float32).T, (4, 1))
    spd[:, 0] = [1, 2, 3, 4]
    dif = np.full((4, 3), 2.0, np.float32)
    dif[3, 0] = 0.0  # Pe undefined at the last point of line 0
    lines = lg.Pathlines(pos, n_points, spd, dif, spd, np.arange(4.0), pos[0].astype(float),
                         np.zeros(3, np.int8))
    kept, drop = lg.cleanup(lines, 3, 3.0)
    assert kept.n == 1 and drop == {"dropped_few_points": 1, "dropped_short": 1, "kept": 1}
    mask = np.ones((6, 7, 3), bool)
    m = lg.point_maps(kept, mask)
    np.testing.assert_allclose([m["speed"][i, 1, 1] for i in range(1, 5)], [1, 2, 3, 4])
    np.testing.assert_allclose([m["peclet"][i, 1, 1] for i in range(1, 4)], [0.5, 1.0, 1.5])
    assert m["peclet"][4, 1, 1] == 0 and not m["has_pe"][4, 1, 1] and m["has_speed"][4, 1, 1]
    # ratio of sums: 4 / 0 is undefined too; elsewhere speed / diffusive speed
    assert m["peclet_ratio"][2, 1, 1] == pytest.approx(1.0) and not m["has_pe_ratio"][4, 1, 1]
    assert m["count"].sum() == 4 and m["speed"][0].sum() == 0
    # two points in one voxel: mean of Pe values differs from the ratio of sums
    pos2 = np.array([[[1, 1, 1]], [[1.2, 1, 1]]], np.float32)
    l2 = lg.Pathlines(pos2, np.array([2]), np.array([[1.0], [3.0]], np.float32),
                      np.array([[1.0], [1.0 / 3]], np.float32), np.ones((2, 1), np.float32),
                      np.arange(2.0), pos2[0].astype(float), np.zeros(1, np.int8))
    m2 = lg.point_maps(l2, mask)
    assert m2["peclet"][1, 1, 1] == pytest.approx(5.0)  # (1 + 9) / 2
    assert m2["peclet_ratio"][1, 1, 1] == pytest.approx(3.0)  # 4 / (4/3)
    assert m2["speed"][1, 1, 1] == pytest.approx(2.0)


# ----------------------------------------------------------------- files and the driver


def make_run(tmp_path, *, vel=(0.6, 0.3, 0.0), sigma=0.0, n_loops=2, nt=8, dt=0.5, s0=2.5,
             shape=(26, 18, 12), affine=None, summary=True):
    """A synthetic rOMT run directory (subject + results.h5 + summary.json) of a moving Gaussian."""
    from glymphmpi.io import atomic_write_json
    from glymphmpi.store import RunDir
    from glymphmpi.subject import write_subject

    affine = np.diag([0.5, 0.8, 1.25, 1.0]) if affine is None else affine
    affine = np.array(affine, dtype=np.float64)
    affine[:3, 3] = [-3.0, 4.0, 10.0]
    c0 = (7.0, 7.0, 6.0)
    T = nt * dt
    times_h = np.arange(n_loops + 1) * 3.0  # 3 h per loop
    loops = []
    for li in range(n_loops):
        v, rho = gaussian_loop(shape, nt, dt, vel, sigma, s0, c0, t0=li * T)
        loops.append((v, rho))
    mask = np.ones(shape, bool)
    mask[:, :, 0] = False
    scans = [loops[0][1][0]] + [lp[1][-1] for lp in loops]
    subj_dir = tmp_path / "subject"
    subject_toml = write_subject(subj_dir, "synth-01", times_h, scans, mask, affine)
    rd = RunDir(tmp_path / "run").prepare()
    post.write_romt_results(rd.results, nt=nt, dt=dt, sigma=sigma, mask=mask, affine=affine,
                            times_h=times_h, loops=loops, attrs={"subject": "synth-01"})
    if summary:
        atomic_write_json(rd.summary, {"status": "complete", "method": "romt", "subject": "synth-01",
                                       "subject_path": str(subject_toml), "runtime_s": 1.0})
    rd.release()  # the run is over: give OUT's lock back
    return rd, subject_toml, {"vel": np.array(vel), "T": T, "times_h": times_h, "affine": affine,
                               "mask": mask, "c0": c0}


def test_postprocess_translation_end_to_end(tmp_path):
    import nibabel as nib

    from glymphmpi.io import vtk
    from glymphmpi.subject import load_subject

    rd, toml, truth = make_run(tmp_path)
    subject = load_subject(toml)
    cfg = RomtPostConfig(seed_max_fraction=0.5, figure_max_lines=300)
    fields = post.postprocess(rd, subject, cfg)
    from glymphmpi.report.romt_figures import figures

    figures(rd, subject, cfg, fields)  # the registry's hook, from the files just written
    vox = np.array([0.5, 0.8, 1.25])
    hpm = 3.0 / truth["T"]
    speed = np.linalg.norm(truth["vel"] * vox) / hpm  # mm/h
    d = fields["romt_post"]
    assert fields["n_pathlines"] == d["n_seeds"] > 20
    assert fields["median_speed_mm_per_h"] == pytest.approx(speed, rel=1e-5)
    assert fields["median_peclet"] is None and fields["fraction_pe_gt_1"] is None  # sigma = 0
    # every pathline moves 2 loops x T x v: flux length in world mm
    assert d["median_flux_length_mm"] == pytest.approx(2 * truth["T"] * speed * hpm, rel=1e-5)
    assert d["median_pathline_length_mm"] == pytest.approx(d["median_flux_length_mm"], rel=1e-5)
    # NIfTI maps on the subject's grid and affine
    img = nib.load(rd.maps / "speed.nii.gz")
    np.testing.assert_allclose(img.affine, truth["affine"])
    sm = np.asarray(img.dataobj)
    assert sm.shape == subject.shape
    np.testing.assert_allclose(sm[sm > 0], speed, rtol=1e-5)
    assert (sm > 0).sum() == d["voxels_with_points"]
    # VTK in world mm: the first point of each line is its seed mapped by the affine
    pl = vtk.read_vtp(rd.vtk / "pathlines.vtp")
    assert pl["n_lines"] == fields["n_pathlines"]
    conn, offs = pl["lines"]
    starts = pl["points"][np.r_[0, offs[:-1]]]
    seeds_ijk = (starts - truth["affine"][:3, 3]) / vox
    np.testing.assert_allclose(seeds_ijk, np.rint(seeds_ijk), atol=1e-4)  # seeds are voxel centres
    np.testing.assert_allclose(pl["point_data"]["speed_mm_per_h"], speed, rtol=1e-5)
    np.testing.assert_allclose(pl["cell_data"]["pathline_length_mm"], 2 * truth["T"] * speed * hpm, rtol=1e-4)
    fv = vtk.read_vtp(rd.vtk / "flux_vectors.vtp")
    np.testing.assert_allclose(fv["point_data"]["displacement_mm"],
                               np.tile(2 * truth["T"] * truth["vel"] * vox, (fv["n_points"], 1)), atol=1e-4)
    # figures: non-empty PNGs
    for name in ("speed_map", "peclet_map", "pathlines_speed", "pathlines_peclet", "flux_vectors_speed",
                 "flux_vectors_peclet"):
        p = rd.figures / f"{name}.png"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert set(d["outputs"]) >= {"maps/speed.nii.gz", "maps/peclet.nii.gz", "maps/peclet_ratio.nii.gz",
                                 "vtk/pathlines.vtp", "vtk/flux_vectors.vtp", "figures/speed_map.png"}
    json.dumps(fields)  # serialisable into summary.json


def test_postprocess_diffusion_peclet_maps(tmp_path):
    """Advection plus diffusion of a Gaussian: Pe along lines = |v| / (sigma |x - c| / s^2)."""
    from glymphmpi.subject import load_subject

    rd, toml, truth = make_run(tmp_path, vel=(0.3, 0.0, 0.0), sigma=0.6, n_loops=1, nt=10, dt=0.4,
                               affine=np.eye(4))
    subject = load_subject(toml)
    cfg = RomtPostConfig(seed_max_fraction=0.3, min_distance_voxels=0.5, write_figures=False,
                         write_vtk=False, log_density_floor=1e-8)
    fields = post.postprocess(rd, subject, cfg)
    assert fields["n_pathlines"] > 50
    res = post.RomtResults(rd.results)
    lines, _ = post.trace_results(res, cfg)
    # along every line: Pe = |v| / (sigma |x - c(t)| / s(t)^2) at the nodes (exact field)
    t = (lines.times_h / 3.0) * truth["T"]  # model time of the nodes
    c = np.asarray(truth["c0"])[None, None] + t[:, None, None] * truth["vel"][None, None]
    s2 = 2.5 ** 2 + 2 * 0.6 * t
    dist = np.linalg.norm(lines.positions - c, axis=2)
    with np.errstate(divide="ignore"):
        expect = np.linalg.norm(truth["vel"]) / (0.6 * dist / s2[:, None])
    valid = lines.valid() & (dist > 0.5)
    np.testing.assert_allclose(lines.peclet[valid], expect[valid], rtol=2e-3)
    assert 0 < fields["fraction_pe_gt_1"] < 1
    assert fields["romt_post"]["median_peclet_ratio"] > 0


def test_bad_results_are_input_errors(tmp_path):
    from glymphmpi.errors import InputError

    with pytest.raises(InputError, match="results file not found"):
        post.RomtResults(tmp_path / "nope.h5")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5"):
        post.RomtResults(tmp_path / "bad.h5")
    shape = (4, 4, 4)
    v = np.zeros((2, 3) + shape, np.float32)
    post.write_romt_results(tmp_path / "r.h5", nt=3, dt=0.5, sigma=0.0, mask=np.ones(shape, bool),
                            affine=np.eye(4), times_h=[0, 1], loops=[(v, np.ones((3,) + shape))])
    with pytest.raises(InputError, match="velocity has shape"):
        post.RomtResults(tmp_path / "r.h5")


def test_config_validation():
    from glymphmpi.errors import InputError
    from glymphmpi.methods import load_config

    cfg = load_config("romt_post", None, ["romt_post.integrator=rk4", "romt_post.seed_every=2"])
    assert cfg.integrator == "rk4" and cfg.seed_every == 2
    with pytest.raises(InputError, match="valid: euler, rk2, rk4"):
        load_config("romt_post", None, ["romt_post.integrator=rk9"])
    with pytest.raises(InputError, match="seed_max_fraction"):
        load_config("romt_post", None, ["romt_post.seed_max_fraction=1.5"])


def test_vtk_roundtrip_and_checks(tmp_path):
    from glymphmpi.io import vtk

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(7, 3))
    conn, offs = vtk.lines_from_lengths([3, 4])
    pd = {"s": rng.normal(size=7).astype(np.float32), "vec": rng.normal(size=(7, 3))}
    cd = {"id": np.array([5, 9], np.int64)}
    vtk.write_vtp(tmp_path / "l.vtp", pts, lines=(conn, offs), point_data=pd, cell_data=cd)
    back = vtk.read_vtp(tmp_path / "l.vtp")
    np.testing.assert_allclose(back["points"], pts.astype(np.float32))
    np.testing.assert_array_equal(back["lines"][0], conn)
    np.testing.assert_array_equal(back["lines"][1], [3, 7])
    np.testing.assert_array_equal(back["point_data"]["s"], pd["s"])
    np.testing.assert_array_equal(back["point_data"]["vec"], pd["vec"])
    np.testing.assert_array_equal(back["cell_data"]["id"], cd["id"])
    # byte layout: each appended block is an 8-byte little-endian count followed by the data
    raw = (tmp_path / "l.vtp").read_bytes()
    blob = raw[raw.index(b"_", raw.index(b"<AppendedData")) + 1:]
    assert int(np.frombuffer(blob[:8], "<u8")[0]) == 7 * 4  # the first array: 's', 7 float32
    vtk.write_vtp(tmp_path / "v.vtp", pts, verts=True, point_data={"a": np.arange(7)})
    back = vtk.read_vtp(tmp_path / "v.vtp")
    assert back["n_verts"] == 7 and back["lines"] is None
    np.testing.assert_array_equal(back["verts"][1], np.arange(1, 8))
    with pytest.raises(ValueError, match="point data 'a': 6 values"):
        vtk.write_vtp(tmp_path / "x.vtp", pts, verts=True, point_data={"a": np.arange(6)})
    with pytest.raises(ValueError, match="missing points"):
        vtk.write_vtp(tmp_path / "x.vtp", pts, lines=(np.array([0, 9]), np.array([2])))


def test_vtk_files_read_by_vtk_itself(tmp_path):
    """When the VTK library is installed, its own XML reader must read our files."""
    pytest.importorskip("vtkmodules.vtkIOXML")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    from glymphmpi.io import vtk

    pts = np.arange(21.0).reshape(7, 3)
    vtk.write_vtp(tmp_path / "l.vtp", pts, lines=vtk.lines_from_lengths([3, 4]),
                  point_data={"s": np.arange(7.0)}, cell_data={"id": np.array([1, 2])})
    r = vtkXMLPolyDataReader()
    r.SetFileName(str(tmp_path / "l.vtp"))
    r.Update()
    out = r.GetOutput()
    assert out.GetNumberOfLines() == 2
    np.testing.assert_allclose(vtk_to_numpy(out.GetPoints().GetData()), pts)
    np.testing.assert_allclose(vtk_to_numpy(out.GetPointData().GetArray("s")), np.arange(7.0))


def test_smoothing_keeps_constant_maps_and_spreads_into_gaps():
    """Normalised-convolution smoothing: a constant speed stays exactly constant (no dilution at
    the mask border or in voxels without points), and an isolated empty voxel gets the value."""
    shape = (12, 12, 12)
    mask = np.zeros(shape, bool)
    mask[2:10, 2:10, 2:10] = True
    pts = np.argwhere(mask).astype(np.float32)
    pts = pts[~np.all(pts == 5, axis=1)]  # leave voxel (5, 5, 5) without points
    n = pts.shape[0]
    lines = lg.Pathlines(pts[None], np.ones(n, np.int64), np.full((1, n), 2.5, np.float32),
                         np.full((1, n), 0.5, np.float32), np.ones((1, n), np.float32), np.zeros(1),
                         pts.astype(float), np.zeros(n, np.int8))
    raw = lg.point_maps(lines, mask)
    assert raw["speed"][5, 5, 5] == 0 and not raw["has_speed"][5, 5, 5]
    sm = lg.point_maps(lines, mask, smooth_sigma_voxels=1.0)
    np.testing.assert_allclose(sm["speed"][mask], 2.5, rtol=1e-6)
    np.testing.assert_allclose(sm["peclet"][mask], 5.0, rtol=1e-6)
    assert np.all(sm["speed"][~mask] == 0)


def test_background_prefers_anatomy(tmp_path):
    from glymphmpi.report.romt_figures import background_image
    from glymphmpi.subject import load_subject, write_subject

    shape = (6, 5, 4)
    scans = [np.ones(shape), 2 * np.ones(shape)]
    anat = np.arange(np.prod(shape), dtype=float).reshape(shape)
    s1 = load_subject(write_subject(tmp_path / "a", "a", [0, 1], scans, np.ones(shape), np.eye(4), anatomy=anat))
    np.testing.assert_allclose(background_image(s1), anat)
    s2 = load_subject(write_subject(tmp_path / "b", "b", [0, 1], scans, np.ones(shape), np.eye(4)))
    np.testing.assert_allclose(background_image(s2), 1.0)


def test_projection_views_match_a_viewer_on_that_side(tmp_path):
    """figure_view: a viewer on the +a (-a) side looks along -a (+a) with z up (y up for z views); the
    figure's horizontal axis is the viewer's right-hand direction right = look x up (reversed when it
    points along -e_h). The 2D pathline figure is drawn from pieces and a context."""
    from glymphmpi.report.romt_figures import VIEWS, pathlines_2d

    e = np.eye(3)
    for view, (h, v, flip) in VIEWS.items():
        a = "xyz".index(view[1])
        look = -e[a] if view[0] == "+" else e[a]
        up = e[2] if a != 2 else e[1]
        right = np.cross(look, up)
        assert v == int(np.argmax(np.abs(up))) and h == int(np.argmax(np.abs(right)))
        assert flip == (right[h] < 0), view
    pieces = [np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 3.0, 5.0]]),
              np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]])]
    out = pathlines_2d(tmp_path / "p.png", pieces, np.array([1.0, 2.0]), "t", "speed", "speed", "-x",
                       context=np.zeros((4, 3)), dpi=40)
    from pathlib import Path

    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(Exception, match="figure_view"):
        from glymphmpi.methods import load_config

        load_config("romt", None, ["romt.post.figure_view=sideways"])
