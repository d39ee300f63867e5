"""A run directory belongs to one run (issue 17 sections 1 and 6): run identity, lock, output-directory errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from glymphmpi.errors import InputError
from glymphmpi.store import Checkpointer, RunDir, lock_dir, run_identity


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    alpha: float = 1e-6
    beta: float = 0.1
    max_iterations: int = 50  # run-only: an iteration cap may be raised on resume
    checkpoint_every: int = 1  # run-only
    quiet: bool = False


def subject(seed: int, sid: str = "sub-01"):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(id=sid, scans=rng.random((2, 5, 6, 7)), mask=np.ones((5, 6, 7), bool),
                           times_h=np.array([0.0, 3.0]), affine=np.diag([1.5, 1.5, 2.0, 1.0]))


def unfinished_run(out, ident) -> RunDir:
    """A run that saved a checkpoint and was stopped (preempted), its lock given back."""
    rd = RunDir(out).prepare(identity=ident)
    rd.checkpointer().save({"x": np.arange(3.0)}, 4)
    rd.write_failure(ident["method"], ident["subject_id"], "stopped by a signal", 75)
    rd.release()
    return rd


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 2
    return msg


def test_identity_content_not_names():
    a, b = subject(1), subject(1, sid="renamed")
    ia, ib = run_identity("fem", a, ToyConfig()), run_identity("fem", b, ToyConfig())
    assert ia["subject_sha256"] == ib["subject_sha256"] and len(ia["subject_sha256"]) == 16
    assert run_identity("fem", subject(2), ToyConfig())["subject_sha256"] != ia["subject_sha256"]
    assert run_identity("fem", a, ToyConfig(checkpoint_every=7)) == ia  # run-only setting
    assert run_identity("fem", a, ToyConfig(alpha=1e-3))["settings"]["alpha"] == 1e-3
    assert run_identity("fem", a, ToyConfig(max_iterations=90)) == ia
    assert set(ia["settings"]) == {"alpha", "beta"} and ia["method"] == "fem"
    json.dumps(ia)  # JSON-able


def test_other_subject_same_grid_is_refused(tmp_path):
    out = tmp_path / "out"
    rd = unfinished_run(out, run_identity("fem", subject(1), ToyConfig()))
    other = run_identity("fem", subject(2, sid="sub-02"), ToyConfig())  # same grid, other scans
    with pytest.raises(InputError) as err:
        RunDir(out).prepare(identity=other)
    msg = one_line(err)
    assert msg.startswith(str(out)) and "subject data" in msg and "'sub-02'" in msg and "--fresh" in msg
    assert rd.checkpoint.exists()  # nothing removed, nothing resumed
    # the same run resumes: its checkpoint is kept and loads
    same = RunDir(out).prepare(identity=run_identity("fem", subject(1), ToyConfig(checkpoint_every=5)))
    state, it = same.checkpointer().load()
    assert it == 4 and np.array_equal(state["x"], np.arange(3.0))
    same.release()
    # --fresh starts over
    RunDir(out, fresh=True).prepare(identity=other).release()
    assert not rd.checkpoint.exists() and json.loads((out / "identity.json").read_text()) == other


def test_changed_setting_is_refused_naming_it(tmp_path):
    out = tmp_path / "out"
    unfinished_run(out, run_identity("fem", subject(1), ToyConfig()))
    with pytest.raises(InputError) as err:
        RunDir(out).prepare(identity=run_identity("fem", subject(1), ToyConfig(alpha=0.01)))
    msg = one_line(err)
    assert "fem.alpha 1e-06 != 0.01" in msg and "subject" not in msg.split(":", 1)[1].split(";")[0]
    with pytest.raises(InputError, match="method 'fem' != 'romt'"):
        RunDir(out).prepare(identity=run_identity("romt", subject(1), ToyConfig()))


def test_failed_run_without_state_may_change_settings(tmp_path):
    """Nothing to resume (no checkpoint): a new identity simply replaces the old one."""
    out = tmp_path / "out"
    rd = RunDir(out).prepare(identity=run_identity("fem", subject(1), ToyConfig()))
    rd.write_failure("fem", "sub-01", "fem.alpha: must be finite", 2)
    rd.release()
    new = run_identity("fem", subject(1), ToyConfig(alpha=0.5))
    RunDir(out).prepare(identity=new).release()
    assert json.loads((out / "identity.json").read_text()) == new


def test_state_without_identity_and_foreign_checkpoint_refused(tmp_path):
    ident = run_identity("fem", subject(1), ToyConfig())
    old = tmp_path / "old"  # unfinished output of a version without run identities
    old.mkdir()
    Checkpointer(old / "checkpoint.h5").save({"x": 1}, 2)
    with pytest.raises(InputError, match=r"of a different configuration or version \(no run identity recorded\)"):
        RunDir(old).prepare(identity=ident)
    # a checkpoint copied in from another run's directory is refused by the checkpointer itself
    out = tmp_path / "out"
    unfinished_run(tmp_path / "elsewhere", run_identity("fem", subject(2), ToyConfig()))
    rd = RunDir(out).prepare(identity=ident)
    shutil.copy(tmp_path / "elsewhere" / "checkpoint.h5", rd.checkpoint)
    with pytest.raises(InputError) as err:
        rd.checkpointer().load()
    assert one_line(err).startswith(str(rd.checkpoint)) and "checkpoint of another run: subject data" in str(err.value)
    rd.release()


def test_identity_in_summary_results_and_checkpoint(tmp_path):
    from glymphmpi.io import read_h5_attrs

    ident = run_identity("fem", subject(1), ToyConfig())
    rd = RunDir(tmp_path / "o").prepare(identity=ident)
    rd.checkpointer().save({"x": 1}, 1)
    assert json.loads(read_h5_attrs(rd.checkpoint)["identity"]) == ident
    rd.write_results({"v": np.zeros(2)})
    assert json.loads(read_h5_attrs(rd.results)["identity"]) == ident
    assert rd.write_summary("fem", "sub-01", {"D": 0.5})["identity"] == ident
    assert json.loads(rd.summary.read_text())["identity"] == ident
    rd.release()


# ------------------------------------------------------------------ lock
HOLDER = textwrap.dedent("""
    import sys, time
    from glymphmpi.store import RunDir
    rd = RunDir(sys.argv[1]).prepare()
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    rd.release()
""")


def test_second_run_on_same_out_is_busy_and_stale_lock_taken_over(tmp_path, caplog):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(InputError) as err:
            RunDir(out).prepare()
        msg = one_line(err)
        assert f"busy: another run holds .glymph.lock (pid {proc.pid} on {socket.gethostname()}" in msg
        with pytest.raises(InputError, match="busy"):
            lock_dir(out, "cohort")
    finally:
        proc.kill()  # SIGKILL: the holder cannot clean up, its lock file stays
        proc.wait()
    assert (out / ".glymph.lock").exists()
    with caplog.at_level("WARNING"):
        rd = RunDir(out).prepare()
    assert f"stale lock (pid {proc.pid} on {socket.gethostname()} is gone)" in caplog.text
    assert json.loads((out / ".glymph.lock").read_text())["pid"] == os.getpid()
    rd.release()
    assert not (out / ".glymph.lock").exists()


def test_lock_released_normally_and_other_host_busy(tmp_path):
    out = tmp_path / "c"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    r = subprocess.run([sys.executable, str(script), str(out), "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not (out / ".glymph.lock").exists()
    with lock_dir(out, "cohort") as lk:
        assert json.loads(lk.path.read_text())["what"] == "cohort"
    assert not (out / ".glymph.lock").exists()
    # a lock held on another host cannot be checked from here: busy, naming the host
    (out / ".glymph.lock").write_text(json.dumps({"pid": 1, "host": "node-77", "started": "2026-01-01T00:00:00",
                                                   "what": "cohort"}))
    with pytest.raises(InputError, match=r"busy: another cohort holds .glymph.lock \(pid 1 on node-77"):
        lock_dir(out, "run")
    # a pid reused by an unrelated live process (other start time) is a dead holder
    (out / ".glymph.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "proc_start": "-1"}))
    lock_dir(out).release()


@pytest.mark.mpi
def test_lock_and_identity_collective(comm, mpi_tmp_path):
    """Rank 0 takes the lock for all ranks; refusals reach every rank (serial and mpirun -n 2)."""
    out = mpi_tmp_path / "out"
    ident = run_identity("fem", subject(1), ToyConfig())
    rd = RunDir(out, comm=comm).prepare(identity=ident)
    holder = json.loads((out / ".glymph.lock").read_text()) if comm.rank == 0 else None
    holder = comm.bcast(holder, root=0)
    assert holder["pid"] == comm.bcast(os.getpid(), root=0)
    rd.checkpointer().save({"x": np.ones(2)}, 3)
    rd.write_failure("fem", "sub-01", "stopped", 75)
    rd.release()
    comm.Barrier()
    assert not (out / ".glymph.lock").exists()
    with pytest.raises(InputError, match="fem.alpha"):
        RunDir(out, comm=comm).prepare(identity=run_identity("fem", subject(1), ToyConfig(alpha=2.0)))
    comm.Barrier()
    assert not (out / ".glymph.lock").exists()  # released after the refusal
    rd = RunDir(out, comm=comm).prepare(identity=ident)
    assert rd.checkpointer().load()[1] == 3
    rd.release()


# ------------------------------------------------------------------ output directory errors
def test_out_under_a_file_is_one_line(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError) as err:
        RunDir(f / "out").prepare()
    assert one_line(err) == f"{f / 'out'}: cannot create it: {f} is a file, not a directory"
    with pytest.raises(InputError, match="exists and is not a directory"):
        RunDir(f).prepare()
    with pytest.raises(InputError, match="is a file, not a directory"):
        lock_dir(f / "cohort")


def test_full_disk_when_writing_results_is_one_line_and_not_complete(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing results.h5 (simulated): one line, exit 2, old state kept, no temp files."""
    import errno

    import glymphmpi.io.h5 as h5

    rd = RunDir(tmp_path / "o").prepare(identity=run_identity("fem", subject(1), ToyConfig()))

    def full(tmp, fill, nbytes):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5, "create_h5", full)
    with pytest.raises(InputError) as err:
        rd.write_results({"v": np.zeros(4)})
    assert one_line(err) == f"{rd.results}: cannot write this file (No space left on device)"
    assert not rd.results.exists() and not rd.is_complete()
    assert not [p for p in rd.root.iterdir() if ".tmp-" in p.name]
    rd.release()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


