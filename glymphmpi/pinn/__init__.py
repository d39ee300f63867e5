"""Physics-informed neural network estimate of the diffusion coefficient (Zapf et al. 2022).

Modules: ``config`` (PinnConfig, light), ``network`` (c(x, t), D(delta), forward
Laplacian), ``losses``, ``samplers`` (interior PDE points, RAR, RAE),
``diagnostics`` (r(t), residual norm), ``distributed`` (device, process group),
``trainer`` (DDP training, checkpoints, ensembles), ``run`` (the CLI command),
``analytic`` (heat-kernel test problem). torch is imported only by these
modules, never by ``import glymphmpi``.
"""
