"""``glymph pinn SUBJECT.toml --out DIR [--set pinn.key=value ...]`` (light module).

Runs on one process, or data-parallel under ``torchrun``, ``srun`` or
``mpirun`` (rank and world size from the launcher's environment).
"""

from __future__ import annotations


def register(subparsers) -> None:
    from glymphmpi.runner import add_run_args

    p = subparsers.add_parser(
        "pinn", help="physics-informed neural network estimate of D (torchrun/srun/mpirun for DDP)",
        description="Fit c(x, t) and D to the scans with a PINN (Zapf et al. 2022); writes summary.json, "
                    "results.h5, maps/ and figures/ in --out. Several processes (torchrun, srun, "
                    "mpirun) train data-parallel.")
    add_run_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from glymphmpi.errors import require

    require("torch", "the PINN method", "pinn")
    from glymphmpi.pinn.run import main

    return main(args)
