"""MR signal to tracer concentration (pure numpy).

Three routes (docs/architecture.md, issue 14):

* ``t1map``: C = (1/r1) (1/T1 - 1/T1_0), T1 maps in seconds, T1_0 from the baseline session.
* ``t1w``: spoiled gradient echo (SPGR/FLASH) steady state,
  S = M0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR/T1); M0 per voxel from the baseline
  T1w and a baseline T1 (map, or an assumed T1_0: flagged), then T1 per voxel and session in
  closed form, then C as for ``t1map``.
* ``enhancement``: relative signal enhancement (S - S_0)/S_0, only proportional to
  concentration (not in mmol/L).

:mod:`.signal` holds the equations, :mod:`.relaxivity` the r1 table, :mod:`.routes` the
conversion of whole series with clipping counted and every assumption recorded.
"""

from .relaxivity import R1_TABLE, lookup_r1, normalise_agent
from .routes import ROUTES, Conversion, convert_enhancement, convert_t1map, convert_t1w
from .signal import spgr_m0, spgr_signal, spgr_t1

__all__ = ["R1_TABLE", "lookup_r1", "normalise_agent", "ROUTES", "Conversion", "convert_t1map",
           "convert_t1w", "convert_enhancement", "spgr_signal", "spgr_m0", "spgr_t1"]
