"""File I/O of the core layer: atomic writes, typed HDF5 trees, NIfTI and VTK writers.

Modules:
    atomic  write-to-temporary, fsync, rename (a kill leaves the old or the new file)
    h5      HDF5 trees with a typed, explicit layout (no pickle); collective row-block writes
    nifti   NIfTI writer
    vtk     VTK XML PolyData writer and reader (ParaView)

The names below are the public API; ``glymphmpi.io.vtk`` is imported as a module.
"""

from glymphmpi.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from glymphmpi.io.h5 import (
    UnsafeFileError,
    parallel_h5_available,
    read_h5_attrs,
    read_h5_tree,
    write_h5_collective,
    write_h5_tree,
)
from glymphmpi.io.nifti import write_nifti

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_json",
    "UnsafeFileError", "parallel_h5_available", "read_h5_attrs", "read_h5_tree", "write_h5_collective", "write_h5_tree",
    "write_nifti",
]
