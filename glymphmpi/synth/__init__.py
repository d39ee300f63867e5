"""Synthetic subjects: the rOMT paper's Gaussian spheres and a brain diffusion phantom."""
