#!/usr/bin/env python
"""Wall time of a 24-run pinn-select grid: parallel local processes vs one after another.

Grid: w_r in {1, 32, 64, 256} x p in {2, 1} x 3 seeds = 24 runs, each a short
PINN training on a small brain-diffusion phantom. Prints both wall times, the
speed-up and the selection (which must be the same both ways).

    .venv/bin/python benchmarks/pinn_select.py [--epochs 20] [--block 12] [--parallel 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = """
[axes]
w_r = [1.0, 32.0, 64.0, 256.0]
p_schedule = ["2", "1"]
[fixed]
epochs = {epochs}
depth = 3
width = 32
batches = 4
residual_times = 50
residual_voxels = 1000
figures = false
maps = false
checkpoint_every = 0
"""


def run(subject, out, grid, parallel):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "glymphmpi", "--quiet", "pinn-select", str(subject), "--out", str(out),
                        "--grid", str(grid), "--set", "pinn_select.seeds=3", "--set",
                        f"pinn_select.parallel={parallel}"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"pinn-select failed: {r.stderr[-2000:]}")
    return dt, json.loads((Path(out) / "selection.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--block", type=int, default=12)
    ap.add_argument("--parallel", type=int, default=0, help="processes at once (0: CPU count)")
    a = ap.parse_args()
    from glymphmpi.synth import brain_diffusion as bd

    tmp = Path(tempfile.mkdtemp(prefix="pinnsel-bench-"))
    subject = bd.write(tmp / "subj", bd.PhantomSpec(block=(a.block,) * 3, noise=0.05, dt_h=0.2), sid="bench")
    grid = tmp / "grid.toml"
    grid.write_text(GRID.format(epochs=a.epochs))
    par = a.parallel or os.cpu_count()
    t_par, sel_par = run(subject, tmp / "par", grid, par)
    t_seq, sel_seq = run(subject, tmp / "seq", grid, 1)
    print(f"24 runs ({a.epochs} epochs each, block {a.block}^3, {os.cpu_count()} CPUs)")
    print(f"  parallel ({par} processes): {t_par:8.1f} s")
    print(f"  one after another:         {t_seq:8.1f} s")
    print(f"  speed-up:                  {t_seq / t_par:8.2f} x")
    print(f"  selected (parallel): {sel_par['chosen_setup']}, D = {sel_par['D_mm2_per_h']:.4f} mm^2/h")
    print(f"  selected (serial):   {sel_seq['chosen_setup']}, D = {sel_seq['D_mm2_per_h']:.4f} mm^2/h")


if __name__ == "__main__":
    main()
