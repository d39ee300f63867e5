"""Cohort layer without a scheduler: manifest validation, template rendering, status, report,
and the local launcher end to end (dask LocalCluster) with the toy method of
tests/test_cohort_toymethod.py (fast, checkpoints every step, resumes bit-for-bit)."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glymphmpi.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "test_cohort_toymethod.py"


def write_cohort(tmp: Path, phantom: Path, ids=("sub-01", "sub-02", "sub-03"), body: str = "",
                 toy_args=("--steps", "6", "--step-s", "0.02"), methods='["toy"]') -> Path:
    """Subjects that share the phantom's images (absolute paths) under different ids."""
    src = phantom.read_text()
    for sid in ids:
        d = tmp / "subjects" / sid
        d.mkdir(parents=True, exist_ok=True)
        txt = re.sub(r'(?m)^id = ".*"$', f'id = "{sid}"', src)
        txt = re.sub(r'(path|mask) = "', lambda m: f'{m.group(1)} = "{phantom.parent}/', txt)
        (d / "subject.toml").write_text(txt)
    args = ", ".join(f'"{a}"' for a in toy_args)
    c = tmp / "cohort.toml"
    c.write_text(f'subjects = ["subjects/*/subject.toml"]\nmethods = {methods}\n{body}\n'
                 f'[method.toy]\ncommand = ["{sys.executable}", "{TOY}"]\nargs = [{args}]\n')
    return c


def glymph_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "glymphmpi", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def toy_ref(phantom, sid, steps):
    sys.path.insert(0, str(TOY.parent))
    from test_cohort_toymethod import toy_reference

    from glymphmpi.subject import load_subject

    return toy_reference(load_subject(phantom).mass_per_scan(), sid, steps)


# ------------------------------------------------------------------ manifest
def test_minimal_cohort_file_loads(tmp_path, small_phantom):
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, body='[resources.toy]\nmem = "2G"\ntime = "00:05:00"\n')
    co = load_cohort(c)
    assert [s.id for s in co.subjects] == ["sub-01", "sub-02", "sub-03"]  # glob, sorted
    assert co.method_names == ["toy"]
    r = co.resources["toy"]
    assert (r.mem, r.time, r.processes(co.methods[0])) == ("2G", "00:05:00", 1)
    # the minimal form with built-in methods
    (tmp_path / "min.toml").write_text('subjects = ["subjects/sub-01/subject.toml", "subjects/sub-02/subject.toml"]\n'
                                       'methods = ["romt", "fem", "pinn"]\n')
    from glymphmpi.cohort.methods import default_methods

    if default_methods() == ["romt", "fem", "pinn"]:
        co = load_cohort(tmp_path / "min.toml")
        assert co.method_names == ["romt", "fem", "pinn"]
        assert co.resources["fem"].processes(co.methods[1]) == 2  # fem's default ranks


