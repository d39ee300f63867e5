"""Process-level tuning of the rOMT solver: the allocator and the BLAS thread pool."""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``) instead of returning it.

    The solver makes many short-lived arrays of 1-100 MB; by default glibc
    maps each with mmap and unmaps it on free, so every step pays page faults
    for fresh memory (measured: the linearisation, tangent weights and
    adjoint gather ran 3-4x slower, mostly in the kernel). Raising the mmap
    and trim thresholds makes the heap reuse that memory. Process-wide, once;
    returns False where glibc is not present (nothing changes then).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: allocator left as it is")
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1) \
        and mallopt(m_top_pad, 64 << 20)
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def single_threaded_blas():
    """BLAS (only used for dot products here) on one thread: OpenBLAS threads spin and
    steal the cores from scipy.fft and from other ranks. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/nilearn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
