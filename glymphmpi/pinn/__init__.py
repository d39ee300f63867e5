"""Physics-informed neural network estimate of the diffusion coefficient (Zapf et al. 2022).

Modules: ``config`` (PinnConfig, light), ``network`` (c(x, t), D(delta), forward
Laplacian), ``losses``, ``samplers`` (interior PDE points, RAR, RAE),
``diagnostics`` (r(t), residual norm), ``distributed`` (device, process group),
``trainer`` (data scaling, automatic schedule, DDP training, checkpoints,
ensembles, convergence and summary fields), ``run`` (the registry's
``communicator`` and ``solve``),
``analytic`` (heat-kernel test problem). torch is imported only by these
modules, never by ``import glymphmpi``.
"""

from glymphmpi.parallel import passive_omp_threads

OMP_PASSIVE = passive_omp_threads()
"""Whether PyTorch's OpenMP threads sleep between parallel regions in this process (set here, before any
module of this package imports torch; see :func:`glymphmpi.parallel.passive_omp_threads`)."""
