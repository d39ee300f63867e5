"""``glymph fem SUBJECT.toml --out DIR [--set fem.key=value]`` (under mpirun -n K for MPI)."""

from __future__ import annotations


def register(subparsers) -> None:
    from glymphmpi.runner import add_run_args

    p = subparsers.add_parser("fem", help="FEM optimal control (DOLFINx + PETSc TAO over MPI): D and "
                                          "boundary concentration")
    add_run_args(p)
    p.set_defaults(func=_cmd_fem)


def _cmd_fem(args) -> int:
    from glymphmpi.errors import require

    require("dolfinx", "the FEM method (glymph fem)")
    from mpi4py import MPI

    from glymphmpi.fem.solve import solve
    from glymphmpi.runner import run_method

    run_method("fem", args, solve, comm=MPI.COMM_WORLD)
    return 0
