"""``glymph romt SUBJECT --out DIR [--mode sequential|parallel] [--no-post] ...`` (light module)."""

from __future__ import annotations


def register(subparsers) -> None:
    from glymphmpi.runner import add_run_args

    p = subparsers.add_parser(
        "romt", help="regularized optimal mass transport velocities (run under mpirun -n K for MPI)",
        description="rOMT (Chen et al.): velocity fields moving each scan to the next with least "
                    "kinetic energy under advection-diffusion. Under mpirun, parallel mode spreads "
                    "the loops over the ranks; sequential mode splits each loop's particles.")
    add_run_args(p)
    p.add_argument("--mode", choices=("sequential", "parallel"),
                   help="overrides romt.mode: chain loops (sequential) or start each from its scan")
    p.add_argument("--no-post", action="store_true", help="skip the post-processing (maps, figures, VTK)")
    p.set_defaults(func=_cmd_romt)


def _cmd_romt(args) -> int:
    from glymphmpi.parallel import launcher_env
    from glymphmpi.runner import run_method

    comm = None
    if launcher_env()["world_size"] > 1:
        from glymphmpi.parallel import world

        comm = world()
    if args.mode:
        args.set = [*args.set, f"romt.mode={args.mode}"]

    def solve(subject, cfg, rundir, comm):
        from glymphmpi.romt.solve import run

        fields = run(subject, cfg, rundir, comm)
        if not args.no_post:
            fields.update(_post(args, rundir, subject, comm))
        return fields

    run_method("romt", args, solve, comm)
    return 0


def _post(args, rundir, subject, comm) -> dict:
    """The post-processing of the results (rank 0), its summary fields on every rank."""
    from glymphmpi.config import load_config

    cfg = load_config("romt_post", args.config, args.set)
    fields: dict = {}
    err = None
    if rundir.rank == 0:
        from glymphmpi.romt.post import postprocess

        try:
            fields = postprocess(rundir, subject, cfg)
        except Exception as exc:  # keep the ranks together, then re-raise on rank 0
            err = exc
    if comm is not None and comm.size > 1:
        fields = comm.bcast(fields if err is None else None, root=0)
        if fields is None and err is None:
            from glymphmpi.errors import GlymphError

            raise GlymphError("post-processing failed on rank 0")
    if err is not None:
        raise err
    return fields