FILL_DISK = textwrap.dedent("""
    import sys, numpy as np
    from glymphmpi.errors import InputError
    from glymphmpi.store import RunDir
    rd = RunDir(sys.argv[1]).prepare()
    big = np.random.default_rng(0).random(100_000)  # 800 kB of incompressible data
    for what, call in (("results", lambda: rd.write_results({"v": big})),
                       ("checkpoint", lambda: rd.checkpointer().save({"v": big}, 1)),
                       ("summary", lambda: rd.write_summary("toy", "s", {"blob": "x" * 400_000}))):
        try:
            call()
            print(what, "written")
        except InputError as exc:
            print(exc)
    rd.write_failure("toy", "s", "disk full", 2)
    rd.release()
""")


def test_full_disk_real_tmpfs(tiny_fs, tmp_path):
    """On a really full file system: one line per write, no crash (HDF5 used to segfault: exit 139)."""
    script = tmp_path / "fill.py"
    script.write_text(FILL_DISK)
    out = tiny_fs / "out"
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines == [f"{out}/results.h5: cannot write this file (No space left on device)",
                     f"{out}/checkpoint.h5: cannot write the checkpoint (No space left on device)",
                     f"{out}/summary.json: cannot write this file (No space left on device)"], r.stdout
    assert not (out / "results.h5").exists() and not (out / "checkpoint.h5").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    summary = out / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


