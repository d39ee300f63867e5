"""``glymph pinn-select SUBJECT --out DIR [--grid GRID.toml] [--scheduler local|slurm]`` (light)."""

from __future__ import annotations


def register(subparsers) -> None:
    from glymphmpi.runner import add_run_args

    p = subparsers.add_parser(
        "pinn-select", help="train a grid of PINN set-ups and pick the lowest-residual one",
        description="Trains a grid of PINN set-ups (default: w_r in {1,32,64,256}, p in {2, 2->1, 1}, two "
                    "learning-rate schedules, with/without RAR) x seeds, locally or as a SLURM job array, and "
                    "selects the set-up with the lowest PDE residual among those whose data misfit is within "
                    "a tolerance of the best. Re-runs train only what is not complete.")
    add_run_args(p)
    p.add_argument("--grid", help="grid TOML ([axes] and [fixed] tables); default: the paper's grid")
    p.add_argument("--scheduler", choices=("local", "slurm"), default="local")
    p.add_argument("--fem", help="an FEM run directory whose D to show beside the selection")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from glymphmpi.errors import require

    require("torch", "pinn-select", "pinn")
    from glymphmpi.pinnselect.run import main

    return main(args)
