"""The rOMT method's entry points in the registry (:mod:`glymphmpi.methods`).

``solve`` is ``glymph romt``: every loop (:func:`glymphmpi.romt.solve.run`), then, unless
``romt.postprocess`` is false (``--no-post``), the Lagrangian post-processing, its seeds split over
the ranks.
``solve_post`` is ``glymph romt-post``: the post-processing again on a finished run, the seeds
split over the ranks. Both have the registry's one signature ``(subject, cfg, rundir, comm)``;
``cfg`` is a :class:`~glymphmpi.romt.config.RomtConfig`, its post-processing settings ``cfg.post``.
"""

from __future__ import annotations


def solve(subject, cfg, rundir, comm) -> dict:
    """``glymph romt``: the loops, then the post-processing (seeds split over the ranks, files written
    by rank 0); summary fields on every rank."""
    from glymphmpi.romt.solve import run

    fields = run(subject, cfg, rundir, comm)
    if cfg.postprocess:
        from glymphmpi.romt.post import postprocess

        fields.update(postprocess(rundir, subject, cfg.post, comm=comm))
    return fields


def solve_post(subject, cfg, rundir, comm) -> dict:
    """``glymph romt-post``: the post-processing of a finished run, seeds split over ``comm``."""
    from glymphmpi.romt.post import postprocess

    return postprocess(rundir, subject, cfg.post, comm=comm)
