"""The cohort file: subjects, methods, resources, settings; validated up front.

Minimal form (paths relative to the cohort file; globs allowed)::

    subjects = ["sub-01/subject.toml", "sub-02/subject.toml"]
    methods = ["romt", "fem", "pinn"]        # optional: default = every installed method

A subject entry may also be a table that limits the methods run on it::

    subjects = ["sub-*/subject.toml", {path = "phantom/subject.toml", methods = ["romt"]}]

Optional tables::

    [resources]            # defaults for every method ...
    time = "01:00:00"
    partition = "debug"
    [resources.fem]        # ... and per method
    ranks = 4
    mem = "8G"
    [resources.pinn]
    gpus = 1
    image = "/images/glymphmpi.sif"
    [settings.pinn]        # config tables passed to the methods (--config)
    epochs = 2000
    [cohort]               # launcher options (glymphmpi.cohort.config.CohortConfig)
    max_attempts = 3
    [method.mytool]        # an extra method: a command that follows the run-directory contract
    command = ["python", "/opt/mytool.py"]
    kind = "serial"

Every problem is an :class:`~glymphmpi.errors.InputError` naming the file (exit 2), raised
before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from glymphmpi.config import build, load_toml, parse_override
from glymphmpi.errors import InputError
from glymphmpi.methods import config_class, known_sections

from .config import CohortConfig
from .methods import MethodSpec, default_methods, get_method, method_from_table
from .resources import SAFE_ID, Resources, check_extra
from .state import run_dir

TOP_KEYS = {"subjects", "methods", "resources", "settings", "cohort", "method", "name", "description"}


@dataclasses.dataclass(frozen=True)
class SubjectEntry:
    """One subject of a cohort: its id, TOML file (absolute) and, optionally, its methods."""

    id: str
    toml: Path
    methods: tuple[str, ...] | None = None


@dataclasses.dataclass
class Cohort:
    """A validated cohort file.

    Attributes:
        path: the cohort file (absolute).
        subjects: in file order (globs sorted).
        methods: method specs in the order given.
        resources: per method name.
        settings: config tables (section -> dict) handed to every method run.
        options: launcher options.
    """

    path: Path
    subjects: list[SubjectEntry]
    methods: list[MethodSpec]
    resources: dict[str, Resources]
    settings: dict[str, dict]
    options: CohortConfig

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]

    def tasks(self) -> list[tuple[SubjectEntry, MethodSpec]]:
        """Every (subject, method) run, in subject order."""
        return [(s, m) for s in self.subjects for m in self.methods if self.runs(s, m.name)]

    @staticmethod
    def runs(subject: SubjectEntry, method: str) -> bool:
        return subject.methods is None or method in subject.methods

    def subject(self, sid: str) -> SubjectEntry:
        return next(s for s in self.subjects if s.id == sid)

    def run_tasks(self, out: Path) -> list:
        """The launcher's tasks: one per (subject, method), run in ``OUT/<subject>/<method>``."""
        from .tasks import Task

        return [Task(s.id, m.name, s.toml, m, run_dir(Path(out).resolve(), s.id, m.name), self.resources[m.name])
                for s, m in self.tasks()]

    def settings_toml(self) -> str:
        """The settings as one TOML config file (one table per section)."""
        import tomli_w

        return tomli_w.dumps(self.settings)


def _resources(table: dict, where, base: Resources | None = None) -> Resources:
    if "extra" in table:
        ex = table["extra"]
        if isinstance(ex, str):
            ex = [ex]
        if not isinstance(ex, list) or not all(isinstance(e, str) and e.startswith("-") for e in ex):
            raise InputError("resources 'extra' must be a list of sbatch options like \"--exclusive\"", where)
        for e in ex:
            try:
                check_extra(e)
            except ValueError as exc:
                raise InputError(str(exc), where) from None
        table = {**table, "extra": tuple(ex)}
    merged = {**(dataclasses.asdict(base) if base else {}), **table}
    return build(Resources, merged, where)


