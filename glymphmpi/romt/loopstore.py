"""Finished-loop files and per-group checkpoints of an rOMT run directory.

A finished loop is written to ``OUT/romt_loops/loop_XXX.h5`` by its group's
first rank (float64 end density included, so that a resumed sequential run
continues bit-for-bit); after every Gauss-Newton iteration the group's state
(full velocity of the loop in progress, history, counters) goes to its
checkpoint file (``checkpoint.h5`` with one group, ``checkpoint.groupGofN.h5``
with N). Every file carries the :func:`config_key` of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from glymphmpi.errors import InputError
from glymphmpi.romt.config import RomtConfig

log = logging.getLogger(__name__)

NUMERIC_KEYS = ("nt", "dt", "sigma", "beta", "gamma", "boundary", "mode", "warm_start", "coupled_rtol", "model",
                "alpha", "source_time", "source_mask",
                "max_iterations", "gn_gtol", "gn_ftol", "gn_tol", "pcg_max_iterations", "pcg_rtol", "ls_max_halvings",
                "armijo_c", "init",
                "mask_dilation", "mask_images", "crop_margin", "smooth_sigma_voxels")


def config_key(cfg: RomtConfig) -> str:
    """Hash of the settings that change the numbers (not threads or checkpoint frequency)."""
    from glymphmpi.romt.scale import METHOD

    d = {k: getattr(cfg, k) for k in NUMERIC_KEYS}
    d["normalisation"] = METHOD
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class LoopStore:
    """Finished-loop files and per-group checkpoints in a run directory.

    Args:
        rundir: the run directory (``.root``).
        key: :func:`config_key` of the run (a mismatch on resume is an error).
        every: checkpoint every this many GN iterations.
    """

    def __init__(self, rundir, key: str, every: int = 1, min_interval_s: float = 0.0):
        self.rundir = rundir
        self.key = key
        self.every = every
        self.min_interval_s = min_interval_s
        self.dir = Path(rundir.root) / "romt_loops"

    def loop_path(self, k: int) -> Path:
        return self.dir / f"loop_{k:03d}.h5"

    def load_loop(self, k: int) -> dict | None:
        from glymphmpi.io import read_h5_tree

        p = self.loop_path(k)
        if not p.exists():
            return None
        try:
            tree, attrs = read_h5_tree(p)
        except InputError:  # refused (not the typed layout: e.g. a planted pickle): stop, never skip
            raise
        except Exception as exc:  # a damaged file: recompute the loop
            log.warning("%s: unreadable (%s); recomputing loop %d", p, exc, k)
            return None
        if attrs.get("config_key") != self.key:
            raise InputError("finished loop from a different configuration; use --fresh", p)
        return tree

    def save_loop(self, k: int, res: dict, writer: bool) -> None:
        from glymphmpi.io import write_h5_tree

        if writer:
            write_h5_tree(self.loop_path(k), res, {"config_key": self.key, "loop": k}, compress=False)

    def checkpointer(self, name: str, comm):
        return self.rundir.checkpointer(every=self.every, name=name, comm=comm, min_interval_s=self.min_interval_s)

    def states(self) -> dict:
        """Loop index -> newest saved in-progress state, over every checkpoint file."""
        from glymphmpi.io import read_h5_tree
        from glymphmpi.store.checkpoint import check_identity

        best: dict = {}
        for p in sorted(Path(self.rundir.root).glob("checkpoint*.h5")):
            try:
                tree, attrs = read_h5_tree(p)
                check_identity(p, attrs, getattr(self.rundir, "identity", None))
            except InputError:  # refused (a planted pickle, another run's file): stop, never skip
                raise
            except Exception as exc:
                log.warning("%s: unreadable checkpoint (%s); ignored", p, exc)
                continue
            st = tree["state"]
            if st.get("config_key") != self.key:
                raise InputError("checkpoint from a different configuration; use --fresh", p)
            k = int(st["loop"])
            if k not in best or int(st["iterations"]) > int(best[k]["iterations"]):
                best[k] = st
        return best

    def forget_loops(self) -> None:
        """Remove the finished-loop files (``--fresh``)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def cleanup(self) -> None:
        for p in Path(self.rundir.root).glob("checkpoint*.h5"):
            p.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
