"""Process-level tuning of the rOMT solver: the BLAS thread pool (the allocator: glymphmpi.parallel.tune_malloc)."""

from __future__ import annotations

import contextlib


def single_threaded_blas():
    """BLAS (only used for dot products here) on one thread: OpenBLAS threads spin and
    steal the cores from scipy.fft and from other ranks. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/nilearn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
