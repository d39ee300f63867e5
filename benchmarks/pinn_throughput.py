"""PDE-residual points per second, forward + backward, glymphmpi's PINN vs DeepXDE.

Both sides build the same fully connected tanh network (4 inputs, ``depth``
hidden layers of ``width``, 1 output; Glorot-normal weights, zero biases),
evaluate the residual dc/dt - D lap c of the diffusion equation at the same
points and back-propagate the mean squared residual to all weights. Timed:
one forward + backward per repetition, the three interleaved, after a
warm-up; best and median of ``--reps`` (best is the robust figure on a
machine shared with other work).

* glymphmpi: forward propagation of value, gradient and Laplacian
  (:meth:`glymphmpi.pinn.network.PinnNet.derivatives`);
* glymphmpi-autograd: the reverse-mode reference (``derivatives_autograd``);
* DeepXDE (``DDE_BACKEND=pytorch``): ``dde.nn.FNN`` with
  ``dde.grad.jacobian``/``dde.grad.hessian`` as in its PDE examples.

Usage: ``python benchmarks/pinn_throughput.py [--points 8192] [--depth 6] [--width 64]
[--device cpu|cuda] [--dtype float32|float64] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("DDE_BACKEND", "pytorch")


def _time_interleaved(fns: dict, reps: int, sync) -> dict:
    """Seconds per call of each function: fastest and median of ``reps``, the functions interleaved
    (A B C A B C ...) so that load from other processes hits all of them alike."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t0)
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
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from glymphmpi.pinn.network import PinnNet, derivatives_autograd

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    D = 0.7
    torch.manual_seed(0)
    lo, hi = [-50.0, -60.0, -40.0, 0.0], [50.0, 60.0, 40.0, 46.0]
    x = (torch.rand(args.points, 4, dtype=torch.float64) * (torch.tensor(hi) - torch.tensor(lo))
         + torch.tensor(lo)).to(dev, dtype)

    ours = PinnNet(args.depth, args.width, "tanh", lo, hi).to(dev, dtype)
    ours_c = PinnNet(args.depth, args.width, "tanh", lo, hi, compiled=True).to(dev, dtype)
    ours_c.load_state_dict(ours.state_dict())

    def step_ours():
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
    fns = {"glymphmpi": step_ours, "glymphmpi_compiled": step_compiled, "glymphmpi_autograd": step_autograd}
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
    n = args.points
    print(f"PDE-residual points/s, forward + backward, {args.depth} x {args.width} tanh, {n} points, "
          f"{args.dtype} on {dev} ({res['threads']} threads)")
    for key, label in (("glymphmpi_s", "glymphmpi (forward Laplacian)"),
                       ("glymphmpi_compiled_s", "glymphmpi (forward Laplacian, torch.compile)"),
                       ("glymphmpi_autograd_s", "glymphmpi (reverse-mode reference)"),
                       ("deepxde_s", f"DeepXDE {res.get('deepxde')} (pytorch backend)")):
        if key in res:
            res[key.replace("_s", "_points_per_s")] = n / res[key]
            med = res[key.replace("_s", "_median_s")]
            print(f"  {label:45s} {n / res[key]:12.0f} points/s best, {n / med:10.0f} median "
                  f"({res[key] * 1e3:.1f} ms/step best)")
    if "deepxde_s" in res:
        res["speedup_vs_deepxde"] = res["deepxde_s"] / res["glymphmpi_s"]
        res["speedup_vs_deepxde_median"] = res["deepxde_median_s"] / res["glymphmpi_median_s"]
        print(f"  speed-up over DeepXDE: {res['speedup_vs_deepxde']:.2f}x best-of-{args.reps}, "
              f"{res['speedup_vs_deepxde_median']:.2f}x median (target >= 2x)")
        if "glymphmpi_compiled_s" in res:
            res["speedup_compiled_vs_deepxde"] = res["deepxde_s"] / res["glymphmpi_compiled_s"]
            res["speedup_compiled_vs_deepxde_median"] = (res["deepxde_median_s"]
                                                         / res["glymphmpi_compiled_median_s"])
            print(f"  speed-up over DeepXDE with torch.compile: {res['speedup_compiled_vs_deepxde']:.2f}x "
                  f"best, {res['speedup_compiled_vs_deepxde_median']:.2f}x median "
                  f"(one-off compile {res['compile_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