@pytest.mark.parametrize("body,needle", [
    ('methods = ["nosuch"]', "unknown method 'nosuch'; valid methods:"),
    ('methods = ["toy"]\nfoo = 1', "unknown key(s) foo"),
    ('methods = ["toy"]\n[resources]\ntime = "soon"', "is not a SLURM time"),
    ('methods = ["toy"]\n[resources]\nmem = "lots"', "is not a SLURM size"),
    ('methods = ["toy"]\n[resources.fem]\nranks = 2', "not one of the cohort's methods"),
    ('methods = ["toy"]\n[cohort]\nmax_attempts = 0', "[cohort]: max_attempts: must be >= 1"),
    ('methods = ["toy"]\n[settings.nosuch]\nx = 1', "unknown config table"),
    ('methods = ["toy", "toy"]', "lists a method twice"),
])
def test_bad_cohort_files_are_one_line_input_errors(tmp_path, small_phantom, body, needle):
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, methods='["toy"]')
    text = c.read_text().replace('methods = ["toy"]\n', body + "\n", 1)
    c.write_text(text)
    with pytest.raises(InputError) as ei:
        load_cohort(c)
    assert needle in str(ei.value) and str(c) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_subject_ids_unique_and_safe(tmp_path, small_phantom):
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, ids=("a", "b"))
    t = tmp_path / "subjects" / "b" / "subject.toml"
    t.write_text(t.read_text().replace('id = "b"', 'id = "a"'))
    with pytest.raises(InputError, match="subject id 'a' is used twice"):
        load_cohort(c)
    t.write_text(t.read_text().replace('id = "a"', 'id = ".."'))
    with pytest.raises(InputError, match="not safe"):
        load_cohort(c)
    # the CLI: exit 2, one line, no traceback
    r = glymph_cli("cohort", "run", c, "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not safe" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ templates
def test_rendered_templates(tmp_path, small_phantom):
    """Directives, quoting and environment of rendered job scripts, checked as text (no scheduler)."""
    from glymphmpi.cohort.cli import make_launcher
    from glymphmpi.cohort.jobscript import read_task_file
    from glymphmpi.cohort.manifest import load_cohort

    body = ('[resources.fem]\nranks = 4\ncpus_per_task = 2\nmem = "8G"\ntime = "1-02:00:00"\n'
            'partition = "compute"\naccount = "proj-x"\nqos = "normal"\n'
            '[resources.pinn]\ngpus = 2\nnodes = 2\nimage = "/images/glymph mpi.sif"\npartition = "gpu"\n'
            '[settings.pinn]\nepochs = 50\n')
    c = write_cohort(tmp_path, small_phantom, body=body, methods='["fem", "pinn"]')
    co = load_cohort(c, ["cohort.max_requeues=5"])
    la = make_launcher(co, tmp_path / "my out", "slurm")
    fem = [t for t in la.tasks if t.col == "fem"]
    pinn = [t for t in la.tasks if t.col == "pinn"]
    script, array = la.render_job(fem, "t1")
    text = script.read_text()
    assert array == "0-2"
    for d in ("--job-name=glymph-fem", "--ntasks=4", "--cpus-per-task=2", "--time=1-02:00:00", "--mem=8G",
              "--partition=compute", "--account=proj-x", "--qos=normal", "--array=0-2", "--requeue",
              "--signal=B:USR1@120"):
        assert f"#SBATCH {d}" in text, d
    assert "#SBATCH --ntasks=2\n" not in text  # the template's default block was replaced
    env = dict(re.findall(r"(?m)^export (GLYMPH\w*)=(.*)$", text))
    assert shlex.split(env["GLYMPH_MAX_REQUEUE"]) == ["5"]
    # GLYMPH_ARGS holds shell words (the template evals them): the path with a space survives
    assert shlex.split(shlex.split(env["GLYMPH_ARGS"])[0]) == ["--config", str(tmp_path / "my out" / "cohort"
                                                                            / "config.toml")]
    tasks = Path(shlex.split(env["GLYMPH_TASKS"])[0])
    lines = [read_task_file(tasks / str(i)) for i in range(len(co.subjects))]
    assert lines == [[str(s.toml), str(tmp_path / "my out" / s.id / "fem")] for s in co.subjects]
    assert "srun --mpi=" in text and 'mpirun -n "$ntasks"' in text
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # one subject, GPUs and an image: --gpus-per-node, one task per GPU per node, apptainer --nv
    script, array = la.render_job(pinn[:1], "t2")
    text = script.read_text()
    assert array is None
    for d in ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--partition=gpu",
              "--job-name=glymph-pinn-sub-01"):
        assert f"#SBATCH {d}" in text, d
    exports = dict(re.findall(r"(?m)^export (\w+)=(.*)$", text))
    assert shlex.split(exports["GLYMPH_IMAGE"]) == ["/images/glymph mpi.sif"]  # quoted, space kept
    assert shlex.split(exports["OUTDIR"]) == [str(tmp_path / "my out" / "sub-01" / "pinn")]
    assert "apptainer exec" in text and "--nv" in text and "KIND=torch" in text
    # the sourced exports give back exactly the values (shell quoting round trip)
    out = subprocess.run(["bash", "-c", "\n".join(f"export {k}={v}" for k, v in exports.items())
                          + '\nprintf "%s\\n" "$GLYMPH_IMAGE" "$OUTDIR"'], capture_output=True, text=True)
    assert out.stdout.splitlines() == ["/images/glymph mpi.sif", str(tmp_path / "my out" / "sub-01" / "pinn")]


