"""Job scripts are code (issue 17 section 5): hostile values are refused or stay data.

Scripts are rendered from hostile-but-legal data (an output folder with a space and '%',
subject folders with a tab, a newline, quotes and ``$(...)``) and run with stub ``srun``,
``mpirun``, ``scontrol`` and a stub method command on PATH: every subject runs with its exact
path and nothing the data holds executes. Hostile settings (a newline in ``extra``, in a
partition or a time, a subject id with a trailing newline) are one-line input errors.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glymphmpi.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cohort import glymph_cli, write_cohort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ("tab\there", "new\nline", "quote'\"s", "dollar$(touch PWNED)`touch PWNED2`", "sp ace;touch PWNED3")


def hostile_cohort(tmp: Path, phantom: Path, stub: Path, body: str = "") -> Path:
    """Subjects in hostile folders (ids are safe: the id check is separate), method = the stub."""
    src = phantom.read_text()
    for i, name in enumerate(HOSTILE):
        d = tmp / "subjects" / name
        d.mkdir(parents=True)
        txt = re.sub(r'(?m)^id = ".*"$', f'id = "s{i}"', src)
        txt = re.sub(r'(path|mask) = "', lambda m: f'{m.group(1)} = "{phantom.parent}/', txt)
        (d / "subject.toml").write_text(txt)
    c = tmp / "cohort.toml"
    c.write_text(f'subjects = ["subjects/*/subject.toml"]\nmethods = ["stub"]\n{body}\n'
                 f'[method.stub]\ncommand = ["{stub}"]\nkind = "mpi"\nargs = ["--x", "a b"]\n')
    return c


def stubs(tmp: Path) -> tuple[Path, Path]:
    """bin/ with srun, mpirun, scontrol, sleep; a stub method that records its argv NUL-separated."""
    b = tmp / "bin"
    b.mkdir()
    (b / "srun").write_text('#!/bin/bash\nshift 3\nexec "$@"\n')
    (b / "mpirun").write_text('#!/bin/bash\nshift 2\nexec "$@"\n')
    (b / "scontrol").write_text("#!/bin/bash\nexit 0\n")
    (b / "sleep").write_text("#!/bin/bash\nexit 0\n")
    stub = tmp / "stub method"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$ARGV_OUT.$SLURM_ARRAY_TASK_ID"\n')
    for f in [*b.iterdir(), stub]:
        f.chmod(0o755)
    return b, stub


@pytest.mark.parametrize("mpi", ["srun", "mpirun"])
def test_hostile_folders_every_subject_runs_nothing_executes(tmp_path, small_phantom, mpi):
    from glymphmpi.cohort.cli import make_launcher
    from glymphmpi.cohort.manifest import load_cohort

    bindir, stub = stubs(tmp_path)
    work = tmp_path / "work dir"
    work.mkdir()
    c = hostile_cohort(tmp_path, small_phantom, stub, body=f'[cohort]\nmpi_launcher = "{mpi}"\n')
    co = load_cohort(c)
    assert len(co.subjects) == len(HOSTILE)
    out = tmp_path / "my out %j"
    la = make_launcher(co, out, "slurm")
    script, array = la.render_job(la.tasks, "t")
    text = script.read_text()
    assert array == f"0-{len(HOSTILE) - 1}"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # the log path is data: quoted for sbatch, its '%' doubled, SLURM's own patterns kept
    out_q = str(out.resolve()).replace("%", "%%")
    assert f'#SBATCH --output="{out_q}/cohort/logs/stub.%A_%a.log"' in text
    # every line before the body is a comment, a directive or an export
    head = text[: text.index("METHOD=")]
    for line in head.splitlines():
        assert line.startswith(("#", "export ")), line
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"), "SLURM_JOB_ID": "9",
           "SLURM_NTASKS": "2", "HOME": str(tmp_path)}
    for i, t in enumerate(la.tasks):
        r = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, cwd=work,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        argv = (tmp_path / f"argv.{i}").read_bytes().split(b"\0")[:-1]
        assert [a.decode() for a in argv] == ["--quiet", "stub", str(t.subject), "--out", str(t.outdir),
                                              "--x", "a b"]
    assert {t.subject.parent.name for t in la.tasks} == set(HOSTILE)  # every subject ran, each once
    assert not list(tmp_path.rglob("PWNED*")) and not list(work.glob("PWNED*"))
    # a single job (one subject): SUBJECT/OUTDIR exports, same result
    script, array = la.render_job(la.tasks[1:2], "one")
    assert array is None
    r = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "x"}, cwd=work,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv.x").read_bytes().split(b"\0")[:-1]
    assert argv[2].decode() == str(la.tasks[1].subject) and "\n" in argv[2].decode()
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("body,needle", [
    ('[resources]\nextra = ["--exclusive\\ntouch /tmp/PWNED"]', "is not one sbatch option"),
    ('[resources]\nextra = ["--comment=x\\ny"]', "is not one sbatch option"),
    ('[resources]\nextra = ["-x; touch PWNED"]', "is not one sbatch option"),
    ('[resources]\npartition = "debug\\ntouch PWNED"', "has characters SLURM does not accept"),
    ('[resources]\naccount = "a b"', "has characters SLURM does not accept"),
    ('[resources]\ntime = "01:00:00\\n"', "is not a SLURM time"),
    ('[resources]\nmem = "4G\\n"', "is not a SLURM size"),
    ('[resources]\nimage = "/a.sif\\nx"', "contains a control character"),
    ('[cohort]\njob_prefix = "a\\nb"', "job_prefix"),
])
def test_hostile_settings_are_input_errors(tmp_path, small_phantom, body, needle):
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, body=body)
    with pytest.raises(InputError) as ei:
        load_cohort(c)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_subject_id_with_trailing_newline_is_refused(tmp_path, small_phantom):
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, ids=("a",))
    t = tmp_path / "subjects" / "a" / "subject.toml"
    t.write_text(t.read_text().replace('id = "a"', 'id = "a\\n"'))
    with pytest.raises(InputError, match="not safe"):
        load_cohort(c)


def test_extra_option_with_spaces_is_quoted_for_sbatch(tmp_path, small_phantom):
    from glymphmpi.cohort.cli import make_launcher
    from glymphmpi.cohort.manifest import load_cohort

    c = write_cohort(tmp_path, small_phantom, body='[resources]\nextra = ["--exclusive", "--comment=a b \\"c\\" #d"]\n')
    la = make_launcher(load_cohort(c), tmp_path / "o", "slurm")
    text = la.render_job(la.tasks[:1], "t")[0].read_text()
    assert "#SBATCH --exclusive\n" in text and '#SBATCH --comment="a b \\"c\\" #d"\n' in text


@pytest.mark.parametrize("key,value,needle", [
    ("partition", '"gpu\\ntouch PWNED"', "pinn_select.partition"),
    ("time", '"02:00:00\\ntouch PWNED"', "pinn_select.time"),
    ("time", '"soon"', "pinn_select.time"),
    ("account", '"a;b"', "pinn_select.account"),
])
def test_pinn_select_job_settings_are_checked(key, value, needle):
    from glymphmpi.config import build, parse_override
    from glymphmpi.pinnselect.config import PinnSelectConfig
    from glymphmpi.pinnselect.execute import resources

    _, k, v = parse_override(f"pinn_select.{key}={value}")
    try:
        cfg = build(PinnSelectConfig, {k: v}, "pinn_select")
    except InputError as exc:  # refused when the config is read: also fine
        assert key in str(exc)
        return
    with pytest.raises(InputError) as ei:
        resources(cfg, "slurm")
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    resources(cfg, "local")  # the local launcher uses none of them


def test_pinn_select_tasks_render_on_the_cohort_templates(tmp_path, small_phantom):
    """pinn-select's grid as cohort tasks: jobs/pinn.sbatch, the cohort's requeue protocol,
    per-run --set words in the NUL task files."""
    from glymphmpi.cohort.config import CohortConfig
    from glymphmpi.cohort.jobscript import read_task_file
    from glymphmpi.cohort.slurm import JobRenderer
    from glymphmpi.cohort.tasks import LaunchSpec
    from glymphmpi.pinnselect.config import PinnSelectConfig
    from glymphmpi.pinnselect.execute import grid_tasks, resources
    from glymphmpi.pinnselect.grid import expand_runs, make_setups

    cfg = PinnSelectConfig(partition="gpu", time="00:30:00", cpus_per_task=2, mem="3G")
    runs = expand_runs(make_setups({"w_r": [1.0, 32.0]}, {"epochs": 10}), 2)
    tasks = grid_tasks(small_phantom, tmp_path / "sel", runs, resources(cfg, "slurm"))
    spec = LaunchSpec(workdir=tmp_path / "sel" / "grid", options=CohortConfig(job_prefix="pinnsel"),
                      title="pinn-select grid", throttle=2)
    script, array = JobRenderer(spec).render(tasks, "t")
    text = script.read_text()
    assert array == "0-3%2"
    for d in ("--array=0-3%2", "--partition=gpu", "--time=00:30:00", "--cpus-per-task=2", "--mem=3G",
              "--requeue", "--signal=B:USR1@120", "--job-name=pinnsel-pinn"):
        assert f"#SBATCH {d}" in text, d
    assert "B:TERM" not in text and "scontrol requeue" in text and "METHOD=pinn" in text
    folder = Path(shlex.split(re.search(r"(?m)^export GLYMPH_TASKS=(.*)$", text).group(1))[0])
    f2 = read_task_file(folder / "2")
    assert f2[:2] == [str(small_phantom), str(tmp_path / "sel" / "runs" / runs[2].setup.name / "seed0")]
    assert f2[2:] == [w for s in [["--set", x] for x in __import__(
        "glymphmpi.pinnselect.grid", fromlist=["run_overrides"]).run_overrides(runs[2])] for w in s]


# ------------------------------------------------------------------ the cohort --out
def test_second_launcher_on_one_out_is_busy(tmp_path, small_phantom):
    c = write_cohort(tmp_path, small_phantom, ids=("b1",), body="[cohort]\npoll_s = 0.2\n",
                     toy_args=("--steps", "100", "--step-s", "0.1"))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "glymphmpi", "cohort", "run", str(c), "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not (out / "cohort" / "state.json").exists() and time.time() - t0 < 120:
            time.sleep(0.2)
        r = glymph_cli("cohort", "run", c, "--out", out)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "busy" in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
        assert str(p.pid) in r.stderr
    finally:
        p.terminate()
        p.communicate(timeout=120)
    assert p.returncode == 75
    assert not (out / "cohort" / ".glymph.lock").exists()  # released on exit


@pytest.mark.parametrize("kind", ["file", "under-file", "control"])
def test_bad_out_is_one_line(tmp_path, small_phantom, kind):
    c = write_cohort(tmp_path, small_phantom, ids=("b1",))
    f = tmp_path / "afile"
    f.write_text("x")
    out = {"file": f, "under-file": f / "sub", "control": tmp_path / "a\nb"}[kind]
    r = glymph_cli("cohort", "run", c, "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr and r.stderr.strip()


def test_bids_job_runs_one_launcher(tmp_path):
    """jobs/bids.sbatch starts `glymph bids BIDS OUT participant --scheduler slurm [ARGS]` (or the image's
    BIDS App form) with the user's words kept as words."""
    b, _ = stubs(tmp_path)
    g = tmp_path / "glymph"
    g.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$ARGV_OUT"\n')
    g.chmod(0o755)
    (b / "apptainer").write_text('#!/bin/bash\nprintf "%s\\0" apptainer "$@" > "$ARGV_OUT"\n')
    (b / "apptainer").chmod(0o755)
    env = {"PATH": f"{b}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"), "BIDS_DIR": "/d a/bids",
           "OUTDIR": "/o", "GLYMPH": str(g), "GLYMPH_BIDS_ARGS": "--participant-label 01 '0 2'"}
    r = subprocess.run(["bash", str(ROOT / "jobs" / "bids.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = [a.decode() for a in (tmp_path / "argv").read_bytes().split(b"\0")[:-1]]
    assert argv == ["bids", "/d a/bids", "/o", "participant", "--scheduler", "slurm", "--participant-label", "01",
                    "0 2"]
    r = subprocess.run(["bash", str(ROOT / "jobs" / "bids.sbatch")], env={**env, "GLYMPH_IMAGE": "/i/g.sif"},
                       capture_output=True, text=True)
    argv = [a.decode() for a in (tmp_path / "argv").read_bytes().split(b"\0")[:-1]]
    assert argv[:6] == ["apptainer", "run", "/i/g.sif", "/d a/bids", "/o", "participant"]


def test_unwritable_out_is_one_line(tmp_path, monkeypatch):
    from glymphmpi.cohort import cli

    monkeypatch.setattr(os, "access", lambda *a: False)
    with pytest.raises(InputError) as ei:
        cli.check_out(tmp_path / "o")
    assert "not writable" in str(ei.value) and "\n" not in str(ei.value)


def test_backend_modules_know_no_scheduler_and_no_report():
    """The generic state knows no SLURM; the launchers know no report (hooks come from cohort/cli.py)."""
    import ast

    pkg = ROOT / "glymphmpi" / "cohort"

    def imports(name):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    for name in ("state", "tasks", "ledger", "launcher", "local"):
        assert not any("sbatch" in m or "slurm" in m for m in imports(name)), name
    for name in ("state", "tasks", "ledger", "launcher", "local", "slurm", "jobscript", "sbatch", "manifest"):
        assert not any("report" in m or m.endswith("cli") for m in imports(name)), name
    rep = ast.parse((ROOT / "glymphmpi" / "report" / "cohort.py").read_text())
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("glymphmpi.cohort")
                   for n in ast.walk(rep))
