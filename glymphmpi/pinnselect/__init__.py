"""Residual-guided automatic PINN set-up (Zapf et al. 2022's open problem).

Trains a grid of PINN set-ups x seeds for one subject (local processes or a
SLURM job array) and picks the set-up with the lowest PDE residual norm among
those whose data misfit is within a tolerance of the best. The true D is
never used.
"""
