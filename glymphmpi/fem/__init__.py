"""FEM optimal control (Valnes et al. 2020): D and the boundary concentration from MRI.

DOLFINx 0.5 + PETSc (KSP, TAO) over MPI. Heavy imports happen inside the
modules' functions; ``glymphmpi.fem.config`` is light.
"""
