"""Render the job templates in ``jobs/``: job scripts are code, values are data.

A template is an ordinary sbatch script that users can submit by hand. Rendering replaces two
marked blocks: the ``#SBATCH`` resource directives and the environment exports (subject,
output directory, CLI, image, ...). Nothing else of the template changes, so the rendered
script runs the same body.

What keeps a value from becoming a command:

* every resource value was checked by :class:`~glymphmpi.cohort.resources.Resources`
  (``fullmatch``, no control characters); an ``#SBATCH`` value that is data (a log path) is
  quoted the way sbatch reads its directives (double quotes, backslash escapes, ``%%``);
* exports are ``export NAME='value'`` (POSIX shell quoting);
* the per-task arguments of a job array (subject, output directory, extra words) are not
  written as lines of text but as one file per task, ``TASKS/<index>``, holding NUL-terminated
  fields, read with ``mapfile -d ''``: a path with a tab or a newline stays one field.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from glymphmpi.errors import InputError, MissingDependency
from glymphmpi.io import atomic_write_bytes

from .resources import JOB_NAME_RE, Resources, has_control

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
RES_BEGIN, RES_END = "# >>> glymph:resources", "# <<< glymph:resources"
ENV_BEGIN, ENV_END = "# >>> glymph:environment", "# <<< glymph:environment"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_PLAIN = re.compile(r"[A-Za-z0-9._,:/=+@%-]+")


def template_path(name: str, jobs_dir: Path | None = None) -> Path:
    p = Path(jobs_dir or os.environ.get("GLYMPH_JOBS_DIR") or JOBS_DIR) / f"{name}.sbatch"
    if not p.is_file():
        raise MissingDependency(f"job template {p} not found (set GLYMPH_JOBS_DIR to the jobs/ folder)")
    return p


def sbatch_quote(value: str) -> str:
    """A value as sbatch reads it from an ``#SBATCH`` line (its own quoting, not the shell's)."""
    if has_control(value):
        raise InputError(f"job script value {value!r} contains a control character")
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_pattern(directory: Path, name: str) -> str:
    """An ``--output`` value: the directory is data (``%`` doubled), ``name`` holds SLURM's patterns."""
    return str(directory).replace("%", "%%") + "/" + name


def directives(res: Resources, spec, job_name: str, array: str | None = None,
               output: str | None = None) -> list[str]:
    """``#SBATCH`` lines for one run (or one array) of method ``spec`` with resources ``res``."""
    if not JOB_NAME_RE.fullmatch(job_name):
        raise InputError(f"job name {job_name!r}: letters, digits, '.', '_' and '-' only")
    res.validate()
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
        if not re.fullmatch(r"\d+-\d+(%\d+)?|\d+", array):
            raise InputError(f"array {array!r} is not an index range")
        d.append(f"--array={array}")
    if output:
        d.append(f"--output={sbatch_quote(output)}")
    for e in res.extra:
        name, eq, value = e.partition("=")
        d.append(name + (eq + sbatch_quote(value) if eq else ""))
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
    for line in sbatch_lines:
        if "\n" in line or "\r" in line:
            raise InputError(f"job script directive {line!r} spans lines")
    for k in env:
        if not _ENV_NAME.fullmatch(k):
            raise InputError(f"bad environment variable name {k!r}")
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    text = _replace_block(text, RES_BEGIN, RES_END, sbatch_lines)
    text = _replace_block(text, ENV_BEGIN, ENV_END, exports)
    for name, value in (overrides or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise InputError(f"{name}={value!r}: letters, digits, '.', '_' and '-' only")
        text, n = re.subn(rf"(?m)^{name}=.*$", f"{name}={value}", text, count=1)
        if n != 1:
            raise MissingDependency(f"{template}: no line '{name}=...' to set")
    return text


def _replace_block(text: str, begin: str, end: str, lines: list[str]) -> str:
    i = text.index(begin)
    j = text.index(end)
    head_end = text.index("\n", i) + 1
    return text[:head_end] + "".join(x + "\n" for x in lines) + text[j:]


def write_task_files(folder: Path, tasks: list[list[str]]) -> Path:
    """One file per array task, ``folder/<index>``: its fields, each NUL-terminated.

    Fields are ``SUBJECT OUTDIR [WORD ...]``; a NUL cannot occur in a path or an argument, so
    no value can shift another task's fields (the templates read them with ``mapfile -d ''``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, fields in enumerate(tasks):
        for f in fields:
            if "\0" in f:
                raise InputError(f"task field {f!r} contains a NUL byte")
        atomic_write_bytes(folder / str(i), b"".join(f.encode() + b"\0" for f in fields))
    return folder


def read_task_file(path: Path) -> list[str]:
    """The fields of one task file (the inverse of :func:`write_task_files`)."""
    data = Path(path).read_bytes()
    return [f.decode() for f in data.split(b"\0")[:-1]]
