"""PDE-residual points per second, forward + backward, glymphmpi's PINN vs DeepXDE.

Both sides build the same fully connected tanh network (4 inputs, ``depth``
hidden layers of ``width``, 1 output; Glorot-normal weights, zero biases),
evaluate the residual dc/dt - D lap c of the diffusion equation at the same
points and back-propagate the mean squared residual to all weights. Timed:
one forward + backward per repetition, the three interleaved, after a
warm-up; best and median of ``--reps`` (best is the robust figure on a
machine shared with other work).

* glymphmpi: forward propagation of value, gradient and the residual stream
  (:meth:`glymphmpi.pinn.network.PinnNet.residual_streams`, what the trainer runs; the
  ``glymphmpi_six`` variant propagates c_t and the Laplacian separately, ``derivatives``);
* glymphmpi-autograd: the reverse-mode reference (``derivatives_autograd``);
* DeepXDE (``DDE_BACKEND=pytorch``): ``dde.nn.FNN`` with
  ``dde.grad.jacobian``/``dde.grad.hessian`` as in its PDE examples.

Usage: ``python benchmarks/pinn_throughput.py [--points 8192] [--depth 6] [--width 64]
[--device cpu|cuda] [--dtype float32|float64] [--json OUT]``. DeepXDE is the ``bench`` extra, not
installed by ``make install``: ``bash hpc/install.sh --extras all,bench`` adds it to ``.venv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("DDE_BACKEND", "pytorch")


CPU_TIMES: dict = {}
"""CPU seconds per call of the last :func:`_time_interleaved` (name -> (fastest, median)): on a loaded
machine the wall time of a call includes the time other processes held the core, its CPU time does not
(one thread: the work of the call itself)."""


def _time_interleaved(fns: dict, reps: int, sync) -> dict:
    """Seconds per call of each function: fastest and median of ``reps``, the functions interleaved
    (A B C A B C ...) so that load from other processes hits all of them alike; the CPU seconds per
    call go to :data:`CPU_TIMES`."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    cs = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t0)
            cs[k].append(time.process_time() - c0)
    CPU_TIMES.clear()
    CPU_TIMES.update({k: (min(v), statistics.median(v)) for k, v in cs.items()})
    return {k: (min(v), statistics.median(v)) for k, v in ts.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variant")
    ap.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch comparison")
    ap.add_argument("--epoch-block", type=int, default=16, help="ball mask edge (voxels) of the epoch comparison")
    ap.add_argument("--epoch-reps", type=int, default=5)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    # isort: off
    import glymphmpi.pinn  # before torch: what the trainer gets (OMP_WAIT_POLICY, see passive_omp_threads)
    import torch
    # isort: on

    from glymphmpi.pinn.network import PinnNet, derivatives_autograd

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    malloc_tuned = False
    if dev.type == "cpu":  # what the trainer does on the CPU; DeepXDE, in this process, gets it too
        from glymphmpi.parallel import tune_malloc

        malloc_tuned = tune_malloc()
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    D = 0.7
    torch.manual_seed(0)
    lo, hi = [-50.0, -60.0, -40.0, 0.0], [50.0, 60.0, 40.0, 46.0]
    x = (torch.rand(args.points, 4, dtype=torch.float64) * (torch.tensor(hi) - torch.tensor(lo))
         + torch.tensor(lo)).to(dev, dtype)

    ours = PinnNet(args.depth, args.width, "tanh", lo, hi).to(dev, dtype)
    ours_c = PinnNet(args.depth, args.width, "tanh", lo, hi, compiled=True).to(dev, dtype)
    ours_c.load_state_dict(ours.state_dict())

    Dt = torch.tensor(D, dtype=dtype, device=dev)

    def step_ours():  # what the trainer runs: one residual stream R = c_t - D lap c
        _, r = ours.residual_streams(x, Dt)
        (r ** 2).mean().backward()

    def step_six():  # c_t and lap c as separate streams (PinnNet.derivatives)
        _, ct, lap = ours.derivatives(x)
        ((ct - D * lap) ** 2).mean().backward()

    def step_compiled():
        _, ct, lap = ours_c.derivatives(x)
        ((ct - D * lap) ** 2).mean().backward()

    def step_autograd():
        _, ct, lap = derivatives_autograd(ours, x)
        ((ct - D * lap) ** 2).mean().backward()

    res = {"points": args.points, "depth": args.depth, "width": args.width, "device": str(dev),
           "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__}
    fns = {"glymphmpi": step_ours, "glymphmpi_six": step_six, "glymphmpi_compiled": step_compiled,
           "glymphmpi_autograd": step_autograd}
    if args.no_compile:
        fns.pop("glymphmpi_compiled")
    else:
        t0 = time.perf_counter()
        step_compiled()
        res["compile_s"] = time.perf_counter() - t0
    try:
        import deepxde as dde

        res["deepxde"] = dde.__version__
        if args.dtype == "float64":
            dde.config.set_default_float("float64")
        net = dde.nn.FNN([4] + [args.width] * args.depth + [1], "tanh", "Glorot normal").to(dev, dtype)
        scale = (2.0 / (torch.tensor(hi) - torch.tensor(lo))).to(dev, dtype)
        shift = torch.tensor(lo).to(dev, dtype)
        net.apply_feature_transform(lambda z: (z - shift) * scale - 1.0)  # same input scaling as ours

        def step_dde():
            xx = x.detach().requires_grad_(True)
            y = net(xx)
            ct = dde.grad.jacobian(y, xx, i=0, j=3)
            lap = sum(dde.grad.hessian(y, xx, i=j, j=j) for j in range(3))
            ((ct - D * lap) ** 2).mean().backward()
            dde.grad.clear()

        fns["deepxde"] = step_dde
    except ImportError as exc:
        res["deepxde"] = f"not installed ({exc})"
    for k, (best, med) in _time_interleaved(fns, args.reps, sync).items():
        res[f"{k}_s"], res[f"{k}_median_s"] = best, med
        res[f"{k}_cpu_s"], res[f"{k}_cpu_median_s"] = CPU_TIMES[k]
    n = args.points
    from glymphmpi.pinn import network

    res["allocator_tuned"] = malloc_tuned
    res["onednn_products"] = bool(network._ONEDNN[0])
    res["omp_passive"] = glymphmpi.pinn.OMP_PASSIVE
    print(f"PDE-residual points/s, forward + backward, {args.depth} x {args.width} tanh, {n} points, "
          f"{args.dtype} on {dev} ({res['threads']} threads; malloc tuned: {res['allocator_tuned']}, "
          f"oneDNN products: {res['onednn_products']}, OpenMP threads passive: {res['omp_passive']})")
    labels = {"glymphmpi": "glymphmpi (forward residual stream, default)",
              "glymphmpi_six": "glymphmpi (c_t and Laplacian streams)",
              "glymphmpi_compiled": "glymphmpi (c_t and Laplacian, torch.compile)",
              "glymphmpi_autograd": "glymphmpi (reverse-mode reference)",
              "deepxde": f"DeepXDE {res.get('deepxde')} (pytorch backend)"}
    for k, label in labels.items():
        if f"{k}_s" in res:
            best, med = res[f"{k}_s"], res[f"{k}_median_s"]
            res[f"{k}_points_per_s"] = n / best
            print(f"  {label:45s} {n / best:12.0f} points/s best, {n / med:10.0f} median "
                  f"({best * 1e3:.1f} ms/step best)")
    if "deepxde_s" in res:
        res["speedup_vs_deepxde"] = res["deepxde_s"] / res["glymphmpi_s"]
        res["speedup_vs_deepxde_median"] = res["deepxde_median_s"] / res["glymphmpi_median_s"]
        print(f"  speed-up over DeepXDE: {res['speedup_vs_deepxde']:.2f}x best-of-{args.reps}, "
              f"{res['speedup_vs_deepxde_median']:.2f}x median (target >= 2x median)")
        res["speedup_vs_deepxde_cpu_median"] = res["deepxde_cpu_median_s"] / res["glymphmpi_cpu_median_s"]
        print(f"  in CPU time per call (robust to load; {res['threads']} thread(s)): "
              f"{res['deepxde_cpu_s'] / res['glymphmpi_cpu_s']:.2f}x best, "
              f"{res['speedup_vs_deepxde_cpu_median']:.2f}x median; load average {os.getloadavg()[0]:.1f}")
        if "glymphmpi_compiled_s" in res:
            res["speedup_compiled_vs_deepxde"] = res["deepxde_s"] / res["glymphmpi_compiled_s"]
            res["speedup_compiled_vs_deepxde_median"] = (res["deepxde_median_s"]
                                                         / res["glymphmpi_compiled_median_s"])
            print(f"  speed-up over DeepXDE with torch.compile (not the default): "
                  f"{res['speedup_compiled_vs_deepxde']:.2f}x best, "
                  f"{res['speedup_compiled_vs_deepxde_median']:.2f}x median (one-off compile {res['compile_s']:.0f} s)")
    if not args.no_epoch:
        res["epoch"] = epoch_benchmark(args, dev, dtype, sync)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


def epoch_benchmark(args, dev, dtype, sync) -> dict:
    """One training epoch with the default settings, glymphmpi's trainer vs the same epoch written with
    DeepXDE's network, derivatives and optimizer.

    glymphmpi: :meth:`glymphmpi.pinn.trainer.Trainer.run_epoch` with the default ``PinnConfig`` (automatic
    minibatches of about 512 data points and as many PDE points, p = 1, fused Adam, learning-rate
    decay; the data and the PDE points in one pass through the network), on a ball-shaped mask of
    ``--epoch-block``^3 voxels (1 mm) at 4 scan times.
    DeepXDE: the same minibatches (same permutations), ``dde.nn.FNN`` with the same input scaling,
    ``dde.grad.jacobian`` / ``dde.grad.hessian`` for c_t and the Laplacian, D = 0.1 + 1.2 sigmoid(delta)
    trainable, loss mean squared data misfit + mean |residual|, DeepXDE's Adam
    (``deepxde.optimizers.pytorch.optimizers.get``), one ``zero_grad / backward / step`` per minibatch
    as in DeepXDE's ``Model._train_step``. DeepXDE's own ``Model.train`` trains on the full point set
    (no minibatches), so the minibatch loop is written here.
    """
    import numpy as np
    import torch

    from glymphmpi.pinn.config import PinnConfig
    from glymphmpi.pinn.trainer import Trainer, build_problem

    nb = args.epoch_block
    ijk = np.indices((nb,) * 3).reshape(3, -1).T - (nb - 1) / 2
    mask = (np.linalg.norm(ijk, axis=1) <= nb / 2 - 0.5).reshape((nb,) * 3)
    times = np.array([0.0, 7.0, 24.0, 46.0])
    rng = np.random.default_rng(0)
    scans = rng.uniform(0.0, 1.0, (times.size,) + mask.shape) * mask
    problem = build_problem(scans, mask, np.eye(4), times)
    cfg = PinnConfig(dtype=args.dtype, epochs=1000, delta_freeze_epochs=0, ensemble=1)  # defaults otherwise
    tr = Trainer(problem, cfg)
    cfg = tr.cfg
    nd = problem.data_c.size
    out = {"data_points": int(nd), "pde_points": int(tr.pde.shape[0]), "batches": cfg.batches}
    fns = {"glymphmpi": tr.run_epoch}
    try:
        os.environ.setdefault("DDE_BACKEND", "pytorch")
        import deepxde as dde
        from deepxde.optimizers.pytorch import optimizers as dde_opt
    except ImportError as exc:
        print(f"epoch: DeepXDE is not installed ({exc}); glymphmpi's epoch only")
        dde = None
    if dde is not None:
        net = dde.nn.FNN([4] + [args.width] * args.depth + [1], "tanh", "Glorot normal").to(dev, dtype)
        lo = torch.as_tensor(problem.lo, dtype=dtype, device=dev)
        scale = (2.0 / torch.as_tensor(problem.hi - problem.lo, dtype=dtype, device=dev))
        net.apply_feature_transform(lambda z: (z - lo) * scale - 1.0)
        delta = torch.nn.Parameter(torch.tensor(cfg.delta0, dtype=dtype, device=dev))
        opt, _ = dde_opt.get(list(net.parameters()) + [delta], "adam", learning_rate=cfg.lr_start)
        xd, cd = tr.data_xt.to(dev), tr.data_c.to(dev)
        xp = tr.pde.to(dev)
        out_scale = float(problem.out_scale)
        gen = torch.Generator().manual_seed(0)

        def dde_epoch():
            dperm = torch.randperm(nd, generator=gen)
            pperm = torch.randperm(xp.shape[0], generator=gen)
            for db, pb in zip(torch.tensor_split(dperm, cfg.batches), torch.tensor_split(pperm, cfg.batches)):
                opt.zero_grad()
                c = net(xd[db]).squeeze(-1) * out_scale
                xx = xp[pb].detach().requires_grad_(True)
                y = net(xx) * out_scale
                ct = dde.grad.jacobian(y, xx, i=0, j=3)
                lap = sum(dde.grad.hessian(y, xx, i=j, j=j) for j in range(3))
                D = cfg.d_min + torch.sigmoid(delta) * cfg.d_max
                loss = ((c - cd[db]) ** 2).mean() + (ct - D * lap).abs().mean()
                loss.backward()
                opt.step()
                dde.grad.clear()

        fns["deepxde"] = dde_epoch
    for k, (best, med) in _time_interleaved(fns, args.epoch_reps, sync).items():
        out[f"{k}_s"], out[f"{k}_median_s"] = best, med
        out[f"{k}_cpu_s"], out[f"{k}_cpu_median_s"] = CPU_TIMES[k]
    print(f"\nOne training epoch, default settings: {nd} data points + {out['pde_points']} PDE points in "
          f"{cfg.batches} minibatches (data, PDE residual, loss, backward, optimizer step), {args.dtype}")
    for k, label in (("glymphmpi", "glymphmpi Trainer.run_epoch"),
                     ("deepxde", "DeepXDE network + dde.grad + its Adam")):
        if f"{k}_s" in out:
            print(f"  {label:45s} {out[f'{k}_s']:8.3f} s/epoch best, {out[f'{k}_median_s']:8.3f} median")
    if "deepxde_s" in out:
        out["speedup_vs_deepxde"] = out["deepxde_s"] / out["glymphmpi_s"]
        out["speedup_vs_deepxde_median"] = out["deepxde_median_s"] / out["glymphmpi_median_s"]
        print(f"  epoch speed-up over DeepXDE: {out['speedup_vs_deepxde']:.2f}x best-of-{args.epoch_reps}, "
              f"{out['speedup_vs_deepxde_median']:.2f}x median (target >= 2x median)")
        out["speedup_vs_deepxde_cpu_median"] = out["deepxde_cpu_median_s"] / out["glymphmpi_cpu_median_s"]
        print(f"  in CPU time per epoch (robust to load): {out['deepxde_cpu_s'] / out['glymphmpi_cpu_s']:.2f}x best, "
              f"{out['speedup_vs_deepxde_cpu_median']:.2f}x median; load average {os.getloadavg()[0]:.1f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