def test_out_not_writable_as_unprivileged_user(tmp_path):
    """As user nobody: --out in a directory it cannot write is one line (exit 2), no traceback."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as an unprivileged user")
    import tempfile

    base = tempfile.mkdtemp(prefix="glymph-ro-")  # outside pytest's private (0700) tmp dir
    try:
        os.chmod(base, 0o755)
        code = ("import sys\nfrom glymphmpi.errors import InputError\nfrom glymphmpi.store import RunDir, lock_dir\n"
                "for out in sys.argv[1:]:\n    try:\n        RunDir(out).prepare()\n"
                "    except InputError as e:\n        print(e, e.exit_code)\n"
                "try:\n    lock_dir(sys.argv[1], 'cohort')\nexcept InputError as e:\n    print(e)\n")
        r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code, f"{base}/out", base],
                           capture_output=True, text=True, timeout=120, cwd="/")
        if "No module named" in r.stderr:
            pytest.skip("user nobody cannot import glymphmpi here")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert r.stdout.splitlines() == [
            f"{base}/out: cannot use it as the run's output directory (Permission denied) 2",
            f"{base}: cannot use it as the run's output directory (Permission denied) 2",
            f"{base}/out: cannot use it as the cohort's output directory (Permission denied)"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ end to end through `glymph`
ROMT = ["--no-post", "--set", "romt.max_iterations=1", "--set", "romt.pcg_max_iterations=3"]


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    """Two rOMT subjects on the same grid with different scans."""
    from glymphmpi.subject import load_subject, write_subject
    from glymphmpi.synth import gaussian_spheres

    base = tmp_path_factory.mktemp("ident")
    a = gaussian_spheres.write(base / "a", n=10, n_images=3, sid="sub-a")
    s = load_subject(a)
    b = write_subject(base / "b", "sub-b", s.times_h, np.flip(s.scans, axis=1), np.flip(s.mask, axis=0), s.affine)
    return a, b


def _make_unfinished(out):
    """A finished run turned into an unfinished one holding a checkpoint of its own identity."""
    ident = json.loads((out / "identity.json").read_text())
    (out / "summary.json").unlink()
    Checkpointer(out / "checkpoint.h5", identity=ident).save({"x": np.zeros(2)}, 1)
    return ident


def _one_line_error(r) -> str:
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("glymph: error:")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return err[0]


def test_cli_other_subject_or_setting_refused_then_fresh(glymph, two_subjects, tmp_path):
    a, b = two_subjects
    out = tmp_path / "run"
    r = glymph("romt", a, "--out", out, *ROMT)
    assert r.returncode == 0, r.stderr[-3000:]
    ident = _make_unfinished(out)
    assert ident["method"] == "romt" and ident["subject_id"] == "sub-a" and "beta" in ident["settings"]
    msg = _one_line_error(glymph("romt", b, "--out", out, *ROMT))
    assert str(out) in msg and "subject data" in msg and "'sub-b'" in msg and "--fresh" in msg
    msg = _one_line_error(glymph("romt", a, "--out", out, *ROMT, "--set", "romt.beta=77"))
    assert "romt.beta 5000.0 != 77.0" in msg, msg
    assert (out / "checkpoint.h5").exists() and not (out / "summary.json").exists()
    r = glymph("romt", b, "--out", out, "--fresh", *ROMT)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["identity"]["subject_id"] == "sub-b"
    assert not (out / ".glymph.lock").exists()


def test_cli_fem_changed_alpha_refused(glymph, tmp_path):
    pytest.importorskip("dolfinx")
    from test_fem_cli import _tiny_subject

    subj = _tiny_subject(tmp_path / "subj")
    out = tmp_path / "run"
    args = ["--set", "fem.mode=data-boundary", "--set", "fem.dt_h=1.0", "--set", "fem.max_iterations=2"]
    r = glymph("fem", subj, "--out", out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    _make_unfinished(out)
    msg = _one_line_error(glymph("fem", subj, "--out", out, *args, "--set", "fem.alpha=0.01"))
    assert "fem.alpha 1e-06 != 0.01" in msg and "--fresh" in msg, msg


def test_cli_second_run_on_same_out_is_busy(glymph, two_subjects, tmp_path):
    import time

    a, _ = two_subjects
    out = tmp_path / "run"
    # every stop test off (the fused kernels finish a converging run before the second one starts)
    slow = ["--no-post", "--set", "romt.max_iterations=200", "--set", "romt.gn_gtol=0", "--set", "romt.gn_ftol=0",
            "--set", "romt.gn_tol=0"]
    first = subprocess.Popen([sys.executable, "-m", "glymphmpi", "romt", str(a), "--out", str(out), *slow],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / "checkpoint.h5").exists() and time.time() - t0 < 120 and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-3000:]
        msg = _one_line_error(glymph("romt", a, "--out", out, *slow))
        assert f"busy: another run holds .glymph.lock (pid {first.pid} on {socket.gethostname()}" in msg
    finally:
        first.kill()
        first.wait()


def test_cli_refusal_under_mpirun(two_subjects, tmp_path):
    """mpirun -n 2 glymph romt on another subject's unfinished directory: one refusal, exit 2, lock released."""
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun")
    from conftest import run_glymph

    a, b = two_subjects
    out = tmp_path / "run"
    r = run_glymph("romt", a, "--out", out, "--mode", "parallel", *ROMT, mpi=2)
    assert r.returncode == 0, r.stderr[-3000:]
    _make_unfinished(out)
    r = run_glymph("romt", b, "--out", out, "--mode", "parallel", *ROMT, mpi=2)
    assert r.returncode == 2 and "subject data" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (out / ".glymph.lock").exists()


