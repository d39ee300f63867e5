"""The cohort launcher against a real SLURM (hpc/slurm/up.sh): ``pytest -m slurm``.

``make test-slurm`` brings the local single-node SLURM up, runs these and always takes it
down. Without a controller they are skipped, unless GLYMPH_REQUIRE_SLURM=1 (the make
target sets it), which turns a missing SLURM into a failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cohort import glymph_cli, toy_ref, write_cohort  # noqa: E402

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
FAST = "[cohort]\ninterface = \"lo\"\npoll_s = 0.5\n[resources]\ntime = \"00:10:00\"\n"


@pytest.fixture(scope="module", autouse=True)
def slurm():
    from glymphmpi.cohort.sbatch import available

    if not available():
        if os.environ.get("GLYMPH_REQUIRE_SLURM") == "1":
            pytest.fail("no SLURM controller answers; hpc/slurm/up.sh did not bring it up")
        pytest.skip("no SLURM controller (hpc/slurm/up.sh starts a local one)")
    yield
    subprocess.run(["scancel", "--name=glymph-toy"], capture_output=True)


def start_run(c, out):
    return subprocess.Popen([sys.executable, "-m", "glymphmpi", "cohort", "run", str(c), "--out", str(out),
                             "--scheduler", "slurm"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def job_state(job: str) -> dict:
    from glymphmpi.cohort.sbatch import JobTable

    return JobTable.query().get(job) or {}


def wait_for(pred, timeout=60.0, dt=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(dt)
    raise AssertionError("timed out waiting")


def task_rec(out, key):
    p = Path(out) / "cohort" / "state.json"
    try:
        return json.loads(p.read_text())["tasks"].get(key, {})
    except (OSError, json.JSONDecodeError):
        return {}


def test_one_subject_through_fem_on_two_ranks(tmp_path):
    """A real method (FEM, 2 MPI ranks via srun --mpi=pmix) on one small subject through SLURM
    gives the same D as the same run done locally on one rank (parallel round-off only)."""
    from glymphmpi.cohort.methods import default_methods
    from glymphmpi.synth import brain_diffusion as bd

    if "fem" not in default_methods():
        pytest.skip("fem is not in this checkout")
    subj = bd.write(tmp_path / "ph", bd.PhantomSpec(block=(10, 10, 10), dt_h=0.2), sid="ph10")
    c = tmp_path / "cohort.toml"
    settings = "[settings.fem]\nmax_iterations = 6\nvtk_every = 100\nregularization = \"fixed\"\n"
    c.write_text(f'subjects = ["{subj}"]\nmethods = ["fem"]\n{FAST}[resources.fem]\nranks = 2\n{settings}')
    out = tmp_path / "out"
    r = glymph_cli("cohort", "run", c, "--out", out, "--scheduler", "slurm", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "ph10" / "fem" / "summary.json").read_text())
    assert s["status"] == "complete" and s["mpi_ranks"] == 2
    rec = task_rec(out, "ph10/fem")
    assert rec["scheduler"] == "slurm" and rec["job"].isdigit()
    log = (out / "cohort" / "logs" / f"ph10.fem.{rec['job']}.log").read_text()
    assert "[glymph] start" in log and "rc 0" in log
    # the subject report ran on a dask-jobqueue worker, itself a SLURM job
    assert json.loads((out / "ph10" / "report" / "summary.json").read_text())["fem.status"] == "complete"
    assert any((out / "cohort" / "dask").glob("*.err"))
    # the same settings on one local rank
    c2 = tmp_path / "local.toml"
    c2.write_text(c.read_text().replace("ranks = 2", "ranks = 1"))
    r = glymph_cli("cohort", "run", c2, "--out", tmp_path / "local", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    s1 = json.loads((tmp_path / "local" / "ph10" / "fem" / "summary.json").read_text())
    assert s1["mpi_ranks"] == 1
    assert s["D_mm2_per_h"] == pytest.approx(s1["D_mm2_per_h"], rel=1e-6)
    assert "<th>fem D</th>" in (out / "report" / "index.html").read_text()


def test_job_array_three_subjects_launcher_as_a_job_and_noop_rerun(tmp_path, small_phantom):
    """The launcher itself submitted as jobs/cohort.sbatch (as users do) puts the three
    subjects into one job array; a second launch finds nothing to do."""
    c = write_cohort(tmp_path, small_phantom, body=FAST, toy_args=("--steps", "5", "--step-s", "0.01"))
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("glymph")
    log = tmp_path / "cohort-job.log"
    jid = subprocess.run(["sbatch", "--parsable", f"--output={log}",
                          f"--export=ALL,COHORT={c},OUTDIR={out},GLYMPH={cli}", str(ROOT / "jobs" / "cohort.sbatch")],
                         capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: job_state(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout=240, dt=1.0)
    text = log.read_text()
    assert job_state(jid)["JobState"] == "COMPLETED", text
    assert "toy: submitted array" in text and "[0-2]" in text and "rc 0" in text
    jobs = [task_rec(out, f"{s}/toy")["job"] for s in ("sub-01", "sub-02", "sub-03")]
    aid = jobs[0].split("_")[0]
    assert jobs == [f"{aid}_0", f"{aid}_1", f"{aid}_2"]  # one array, one task per subject
    for sid in ("sub-01", "sub-02", "sub-03"):
        s = json.loads((out / sid / "toy" / "summary.json").read_text())
        assert s["value"] == toy_ref(small_phantom, sid, 5)
        assert (out / sid / "report" / "summary.json").exists()
    r = glymph_cli("cohort", "run", c, "--out", out, "--scheduler", "slurm")
    assert r.returncode == 0 and "nothing to do: all 3 runs" in r.stdout and "submitted" not in r.stdout


def test_cancelled_job_is_reported_failed(tmp_path, small_phantom):
    c = write_cohort(tmp_path, small_phantom, ids=("c1",), body=FAST, toy_args=("--steps", "300", "--step-s", "0.1"))
    out = tmp_path / "out"
    p = start_run(c, out)
    job = wait_for(lambda: task_rec(out, "c1/toy").get("job"))
    wait_for(lambda: job_state(job).get("JobState") == "RUNNING", timeout=60)
    time.sleep(1.5)
    subprocess.run(["scancel", job], check=True)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 1, text
    assert f"c1/toy: failed (SLURM job {job} cancelled)" in text
    st = json.loads(glymph_cli("cohort", "status", c, "--out", out, "--json").stdout)["runs"]["c1"]["toy"]
    assert st["state"] == "failed" and "cancelled" in st["reason"] and st["job"] == job
    assert "failed" in (out / "report" / "cohort.csv").read_text()


def test_requeued_jobs_resume_to_the_uninterrupted_result(tmp_path, small_phantom):
    """Stop running jobs at random moments, several times, in both ways SLURM does it:
    SIGTERM to the job step (time limit / preemption signal: checkpoint, exit 75, the job
    requeues itself) and ``scontrol requeue`` (hard requeue). The resumed runs end with
    bit-for-bit the values of uninterrupted ones."""
    steps = 80  # 8 s per run: several kills land while it runs
    c = write_cohort(tmp_path, small_phantom, ids=("r1", "r2"), body=FAST,
                     toy_args=("--steps", str(steps), "--step-s", "0.1"))
    out = tmp_path / "out"
    p = start_run(c, out)
    rnd = random.Random(11)
    kills = []
    for i in range(3):
        sid = rnd.choice(("r1", "r2"))
        job = wait_for(lambda sid=sid: task_rec(out, f"{sid}/toy").get("job"))
        try:
            wait_for(lambda job=job: job_state(job).get("JobState") == "RUNNING", timeout=60)
        except AssertionError:
            continue
        time.sleep(rnd.uniform(1.5, 3.0))  # startup ~1 s, then 0.1 s per step
        if job_state(job).get("JobState") != "RUNNING":
            continue
        how = ("signal", "requeue")[i % 2]
        if how == "signal":
            subprocess.run(["scancel", "--signal=TERM", job], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job], check=True)
        kills.append((sid, how))
    text = p.communicate(timeout=240)[0]
    assert p.returncode == 0, text
    assert len(kills) >= 2, text
    assert "requeued (restart" in text
    resumed = {}
    for sid in ("r1", "r2"):
        s = json.loads((out / sid / "toy" / "summary.json").read_text())
        assert s["value"] == toy_ref(small_phantom, sid, steps)
        resumed[sid] = s["resumed_from"]
        rec = task_rec(out, f"{sid}/toy")
        assert rec["state"] == "complete"
    killed = {sid for sid, how in kills if how == "signal"}
    assert all(resumed[s] > 0 for s in killed)  # a SIGTERM'd run always resumed from its checkpoint


def test_hostile_paths_through_real_sbatch(tmp_path, small_phantom):
    """A --out with a space and '%' and subject folders with a tab and a newline: sbatch reads the
    quoted #SBATCH --output (logs land in that folder), the NUL task files give every subject its
    exact path, and the dask-jobqueue report workers' logs are quoted too."""
    c = write_cohort(tmp_path, small_phantom, ids=("s1", "s2"), body=FAST,
                     toy_args=("--steps", "3", "--step-s", "0.01"))
    for sid, name in (("s1", "t\tab"), ("s2", "n\new")):
        (tmp_path / "subjects" / sid).rename(tmp_path / "subjects" / name)
    out = tmp_path / "o ut %x"
    r = glymph_cli("cohort", "run", c, "--out", out, "--scheduler", "slurm", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cohort: 2 complete" in r.stdout
    logs = sorted(p.name for p in (out / "cohort" / "logs").iterdir())
    assert len(logs) == 2 and all(re.fullmatch(r"toy\.\d+_[01]\.log", n) for n in logs)
    for sid in ("s1", "s2"):
        s = json.loads((out / sid / "toy" / "summary.json").read_text())
        assert s["value"] == toy_ref(small_phantom, sid, 3)
        assert (out / sid / "report" / "summary.json").exists()
    assert any(p.suffix == ".err" for p in (out / "cohort" / "dask").iterdir())
