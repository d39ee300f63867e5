"""FEM optimal control: speed (1 vs 2 ranks), peak memory and accuracy on the brain phantom.

Usage::

    python benchmarks/fem_scaling.py [--sizes 24 36] [--out DIR] [--estimate] [--accuracy]

Per phantom block size (``glymph synth brain-diffusion --block N N N``) and
rank count (1, 2 via mpirun), a worker builds the mesh and times one
forward + adjoint solve (median of ``--repeats``) and, with ``--estimate``,
a whole boundary-control estimation (default config). ``--accuracy`` adds
the 36^3 accuracy table: boundary-control and data-boundary modes,
noise-free and 5% noise. Prints a table and writes ``fem_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import resource

    from mpi4py import MPI

    from glymphmpi.fem.forward import DiffusionModel, TimeGrid
    from glymphmpi.fem.mesh import build_mesh
    from glymphmpi.fem.problem import ControlProblem
    from glymphmpi.fem.solve import estimate
    from glymphmpi.fem.transfer import sample
    from glymphmpi.methods import load_config
    from glymphmpi.subject import load_subject

    comm = MPI.COMM_WORLD
    subj = load_subject(args.worker)
    cfg = load_config("fem", None, args.set)
    out = {"ranks": comm.size, "mode": cfg.mode}
    t0 = time.perf_counter()
    vm = build_mesh(subj.mask, subj.affine, comm)
    grid = TimeGrid.build(subj.times_h, cfg.dt_h)
    model = DiffusionModel(vm, grid, cfg.theta, cfg.lumped_mass, cfg.petsc_prefix, cfg.petsc_options)
    prob = ControlProblem(model, sample(subj.scans, vm.owned_voxel), cfg)
    out["setup_s"] = time.perf_counter() - t0
    x = prob.initial()
    gr = x.duplicate()
    prob.evaluate(x, gr)  # warm-up (JIT, first PC set-up)
    ts = []
    for _ in range(args.repeats):
        model._D = None  # include the per-D matrix/preconditioner rebuild, as in TAO
        comm.Barrier()
        t = time.perf_counter()
        prob.evaluate(x, gr)
        comm.Barrier()
        ts.append(time.perf_counter() - t)
    ts.sort()
    out.update(forward_adjoint_s=ts[len(ts) // 2], nodes=vm.n_nodes, boundary_nodes=vm.n_boundary,
               time_steps=grid.n_steps, controls=x.getSize())
    model.destroy()
    if args.estimate:
        comm.Barrier()
        t = time.perf_counter()
        res = estimate(subj, cfg, comm)
        out.update(estimation_s=time.perf_counter() - t, D=res.D, iterations=res.iterations,
                   evaluations=res.evaluations, reason=res.reason)
        res.model.destroy()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    out["peak_rss_mib_per_rank"] = comm.gather(rss, root=0)
    if comm.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def run_worker(subject, ranks, sets, estimate=False, repeats=3) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(subject), "--repeats", str(repeats)]
    for s in sets:
        cmd += ["--set", s]
    if estimate:
        cmd.append("--estimate")
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed ({r.returncode}): {r.stderr[-3000:]}")


def phantom(out: Path, n: int, noise: float = 0.0) -> Path:
    from glymphmpi.synth import brain_diffusion as bd

    d = out / f"phantom{n}_noise{noise:g}"
    if not (d / "subject.toml").exists():
        bd.write(d, bd.PhantomSpec(block=(n, n, n), noise=noise), sid=f"ph{n}")
    return d / "subject.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--estimate", action="store_true", help="also time a whole estimation per size/ranks")
    ap.add_argument("--accuracy", action="store_true", help="36^3 accuracy table (4 estimations)")
    ap.add_argument("--weak", action="store_true", help="with --accuracy: add the noise-free run with weak "
                    "regularisation (variable projection; about 7 min on 2 ranks)")
    ap.add_argument("--accuracy-ranks", type=int, default=2, help="ranks of the accuracy runs")
    ap.add_argument("--sizes", type=int, nargs="*", default=[24, 36])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="benchmark-output/fem")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'block':>6} {'nodes':>7} {'ranks':>5} {'fwd+adj s':>10} {'speed-up':>8} {'estim. s':>9} {'its':>4} "
          f"{'D':>8} {'peak MiB/rank':>14}")
    for n in args.sizes:
        subj = phantom(out, n)
        base = None
        for k in args.ranks:
            r = run_worker(subj, k, args.set, estimate=args.estimate, repeats=args.repeats)
            r["block"] = n
            base = base or r["forward_adjoint_s"]
            r["speedup"] = base / r["forward_adjoint_s"]
            rows.append(r)
            print(f"{n:>6} {r['nodes']:>7} {k:>5} {r['forward_adjoint_s']:>10.3f} {r['speedup']:>8.2f} "
                  f"{r.get('estimation_s', float('nan')):>9.1f} {r.get('iterations', -1):>4} "
                  f"{r.get('D', float('nan')):>8.4f} {max(r['peak_rss_mib_per_rank']):>14.0f}", flush=True)
    acc = []
    if args.accuracy:
        print(f"\naccuracy, 36^3 block, true D = 0.72 mm^2/h, {args.accuracy_ranks} rank(s)")
        # noise-free data need (almost) no regularisation: the weak-weight row uses variable projection,
        # because L-BFGS on (D, g) does not reach the minimiser there (fem/README.md)
        weak = ["fem.optimizer=projection", "fem.alpha=1e-9", "fem.beta=1e-5", "fem.gamma=1e-6",
                "fem.inner_probe=false"]
        cases = [(noise, mode, []) for noise in (0.0, 0.05) for mode in ("boundary-control", "data-boundary")]
        if args.weak:
            cases.append((0.0, "boundary-control", weak))
        for noise, mode, extra in cases:
            subj = phantom(out, 36, noise)
            r = run_worker(subj, args.accuracy_ranks, [*args.set, f"fem.mode={mode}", *extra], estimate=True,
                           repeats=1)
            r.update(noise=noise, error=r["D"] / 0.72 - 1.0, settings=extra)
            if extra:
                mode = "b.-c., weak reg."
            acc.append(r)
            print(f"  noise {noise:4.2f} {mode:>16}: D = {r['D']:.4f} ({100 * r['error']:+.1f}%), "
                  f"{r['iterations']} iterations, {r['estimation_s']:.0f} s", flush=True)
    (out / "fem_scaling.json").write_text(json.dumps({"scaling": rows, "accuracy": acc}, indent=2))
    print(f"written {out / 'fem_scaling.json'}")


if __name__ == "__main__":
    main()