def test_templates_submit_by_hand_text():
    """The templates are plain sbatch scripts: defaults present, markers once, bash syntax OK."""
    for name in ("romt", "fem", "pinn", "run", "cohort", "bids"):
        p = ROOT / "jobs" / f"{name}.sbatch"
        t = p.read_text()
        assert t.startswith("#!/bin/bash\n")
        assert t.count("# >>> glymph:resources") == 1 and t.count("# <<< glymph:environment") == 1
        assert "#SBATCH --requeue" in t and "#SBATCH --time=" in t
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0
    assert "METHOD=romt" in (ROOT / "jobs/romt.sbatch").read_text()
    assert "KIND=torch" in (ROOT / "jobs/pinn.sbatch").read_text()
    # one body for every method template (the renderer sets METHOD and KIND)
    bodies = {(ROOT / "jobs" / f"{n}.sbatch").read_text().split("# ---- the same body")[1]
              for n in ("run", "romt", "fem", "pinn")}
    assert len(bodies) == 1


def test_template_array_and_requeue_logic_with_fake_slurm(tmp_path):
    """Run the rendered fem body with fake srun/scontrol: the array line picks the subject, and
    exit 75 requeues the job only while SLURM_RESTART_COUNT < GLYMPH_MAX_REQUEUE."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$LOG"\nshift 3\n"$@"\n')
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n[ "$1" = requeue ] && exit 0\n')
    (fake / "sleep").write_text("#!/bin/bash\nexit 0\n")
    (fake / "fakeglymph").write_text('#!/bin/bash\necho "glymph $*" >> "$LOG"\nexit "$RC"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    from glymphmpi.cohort.jobscript import write_task_files

    tasks = write_task_files(tmp_path / "tasks", [["/d/a b/subject.toml", "/o/a"], ["/d/c/subject.toml", "/o/c"]])
    log = tmp_path / "log"
    base = {"PATH": f"{fake}:{os.environ['PATH']}", "LOG": str(log), "GLYMPH": str(fake / "fakeglymph"),
            "GLYMPH_TASKS": str(tasks), "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}
    r = subprocess.run(["bash", str(ROOT / "jobs/fem.sbatch")], env={**base, "RC": "0"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "srun --mpi=pmix --ntasks=2 --kill-on-bad-exit=1 " + str(fake / "fakeglymph") + \
        " --quiet fem /d/c/subject.toml --out /o/c"
    assert not any(ln.startswith("scontrol") for ln in lines)
    log.unlink()
    r = subprocess.run(["bash", str(ROOT / "jobs/fem.sbatch")],
                       env={**base, "RC": "75", "SLURM_ARRAY_TASK_ID": "0", "SLURM_RESTART_COUNT": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 75
    lines = log.read_text().splitlines()
    assert "/d/a b/subject.toml --out /o/a" in lines[0] and "scontrol requeue 77" in lines
    log.unlink()
    r = subprocess.run(["bash", str(ROOT / "jobs/fem.sbatch")],
                       env={**base, "RC": "75", "SLURM_RESTART_COUNT": "3"}, capture_output=True, text=True)
    assert r.returncode == 75 and "scontrol requeue 77" not in log.read_text()  # out of requeues


# ------------------------------------------------------------------ slurm parsing
def test_job_table_lookup():
    from glymphmpi.cohort.sbatch import JobTable, _task_ids, exit_code, parse_show_job

    text = ("JobId=12 ArrayJobId=12 ArrayTaskId=3-5,8%2 JobName=x JobState=PENDING Reason=Resources "
            "Restarts=0 ExitCode=0:0\n"
            "JobId=15 ArrayJobId=12 ArrayTaskId=1 JobState=RUNNING Restarts=2 ExitCode=0:0\n"
            "JobId=16 JobName=y JobState=CANCELLED ExitCode=0:15\n"
            "JobId=17 JobName=z JobState=FAILED ExitCode=75:0\n")
    t = JobTable(parse_show_job(text))
    assert t.get("12_1")["JobId"] == "15" and t.get("12_1")["Restarts"] == "2"
    assert t.get("12_4")["JobState"] == "PENDING" and t.get("12_8") is not None
    assert t.get("12_6") is None and t.get("99") is None
    assert exit_code(t.get("16")) == 128 + 15 and exit_code(t.get("17")) == 75
    assert _task_ids("0-6:2,9%3") == {0, 2, 4, 6, 9}


# ------------------------------------------------------------------ report
def test_cohort_report_numbers(tmp_path, small_phantom):
    """Summaries with known numbers -> CSV columns, relative errors against truth.json, HTML, plot."""
    from glymphmpi.cohort.manifest import load_cohort
    from glymphmpi.io import atomic_write_json
    from glymphmpi.report.cohort import cohort_report, subject_report

    c = write_cohort(tmp_path, small_phantom, ids=("s1", "s2"), methods='["toy"]')
    (tmp_path / "subjects" / "s1" / "truth.json").write_text(json.dumps({"D_mm2_per_h": 0.5}))
    text = c.read_text().replace('methods = ["toy"]', 'methods = ["toy", "fem2", "pinn2"]')
    text += (f'[method.fem2]\ncommand = ["{sys.executable}"]\n[method.pinn2]\ncommand = ["{sys.executable}"]\n'
             'kind = "torch"\n')
    c.write_text(text)
    co = load_cohort(c)
    out = tmp_path / "out"
    vals = {("s1", "fem2"): 0.55, ("s1", "pinn2"): 0.45, ("s2", "fem2"): 0.8}
    for (sid, m), d in vals.items():
        atomic_write_json(out / sid / m / "summary.json", {"status": "complete", "D_mm2_per_h": d,
                                                           "D_std": 0.01, "residual_norm_rel": 3e-3,
                                                           "runtime_s": 12.5, "converged": True})
        (out / sid / m / "figures").mkdir(parents=True)
        (out / sid / m / "figures" / "fit.png").write_bytes(b"\x89PNG")
    atomic_write_json(out / "s2" / "pinn2" / "summary.json", {"status": "failed", "error": "boom: NaN loss",
                                                              "exit_code": 1})
    atomic_write_json(out / "s1" / "toy" / "summary.json", {"status": "complete", "speed_mean_mm_per_h": 0.3,
                                                            "peclet_median": 12.0})
    for s in co.subjects:
        subject_report(co, out, s.id)
    paths = cohort_report(co, out)
    import csv

    rows = {r["subject"]: r for r in csv.DictReader(paths["csv"].open())}
    assert float(rows["s1"]["fem2.D_mm2_per_h"]) == 0.55 and float(rows["s1"]["D_true"]) == 0.5
    assert float(rows["s1"]["fem2.D_rel_error"]) == pytest.approx(0.1, rel=1e-9)
    assert float(rows["s1"]["pinn2.D_rel_error"]) == pytest.approx(-0.1, rel=1e-9)
    assert rows["s2"]["pinn2.status"] == "failed" and rows["s2"]["pinn2.error"] == "boom: NaN loss"
    assert rows["s2"]["D_true"] == "" and rows["s2"]["toy.status"] == "missing"
    h = paths["html"].read_text()
    assert "+10.0%" in h and "-10.0%" in h and "boom: NaN loss" in h and "peclet_median" in h
    assert '../s1/fem2/figures/fit.png' in h and '../s1/report/index.html' in h
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    sj = json.loads((out / "s1" / "report" / "summary.json").read_text())
    assert sj["figures"]["fem2"] == ["s1/fem2/figures/fit.png"]


# ------------------------------------------------------------------ local launcher
def test_local_cohort_failure_retries_and_noop(tmp_path, small_phantom):
    """3 subjects, one fails: the others complete; re-runs retry only it, bounded; then 'nothing to do'."""
    c = write_cohort(tmp_path, small_phantom, body="[cohort]\nmax_attempts = 2\npoll_s = 0.2\n",
                     toy_args=("--steps", "5", "--step-s", "0.01", "--fail-subject", "sub-02"))
    out = tmp_path / "out"
    r = glymph_cli("cohort", "run", c, "--out", out)
    assert r.returncode == 1, r.stderr
    st = json.loads(glymph_cli("cohort", "status", c, "--out", out, "--json").stdout)
    runs = st["runs"]
    assert runs["sub-01"]["toy"]["state"] == "complete" and runs["sub-03"]["toy"]["state"] == "complete"
    assert runs["sub-02"]["toy"]["state"] == "failed" and runs["sub-02"]["toy"]["exit_code"] == 2
    assert "told to fail on subject sub-02" in runs["sub-02"]["toy"]["reason"]
    for sid in ("sub-01", "sub-03"):
        s = json.loads((out / sid / "toy" / "summary.json").read_text())
        assert s["value"] == toy_ref(small_phantom, sid, 5)
    mt = (out / "sub-01" / "toy" / "summary.json").stat().st_mtime
    r = glymph_cli("cohort", "run", c, "--out", out)  # attempt 2 of 2 for sub-02 only
    assert "2 complete, 1 to run" in r.stdout and (out / "sub-01" / "toy" / "summary.json").stat().st_mtime == mt
    r = glymph_cli("cohort", "run", c, "--out", out)  # out of attempts: nothing runs
    assert r.returncode == 1 and "nothing to run" in r.stdout and "not retried after 2 failed attempts" in r.stdout
    c.write_text(c.read_text().replace(', "--fail-subject", "sub-02"', ""))
    r = glymph_cli("cohort", "run", c, "--out", out, "--retry-failed")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 complete" in r.stdout and "report:" in r.stdout
    r = glymph_cli("cohort", "run", c, "--out", out)
    assert r.returncode == 0 and "nothing to do: all 3 runs of 3 subjects are complete" in r.stdout
    table = glymph_cli("cohort", "status", c, "--out", out).stdout
    assert table.splitlines()[0].split() == ["subject", "toy"] and "3 complete" in table
    rows = (out / "report" / "cohort.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("subject,")


def test_local_launcher_killed_at_random_moments_resumes_to_same_result(tmp_path, small_phantom):
    """SIGTERM to the local launcher at random moments (3 times): it stops its runs (they
    checkpoint, exit 75) and exits 75; re-running finishes with bit-identical values."""
    steps = 120  # 12 s of work per run: each kill below lands while the runs are going
    c = write_cohort(tmp_path, small_phantom, ids=("k1", "k2"), body="[cohort]\npoll_s = 0.1\n",
                     toy_args=("--steps", str(steps), "--step-s", "0.1"))
    out = tmp_path / "out"
    rnd = random.Random(7)
    stops = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "glymphmpi", "cohort", "run", str(c), "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(rnd.uniform(2.5, 4.5))
        p.send_signal(signal.SIGTERM)
        text = p.communicate(timeout=120)[0]
        assert p.returncode == 75, text
        assert "stopped; run `glymph cohort run" in text
        st = json.loads(glymph_cli("cohort", "status", c, "--out", out, "--json").stdout)
        assert {st["runs"][s]["toy"]["state"] for s in ("k1", "k2")} <= {"resumable", "pending", "complete"}
    r = glymph_cli("cohort", "run", c, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = []
    del stops
    for sid in ("k1", "k2"):
        s = json.loads((out / sid / "toy" / "summary.json").read_text())
        assert s["value"] == toy_ref(small_phantom, sid, steps)  # bit-for-bit
        resumed.append(s["resumed_from"])
    assert max(resumed) > 0  # at least one run really resumed from a checkpoint
    assert np.all(np.array(resumed) < steps)


def test_site_profile_configures_dask_jobqueue_workers(tmp_path):
    """hpc/sites/generic-slurm.yaml is a valid dask-jobqueue 0.9 profile: the worker job script
    carries its account, partition, wall time, QOS and prologue."""
    import copy

    import dask.config

    from glymphmpi.cohort.cli import _load_site

    saved = copy.deepcopy(dask.config.config)
    try:
        _load_site(ROOT / "hpc" / "sites" / "generic-slurm.yaml")
        from dask_jobqueue import SLURMCluster

        with SLURMCluster(interface="lo", scheduler_options={"interface": "lo"}) as cl:
            js = cl.job_script()
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
    for needle in ("#SBATCH -A my-project", "#SBATCH -p cpu", "#SBATCH -t 02:00:00", "#SBATCH --qos=normal",
                   "module purge", "#SBATCH -J glymph-dask"):
        assert needle in js, needle
    (tmp_path / "bad.yaml").write_text("slurm:\n  cores: 1\n")
    with pytest.raises(InputError, match="needs a top-level 'jobqueue:'"):
        _load_site(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="malformed YAML"):
        _load_site(ROOT / "pyproject.toml")


def test_subject_tables_limit_methods(tmp_path, small_phantom):
    """``{path, methods}`` subject entries: only those runs exist, in the plan, status and report."""
    c = write_cohort(tmp_path, small_phantom, methods='["toy", "toy2"]', body="[cohort]\npoll_s = 0.2\n",
                     toy_args=("--steps", "3", "--step-s", "0.01"))
    text = c.read_text().replace('subjects = ["subjects/*/subject.toml"]',
                                 'subjects = ["subjects/sub-01/subject.toml", '
                                 '{path = "subjects/sub-02/subject.toml", methods = ["toy2"]}]')
    text += f'[method.toy2]\ncommand = ["{sys.executable}", "{TOY}"]\nargs = ["--steps", "3"]\n'
    c.write_text(text)
    from glymphmpi.cohort.manifest import load_cohort

    co = load_cohort(c)
    assert [(s.id, m.name) for s, m in co.tasks()] == [("sub-01", "toy"), ("sub-01", "toy2"), ("sub-02", "toy2")]
    out = tmp_path / "out"
    r = glymph_cli("cohort", "run", c, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cohort: 3 complete" in r.stdout and not (out / "sub-02" / "toy").exists()
    table = glymph_cli("cohort", "status", c, "--out", out).stdout.splitlines()
    assert table[3].split()[:2] == ["sub-02", "-"]
    csv_text = (out / "report" / "cohort.csv").read_text()
    assert "sub-02,," in csv_text or ",," in csv_text.splitlines()[2]
    bad = c.read_text().replace('methods = ["toy2"]}', 'methods = ["nope"]}')
    c.write_text(bad)
    with pytest.raises(InputError, match="method 'nope' is not one of the cohort's methods"):
        load_cohort(c)


def test_local_commands_per_kind(tmp_path, small_phantom):
    """The local launcher's process per run: plain for one process, mpirun for MPI ranks,
    torch.distributed.run (torchrun) for DDP processes."""
    from glymphmpi.cohort.cli import make_launcher
    from glymphmpi.cohort.manifest import load_cohort

    body = "[resources.fem]\nranks = 3\n[resources.pinn]\nranks = 2\n[resources.romt]\nranks = 1\n"
    c = write_cohort(tmp_path, small_phantom, body=body, methods='["romt", "fem", "pinn"]')
    co = load_cohort(c)
    la = make_launcher(co, tmp_path / "o")
    s = co.subjects[0]
    romt, fem, pinn = la.tasks[:3]
    cmd = la.command(romt)
    assert cmd[1:] == ["--quiet", "romt", str(s.toml), "--out", str(tmp_path / "o" / s.id / "romt")]
    cmd = la.command(fem)
    assert cmd[:4] == ["mpirun", "-n", "3", "--oversubscribe"] and cmd[5:7] == ["--quiet", "fem"]
    cmd = la.command(pinn)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:9] == ["glymphmpi", "--quiet", "pinn"]


@pytest.mark.slow
def test_glymph_demo_end_to_end(tmp_path):
    """`glymph demo`: the demo cohort through every installed method, locally, with a report."""
    from glymphmpi.cohort.methods import default_methods

    r = glymph_cli("demo", "--out", tmp_path / "demo", timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = tmp_path / "demo" / "run" / "report" / "index.html"
    assert f"report:  {report}" in r.stdout and report.exists()
    import csv

    rows = list(csv.DictReader((tmp_path / "demo" / "run" / "report" / "cohort.csv").open()))
    ms = default_methods()
    for row in rows:
        for m in ms:
            if row.get(f"{m}.status"):
                assert row[f"{m}.status"] == "complete", (row["subject"], m)
    if "fem" in ms:  # the phantoms know their D: the report computes the relative error
        assert all(row["fem.D_rel_error"] != "" for row in rows if row["subject"].startswith("sub-"))
    r = glymph_cli("demo", "--out", tmp_path / "demo", timeout=600)
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_cohort_csv_keeps_headline_settings_go_long(tmp_path, small_phantom):
    """cohort.csv: status and the registry's headline fields (D, its interval, relative error, runtime,
    convergence); settings and other fields in cohort_settings.tsv; the subject page shows units and
    plain-word warnings instead of raw keys."""
    import csv

    from glymphmpi import methods as registry
    from glymphmpi.cohort.manifest import load_cohort
    from glymphmpi.io import atomic_write_json
    from glymphmpi.report.cohort import cohort_report, subject_report

    if not registry.get("fem").installed():
        pytest.skip("fem is not in this checkout")
    c = write_cohort(tmp_path, small_phantom, ids=("s1",), methods='["fem", "toy"]')
    (tmp_path / "subjects" / "s1" / "truth.json").write_text(json.dumps({"D_mm2_per_h": 0.8}))
    out = tmp_path / "out"
    fem = {"status": "complete", "D_mm2_per_h": 0.84, "D_ci95_mm2_per_h": [0.8, 0.88], "iterations": 15, "J": 2.5,
           "runtime_s": 3.25, "converged": False, "tao_reason": "DIVERGED_MAXITS", "ksp_iterations_per_solve": 7.5,
           "mpi_ranks": 2, "config": {"alpha": 1e-6, "figure_dpi": 110, "nested": {"k": "v"}},
           "warnings": ["D is at its upper bound"]}
    atomic_write_json(out / "s1" / "fem" / "summary.json", fem)
    atomic_write_json(out / "s1" / "toy" / "summary.json", {"status": "complete", "value": 4.5, "runtime_s": 1.0})
    co = load_cohort(c)
    subject_report(co, out, "s1")
    paths = cohort_report(co, out)
    rows = list(csv.DictReader(paths["csv"].open()))
    cols = list(rows[0])
    heads = [k for k in registry.get("fem").summary if k in fem]
    assert cols[:2] == ["subject", "D_true"]
    for k in heads:
        assert f"fem.{k}" in cols
    assert float(rows[0]["fem.D_rel_error"]) == pytest.approx(0.05)
    assert rows[0]["fem.converged"] == "false" and "DIVERGED_MAXITS" in rows[0]["fem.warnings"]
    assert "upper bound" in rows[0]["fem.warnings"] and rows[0]["fem.runtime_s"] == "3.25"
    assert rows[0]["toy.value"] == "4.5"  # an external command: its top-level numbers are its headline
    assert not any("config" in k or "ksp" in k or "figure_dpi" in k for k in cols)
    assert len(cols) <= 2 + 2 * 12
    long = list(csv.DictReader(paths["settings"].open(), delimiter="\t"))
    kv = {(r["subject"], r["method"], r["key"]): r["value"] for r in long}
    assert kv[("s1", "fem", "config.alpha")] == "1e-06" and kv[("s1", "fem", "config.nested.k")] == "v"
    assert kv[("s1", "fem", "summary.ksp_iterations_per_solve")] == "7.5"
    assert ("s1", "fem", "D_mm2_per_h") not in kv and list(long[0]) == ["subject", "method", "key", "value"]
    page = (out / "s1" / "report" / "index.html").read_text()
    assert rows[0]["fem.D_ci95_mm2_per_h"] == "0.8 0.88"
    # not converged: the truth is shown, an error is not (a relative error is for converged estimates only)
    assert "mm²/h" in page and "truth 0.8; not an estimate" in page and "+5.0%" not in page and "0.8 – 0.88" in page
    assert "did not converge (stopped after 15 iterations)" in page
    assert "ksp_iterations_per_solve" not in page and "figure_dpi" not in page


def test_demo_prints_estimates_with_truth_interval_and_smoke_labels(tmp_path, small_phantom):
    """The demo's closing lines: a converged D with its interval and the truth; a smoke-test number
    says so beside it (never shown as an estimate)."""
    from glymphmpi import methods as registry
    from glymphmpi.cohort.manifest import load_cohort
    from glymphmpi.demo import results_lines
    from glymphmpi.io import atomic_write_json

    if not (registry.get("fem").installed() and registry.get("pinn").installed()):
        pytest.skip("fem or pinn is not in this checkout")
    c = write_cohort(tmp_path, small_phantom, ids=("s1",), methods='["fem", "pinn"]')
    (tmp_path / "subjects" / "s1" / "truth.json").write_text(json.dumps({"D_mm2_per_h": 0.72}))
    out = tmp_path / "run"
    atomic_write_json(out / "s1" / "fem" / "summary.json", {
        "status": "complete", "D_mm2_per_h": 0.73, "D_ci95_mm2_per_h": [0.70, 0.76], "converged": True})
    atomic_write_json(out / "s1" / "pinn" / "summary.json", {
        "status": "complete", "D_mm2_per_h": 0.6984, "converged": False, "estimate": False,
        "estimate_reason": "smoke test, not an estimate: 3 epochs"})
    lines = results_lines(load_cohort(c), out)
    fem = next(ln for ln in lines if " fem:" in ln)
    pinn = next(ln for ln in lines if " pinn:" in ln)
    assert "D = 0.73 mm^2/h, 95% interval 0.7 – 0.76 (truth 0.72, +1.4%)" in fem and "--" not in fem
    assert "smoke test, not an estimate: 3 epochs" in pinn and "did not converge" in pinn
    assert "(truth 0.72; not an estimate)" in pinn and "%" not in pinn.split("--")[0]  # no error for a non-estimate
    from glymphmpi.report.cohort import cohort_report, subject_report

    co = load_cohort(c)
    page = cohort_report(co, out)["html"].read_text()
    assert "0.73 (+1.4%)" in page and "0.6984 (not an estimate)" in page and "-3.0%" not in page
    sub = (subject_report(co, out, "s1") and (out / "s1" / "report" / "index.html")).read_text()
    assert "(truth 0.72, +1.4%)" in sub and "(truth 0.72; not an estimate)" in sub and "-3.0%" not in sub


@pytest.mark.parametrize("mpi,sig", [("mpirun", "USR1"), ("mpirun", "TERM"), ("srun", "USR1")])
def test_template_stop_signal_reaches_the_launcher_and_requeues(tmp_path, mpi, sig):
    """Issue 17 §6: SLURM sends `--signal=B:USR1@120` to the batch shell only (and TERM on scancel -b /
    preemption); the template forwards USR1 to the launcher (mpirun exits 1 after TERM, 75 after USR1),
    waits again after the trap, exits with the launcher's 75 and requeues after USR1 only (a TERM is a
    cancellation: checkpoint, no requeue)."""
    for n in ("run", "romt", "fem", "pinn"):
        t = (ROOT / "jobs" / f"{n}.sbatch").read_text()
        assert "#SBATCH --signal=B:USR1@120\n" in t and "--signal=TERM@120" not in t
    fake = tmp_path / "bin"
    fake.mkdir()
    # the launcher stub: records its argv, exits 75 on USR1 (a checkpointed stop), 1 on TERM (mpirun's abort)
    launcher = ('#!/bin/bash\necho "%s $*" >> "$LOG"\n'
                'trap \'echo "%s got USR1" >> "$LOG"; exit 75\' USR1\n'
                'trap \'echo "%s got TERM" >> "$LOG"; exit 1\' TERM\n'
                'echo started >> "$LOG"\nwhile :; do /bin/sleep 0.05; done\n')
    (fake / mpi).write_text(launcher % (mpi, mpi, mpi))
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n[ "$1" = requeue ] && exit 0\n')
    (fake / "sleep").write_text("#!/bin/bash\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "LOG": str(log), "GLYMPH": "fakeglymph", "METHOD": "romt",
           "KIND": "mpi", "GLYMPH_MPI": mpi, "SUBJECT": "/d/s.toml", "OUTDIR": "/o/r", "SLURM_JOB_ID": "77",
           "SLURM_NTASKS": "2"}
    proc = subprocess.Popen(["bash", str(ROOT / "jobs/romt.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 60 and not (log.exists() and "started" in log.read_text()):
        time.sleep(0.02)
    assert log.exists() and "started" in log.read_text(), "the launcher stub never started"
    time.sleep(0.2)
    proc.send_signal(getattr(signal, f"SIG{sig}"))  # to the batch shell only, as SLURM's B: does
    out, err = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 75, (out, err, lines)
    assert f"{mpi} got USR1" in lines and f"{mpi} got TERM" not in lines
    assert "rc 75" in out
    # USR1 (the time limit's warning) requeues; TERM (scancel, preemption) checkpoints but never requeues
    assert ("scontrol requeue 77" in lines) == (sig == "USR1"), lines
    assert lines[0].startswith(f"{mpi} ") and "fakeglymph --quiet romt /d/s.toml --out /o/r" in lines[0]
