"""Cohorts: manifest, local and SLURM launchers (dask-jobqueue), sbatch rendering, status.

Light at import: dask and distributed are imported inside the launchers.
"""
