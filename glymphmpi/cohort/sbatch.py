"""Render the job templates in ``jobs/`` and talk to SLURM (sbatch, scontrol, scancel).

A template is an ordinary sbatch script that users can submit by hand. The launcher
renders it by replacing two marked blocks: the ``#SBATCH`` resource directives and the
environment exports (subject, output directory, CLI, image, ...), each value shell-quoted.
Nothing else of the template changes, so the rendered script runs the same body.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

from glymphmpi.errors import GlymphError, MissingDependency

from .manifest import Resources
from .methods import MethodSpec

log = logging.getLogger(__name__)

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
RES_BEGIN, RES_END = "# >>> glymph:resources", "# <<< glymph:resources"
ENV_BEGIN, ENV_END = "# >>> glymph:environment", "# <<< glymph:environment"
#: SLURM job states in which a job is still queued or running
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class SlurmError(GlymphError):
    """A SLURM command failed (message: the command and its error line)."""


def template_path(name: str, jobs_dir: Path | None = None) -> Path:
    p = Path(jobs_dir or os.environ.get("GLYMPH_JOBS_DIR") or JOBS_DIR) / f"{name}.sbatch"
    if not p.is_file():
        raise MissingDependency(f"job template {p} not found (set GLYMPH_JOBS_DIR to the jobs/ folder)")
    return p


def directives(res: Resources, spec: MethodSpec, job_name: str, array: str | None = None,
               output: str | None = None, dependency: str | None = None) -> list[str]:
    """``#SBATCH`` lines for one run (or one array) of ``spec`` with resources ``res``."""
    n = res.processes(spec)
    d = [f"--job-name={job_name}"]
    if spec.kind == "torch" and res.gpus:
        nodes = max(res.nodes, 1)
        d += [f"--nodes={nodes}", f"--ntasks-per-node={max(n // nodes, 1)}", f"--gpus-per-node={res.gpus}"]
    else:
        d += [f"--ntasks={n}"]
        if res.nodes:
            d += [f"--nodes={res.nodes}"]
    d += [f"--cpus-per-task={res.cpus_per_task}", f"--time={res.time}"]
    if res.mem:
        d.append(f"--mem={res.mem}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            d.append(f"--{key}={getattr(res, key)}")
    if array:
        d.append(f"--array={array}")
    if output:
        d.append(f"--output={output}")
    if dependency:
        d.append(f"--dependency={dependency}")
    d += list(res.extra)
    return [f"#SBATCH {x}" for x in d]


def render(template: str | Path, sbatch_lines: list[str], env: dict[str, str],
           overrides: dict[str, str] | None = None) -> str:
    """The template text with its resource block and environment block filled in.

    Args:
        template: path of a ``jobs/*.sbatch`` file.
        sbatch_lines: ``#SBATCH ...`` lines that replace the default resource block.
        env: exported variables (values shell-quoted).
        overrides: ``NAME=value`` lines of the body to replace (``METHOD``, ``KIND``), for
            methods that share a template.
    """
    text = Path(template).read_text()
    for begin, end in ((RES_BEGIN, RES_END), (ENV_BEGIN, ENV_END)):
        if text.count(begin) != 1 or text.count(end) != 1:
            raise MissingDependency(f"{template}: missing or repeated marker {begin!r}/{end!r}")
    for k in env:
        if not _ENV_NAME.match(k):
            raise ValueError(f"bad environment variable name {k!r}")
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    text = _replace_block(text, RES_BEGIN, RES_END, sbatch_lines)
    text = _replace_block(text, ENV_BEGIN, ENV_END, exports)
    for name, value in (overrides or {}).items():
        text, n = re.subn(rf"(?m)^{name}=.*$", f"{name}={shlex.quote(value)}", text, count=1)
        if n != 1:
            raise MissingDependency(f"{template}: no line '{name}=...' to set")
    return text


def _replace_block(text: str, begin: str, end: str, lines: list[str]) -> str:
    i = text.index(begin)
    j = text.index(end)
    head_end = text.index("\n", i) + 1
    return text[:head_end] + "".join(x + "\n" for x in lines) + text[j:]


# ------------------------------------------------------------------ SLURM commands
def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise MissingDependency(f"{cmd[0]} not found: SLURM is not installed here "
                                "(hpc/install.sh --slurm, then hpc/slurm/up.sh for a local one)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:2])}: no answer in {timeout:g} s") from None
    if out.returncode != 0:
        err = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]
        raise SlurmError(f"{' '.join(cmd[:2])}: {err}")
    return out.stdout


def available() -> bool:
    """True when a SLURM controller answers here."""
    try:
        _run(["sinfo", "-h", "-o", "%P"], timeout=10)
        return True
    except GlymphError:
        return False


def submit(script: Path, extra: list[str] | None = None) -> str:
    """``sbatch --parsable [extra] script`` -> job id (array jobs: the array's id)."""
    out = _run(["sbatch", "--parsable", *(extra or []), str(script)])
    return out.strip().split(";")[0]


def cancel(job: str) -> None:
    _run(["scancel", job])


def release(job: str) -> None:
    """Make a requeued job eligible now (SLURM holds it about two minutes otherwise)."""
    _run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


def _task_ids(expr: str) -> set[int]:
    """``"0-3,7%2"`` -> {0, 1, 2, 3, 7}."""
    ids: set[int] = set()
    for part in expr.split("%")[0].split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, s = part.split(":", 1)
            step = int(s)
        if "-" in part:
            a, b = part.split("-", 1)
            ids.update(range(int(a), int(b) + 1, step))
        else:
            ids.add(int(part))
    return ids


def parse_show_job(text: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` output -> one dict per line (Key=Value pairs)."""
    recs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "JobId=" not in line:
            continue
        rec = {}
        for m in re.finditer(r"(\w[\w/:]*)=(\S*)", line):
            rec.setdefault(m.group(1), m.group(2))
        recs.append(rec)
    return recs


class JobTable:
    """A snapshot of the controller's jobs, looked up by ``ID`` or ``ARRAYID_TASK``."""

    def __init__(self, records: list[dict[str, str]]):
        self.by_id: dict[str, dict] = {}
        self.pending_arrays: list[tuple[str, set[int], dict]] = []
        for r in records:
            self.by_id[r["JobId"]] = r
            aid, tid = r.get("ArrayJobId"), r.get("ArrayTaskId")
            if aid and tid:
                if tid.isdigit():
                    self.by_id[f"{aid}_{tid}"] = r
                else:
                    try:
                        self.pending_arrays.append((aid, _task_ids(tid), r))
                    except ValueError:
                        pass

    @classmethod
    def query(cls) -> JobTable:
        try:
            text = _run(["scontrol", "show", "job", "-o"], timeout=30)
        except SlurmError as exc:
            if "No jobs in the system" in str(exc):
                return cls([])
            raise
        return cls(parse_show_job(text))

    def get(self, job: str) -> dict | None:
        if job in self.by_id:
            return self.by_id[job]
        if "_" in job:
            aid, tid = job.split("_", 1)
            for a, ids, r in self.pending_arrays:
                if a == aid and tid.isdigit() and int(tid) in ids:
                    return r
        return None


def exit_code(rec: dict) -> int | None:
    """SLURM's ``ExitCode=rc:signal`` -> rc (or 128+signal when killed by a signal)."""
    ec = rec.get("ExitCode", "")
    try:
        rc, sig = (int(x) for x in ec.split(":"))
    except ValueError:
        return None
    return rc if rc or not sig else 128 + sig
