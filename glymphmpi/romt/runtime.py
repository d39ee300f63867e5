"""Process-level tuning of the rOMT solver: the allocator and the BLAS thread pool."""

from __future__ import annotations

import contextlib
import logging

from glymphmpi.parallel import tune_malloc  # noqa: F401 - the allocator setting, shared with the PINN

log = logging.getLogger(__name__)

def single_threaded_blas():
    """BLAS (only used for dot products here) on one thread: OpenBLAS threads spin and
    steal the cores from scipy.fft and from other ranks. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/nilearn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