def load_cohort(path, overrides=(), validate_subjects: bool = True) -> Cohort:
    """Read and validate a cohort file.

    Args:
        path: cohort TOML.
        overrides: ``SECTION.KEY=VALUE`` strings (``cohort.*`` launcher options, method settings).
        validate_subjects: load every subject (all scans and the mask) to check it.

    Raises:
        InputError: one line naming the file and the problem.
    """
    path = Path(path).resolve()
    data = load_toml(path)
    root = path.parent
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(TOP_KEYS))})", path)

    # methods: extra ones first so that they can be listed
    extra: dict[str, MethodSpec] = {}
    mt = data.get("method", {})
    if not isinstance(mt, dict) or not all(isinstance(v, dict) for v in mt.values()):
        raise InputError("[method.NAME] entries must be tables", path)
    for name, table in mt.items():
        if not SAFE_ID.fullmatch(name):
            raise InputError(f"method name {name!r}: letters, digits, '.', '_' and '-' only", path)
        extra[name] = method_from_table(name, table, path)
    if "methods" in data:
        names = data["methods"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputError("'methods' must be a non-empty list of method names", path)
        if len(set(names)) != len(names):
            raise InputError("'methods' lists a method twice", path)
    else:
        names = default_methods() + [n for n in extra if n not in default_methods()]
        if not names:
            raise InputError("no 'methods' given and no method is installed in this checkout", path)
    methods = []
    for n in names:
        try:
            spec = get_method(n, extra)
        except InputError as exc:
            raise InputError(str(exc), path) from None
        if not spec.installed():
            raise InputError(f"method {n!r} is not installed in this checkout", path)
        methods.append(spec)

    # subjects
    pats = data.get("subjects")
    if not isinstance(pats, list) or not pats:
        raise InputError("'subjects' must be a non-empty list of subject TOML paths (globs allowed)", path)
    files: list[Path] = []
    only: dict[Path, tuple[str, ...]] = {}
    for pat in pats:
        sel = None
        if isinstance(pat, dict):
            bad = set(pat) - {"path", "methods"}
            sel = pat.get("methods")
            if bad or not isinstance(pat.get("path"), str) or not (
                    isinstance(sel, list) and sel and all(isinstance(x, str) for x in sel)):
                raise InputError("a subject table needs 'path' (string) and 'methods' (list of names) only", path)
            for x in sel:
                if x not in names:
                    raise InputError(f"subject {pat['path']!r}: method {x!r} is not one of the cohort's "
                                     f"methods ({', '.join(names)})", path)
            pat = pat["path"]
        elif not isinstance(pat, str):
            raise InputError("'subjects' entries must be paths (strings) or {path, methods} tables", path)
        full = pat if Path(pat).is_absolute() else str(root / pat)
        if glob.has_magic(pat):
            hits = sorted(Path(h) for h in glob.glob(full))
            if not hits:
                raise InputError(f"subject pattern {pat!r} matched no file", path)
        else:
            hits = [Path(full)]
            if not hits[0].is_file():
                raise InputError(f"subject file {pat!r} not found", path)
        for h in hits:
            h = h.resolve()
            if h not in files:
                files.append(h)
            if sel is not None:
                only[h] = tuple(sel)
    subjects: list[SubjectEntry] = []
    seen: dict[str, Path] = {}
    for f in files:
        sdata = load_toml(f)
        sid = sdata.get("id")
        if not isinstance(sid, str) or not SAFE_ID.fullmatch(sid):
            raise InputError(f"subject id {sid!r} is not safe for job names and paths "
                             "(letters, digits, '.', '_', '-'; not starting with '.' or '-')", f)
        if sid in seen:
            raise InputError(f"subject id {sid!r} is used twice ({seen[sid]} and {f})", path)
        seen[sid] = f
        if sid in ("cohort", "report"):
            raise InputError(f"subject id {sid!r} is reserved for the cohort's own directories", f)
        subjects.append(SubjectEntry(sid, f, only.get(f)))
    if validate_subjects:
        from glymphmpi.subject import load_subject

        for s in subjects:
            load_subject(s.toml)

    # launcher options and settings, with --set overrides
    sets: dict[str, dict] = {}
    for item in overrides:
        sec, key, value = parse_override(item)
        sets.setdefault(sec, {})[key] = value
    opt_table = data.get("cohort", {})
    if not isinstance(opt_table, dict):
        raise InputError("[cohort] must be a table", path)
    options = build(CohortConfig, {**opt_table, **sets.pop("cohort", {})}, f"{path} [cohort]")
    st = data.get("settings", {})
    if not isinstance(st, dict) or not all(isinstance(v, dict) for v in st.values()):
        raise InputError("[settings.SECTION] entries must be tables", path)
    settings = {k: dict(v) for k, v in st.items()}
    for sec, kv in sets.items():
        settings.setdefault(sec, {}).update(kv)
    valid = known_sections()
    for sec, table in settings.items():
        if sec in extra:
            raise InputError(f"[settings.{sec}]: {sec!r} is an extra method; give its options in "
                             f"[method.{sec}] args", path)
        if sec not in valid:
            raise InputError(f"[settings.{sec}]: unknown config table (valid: {', '.join(valid)})", path)
        build(config_class(sec), table, f"{path} [settings.{sec}]")

    # resources
    rt = data.get("resources", {})
    if not isinstance(rt, dict):
        raise InputError("[resources] must be a table", path)
    per = {k: v for k, v in rt.items() if isinstance(v, dict)}
    base = _resources({k: v for k, v in rt.items() if not isinstance(v, dict)}, f"{path} [resources]")
    for k in per:
        if k not in names:
            raise InputError(f"[resources.{k}]: {k!r} is not one of the cohort's methods ({', '.join(names)})", path)
    resources = {n: _resources(per.get(n, {}), f"{path} [resources.{n}]", base) for n in names}
    return Cohort(path, subjects, methods, resources, settings, options)
