"""The rOMT method's entry points in the registry (:mod:`glymphmpi.methods`).

``solve`` is ``glymph romt``: every loop (:func:`glymphmpi.romt.solve.run`), then, unless
``romt.postprocess`` is false (``--no-post``), the Lagrangian post-processing on rank 0.
``solve_post`` is ``glymph romt-post``: the post-processing again on a finished run, the seeds
split over the ranks. Both have the registry's one signature ``(subject, cfg, rundir, comm)``;
``cfg`` is a :class:`~glymphmpi.romt.config.RomtConfig`, its post-processing settings ``cfg.post``.
"""

from __future__ import annotations

from glymphmpi.errors import GlymphError


def solve(subject, cfg, rundir, comm) -> dict:
    """``glymph romt``: the loops, then the post-processing (rank 0); summary fields on every rank."""
    from glymphmpi.romt.solve import run

    fields = run(subject, cfg, rundir, comm)
    if cfg.postprocess:
        fields.update(_post_on_rank0(rundir, subject, cfg.post, comm))
    return fields


def _post_on_rank0(rundir, subject, post_cfg, comm) -> dict:
    """The post-processing of the results on rank 0 alone; its summary fields on every rank."""
    from mpi4py import MPI

    fields: dict = {}
    err = None
    if comm.rank == 0:
        from glymphmpi.romt.post import postprocess

        try:
            fields = postprocess(rundir, subject, post_cfg, comm=MPI.COMM_SELF)
        except Exception as exc:  # keep the ranks together, then re-raise on rank 0
            err = exc
    if comm.size > 1:
        fields = comm.bcast(fields if err is None else None, root=0)
        if fields is None and err is None:
            raise GlymphError("post-processing failed on rank 0")
    if err is not None:
        raise err
    return fields


def solve_post(subject, cfg, rundir, comm) -> dict:
    """``glymph romt-post``: the post-processing of a finished run, seeds split over ``comm``."""
    from glymphmpi.romt.post import postprocess

    return postprocess(rundir, subject, cfg.post, comm=comm)
