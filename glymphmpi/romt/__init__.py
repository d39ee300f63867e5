"""Regularized optimal mass transport (rOMT, Chen et al.): grid operators,
particle-in-cell transport, Gauss-Newton solver, loop scheduling over MPI
ranks. Light at import: submodules load numpy/scipy only when imported."""
