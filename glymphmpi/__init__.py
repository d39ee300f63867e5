"""glymphmpi: molecular transport in the brain from contrast-enhanced MRI.

Three methods (rOMT, FEM optimal control, PINNs) over MPI, GPUs and SLURM.
Importing this package is light: it never imports torch, dolfinx or dask.
"""

__version__ = "0.1.0"

from glymphmpi.errors import InputError, MissingDependency, Preempted  # noqa: E402

__all__ = ["__version__", "InputError", "MissingDependency", "Preempted"]