def test_cli_out_errors_and_full_disk(glymph, two_subjects, tiny_fs, tmp_path):
    """`glymph romt` with --out under a file, and with --out on a full disk: one line, exit 2, never complete."""
    a, _ = two_subjects
    f = tmp_path / "file"
    f.write_text("x")
    msg = _one_line_error(glymph("romt", a, "--out", f / "out", *ROMT))
    assert msg == f"glymph: error: {f / 'out'}: cannot create it: {f} is a file, not a directory"
    out = tiny_fs / "out"
    msg = _one_line_error(glymph("romt", a, "--out", out, *ROMT))
    # whichever file fills the disk first (a checkpoint, a finished loop, results.h5) is named in the one line
    assert msg.startswith(f"glymph: error: {out}/") and msg.endswith("(No space left on device)"), msg
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and s["exit_code"] == 2 and "No space left" in s["error"]
    assert not (out / ".glymph.lock").exists()


def test_cli_out_not_writable_as_unprivileged_user(tmp_path):
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as an unprivileged user")
    import tempfile

    from glymphmpi.synth import gaussian_spheres

    base = Path(tempfile.mkdtemp(prefix="glymph-ro-"))
    try:
        os.chmod(base, 0o755)
        subj = gaussian_spheres.write(base / "subj", n=10, n_images=3, sid="g10")
        for p in (base / "subj", *(base / "subj").iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-m", "glymphmpi", "romt", str(subj),
                            "--out", str(base / "out"), *ROMT], capture_output=True, text=True, timeout=300, cwd="/")
        if "No module named" in r.stderr:
            pytest.skip("user nobody cannot import glymphmpi here")
        assert _one_line_error(r) == f"glymph: error: {base / 'out'}: cannot use it as the run's output directory " \
                                     "(Permission denied)"
    finally:
        shutil.rmtree(base, ignore_errors=True)
