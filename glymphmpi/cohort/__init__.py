"""Cohorts and the execution backend: tasks run locally (dask) or on SLURM (sbatch jobs).

Modules, one job each: ``manifest`` (the cohort file), ``methods`` (registry methods + the file's
own commands), ``resources`` (scheduler resources and what SLURM accepts), ``tasks`` (a run, a
launch's settings, the plan), ``ledger`` (state.json records), ``state`` (status of a run, the
status table; knows no scheduler), ``launcher`` (what both launchers share), ``local`` and
``slurm`` (the launchers), ``jobscript`` (rendering ``jobs/*.sbatch``), ``sbatch`` (SLURM
commands), ``environment`` (a child run's environment), ``cli`` (``glymph cohort``, the reports).
pinn-select runs its grid on the same launchers.

Light at import: dask and distributed are imported inside the launchers.
"""
