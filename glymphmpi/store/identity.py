"""Run identity: what makes two runs the same run, so that a directory never mixes two.

A run's identity is its method, a content hash of its subject (scans, mask, times and
affine: the numbers, not the file names), the settings that change the result, and the
package version. :class:`glymphmpi.store.RunDir` records it (``identity.json``, the
checkpoints, summary.json) and refuses to resume a directory whose recorded identity
differs, naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from glymphmpi import __version__

# Settings that may change between a stop and its resume: they change how a run goes or what it
# writes besides its numbers, or (max_iterations) only where it stops: the state saved at iteration
# k is the same under any cap >= k, so raising the cap continues the same run (a method whose
# finished parts depend on the cap, like rOMT's finished loops, checks its own key for them).
# A config class adds its own with a class attribute ``IDENTITY_EXCLUDE = ("key", ...)``.
RUN_ONLY = frozenset({
    "checkpoint_every", "checkpoint_min_interval_s", "log_every", "quiet", "vtk_every", "maps", "figures",
    "postprocess", "post", "fft_workers", "tune_malloc", "compile", "device", "petsc_prefix", "max_iterations",
})


def subject_hash(subject) -> str:
    """SHA-256 (hex, 16 characters) of a subject's numbers: scans, mask, times, affine.

    Two subjects with the same grid but different scans differ; the same data under
    other file names or another id hash the same.
    """
    h = hashlib.sha256()
    for name in ("scans", "mask", "times_h", "affine"):
        a = np.ascontiguousarray(np.asarray(getattr(subject, name)))
        if a.dtype == bool:
            a = a.view(np.uint8)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _settings(cfg) -> dict:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
    elif hasattr(cfg, "model_dump"):  # pydantic
        d = cfg.model_dump()
    elif isinstance(cfg, dict):
        d = dict(cfg)
    else:
        raise TypeError(f"run identity: cannot read settings from {type(cfg).__name__}")
    skip = RUN_ONLY | frozenset(getattr(cfg, "IDENTITY_EXCLUDE", ()))
    # through JSON: tuples and lists compare equal, numpy scalars become numbers
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in skip}, sort_keys=True, default=str))


def run_identity(method: str, subject, cfg) -> dict:
    """The identity of running ``method`` on ``subject`` with ``cfg`` (a JSON-able dict).

    Args:
        method: registered method name.
        subject: a loaded :class:`glymphmpi.subject.Subject` (or anything with
            scans, mask, times_h and affine arrays).
        cfg: the method's resolved config (dataclass, pydantic model or dict).
    """
    return {"method": str(method), "subject_sha256": subject_hash(subject), "subject_id": str(subject.id),
            "settings": _settings(cfg), "version": __version__}


def differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two identities, one short phrase each (empty: the same run).

    ``subject_id`` alone does not make a difference (renaming a subject keeps its data).
    """
    out = []
    if recorded.get("method") != current.get("method"):
        out.append(f"method {recorded.get('method')!r} != {current.get('method')!r}")
    if recorded.get("subject_sha256") != current.get("subject_sha256"):
        out.append(f"subject data (recorded {recorded.get('subject_id')!r} sha256 {recorded.get('subject_sha256')}, "
                   f"now {current.get('subject_id')!r} sha256 {current.get('subject_sha256')})")
    a, b = recorded.get("settings") or {}, current.get("settings") or {}
    section = current.get("method", "")
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{section}.{k} {_short(a.get(k, '<unset>'))} != {_short(b.get(k, '<unset>'))}")
    if recorded.get("version") != current.get("version"):
        out.append(f"version {recorded.get('version')} != {current.get('version')}")
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
