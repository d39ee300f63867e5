"""`glymph info`: what the environment has, and what is missing."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys


def _version(module: str):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return mod, getattr(mod, "__version__", "present")


def _cmd_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "present"
    except (OSError, subprocess.SubprocessError):
        return "present (version unknown)"


def _slurm_state() -> str:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T %D"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"commands present; sinfo failed ({exc})"
    if out.returncode != 0:
        return "commands present; no SLURM controller reachable (hpc/slurm/up.sh starts a local one)"
    parts = ", ".join(line.strip() for line in out.stdout.splitlines()[:4])
    return f"controller up: {parts}"


def environment_report() -> dict:
    rep: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                 "platform": platform.platform(), "missing": []}
    np_mod, rep["numpy"] = _version("numpy")
    if np_mod is not None and not rep["numpy"].startswith("1."):
        rep["missing"].append(f"numpy<2 (found {rep['numpy']}; Debian's petsc4py needs numpy 1)")

    mpi_mod, _ = _version("mpi4py")
    if mpi_mod is None:
        rep["mpi"] = None
        rep["missing"].append("mpi4py (apt install python3-mpi4py)")
    else:
        from mpi4py import MPI

        rep["mpi"] = {"mpi4py": mpi_mod.__version__, "library": MPI.Get_library_version().splitlines()[0],
                      "ranks": MPI.COMM_WORLD.size, "rank": MPI.COMM_WORLD.rank}
    rep["mpirun"] = _cmd_version(["mpirun", "--version"])
    if rep["mpirun"] is None:
        rep["missing"].append("mpirun (apt install openmpi-bin)")

    petsc, ver = _version("petsc4py")
    if petsc is None:
        rep["petsc"] = None
        rep["missing"].append(f"petsc4py (apt install python3-petsc4py-real): {ver}")
    else:
        from petsc4py import PETSc

        v = PETSc.Sys.getVersion()
        rep["petsc"] = {"petsc4py": ver, "petsc": ".".join(map(str, v)),
                        "scalar": str(PETSc.ScalarType.__name__ if hasattr(PETSc.ScalarType, "__name__")
                                      else PETSc.ScalarType)}
    dfx, ver = _version("dolfinx")
    rep["dolfinx"] = ver if dfx is not None else None
    if dfx is None:
        rep["missing"].append(f"dolfinx (apt install python3-dolfinx-real): {ver}")

    h5, ver = _version("h5py")
    if h5 is None:
        rep["h5py"] = None
        rep["missing"].append("h5py (apt install python3-h5py-mpi)")
    else:
        rep["h5py"] = {"version": ver, "mpi": bool(h5.get_config().mpi),
                       "hdf5": h5.version.hdf5_version}

    torch, ver = _version("torch")
    if torch is None:
        rep["torch"] = None
        rep["missing"].append("torch (pip install 'glymphmpi[pinn]')")
    else:
        cuda = bool(torch.cuda.is_available())
        rep["torch"] = {"version": ver, "cuda": cuda,
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if cuda else [],
                        "distributed_backends": [b for b in ("gloo", "nccl", "mpi")
                                                 if getattr(torch.distributed, f"is_{b}_available")()]}
    for mod, extra in (("dask_jobqueue", "cohort"), ("nibabel", None), ("nilearn", "synth")):
        m, ver = _version(mod)
        rep[mod] = ver if m is not None else None
        if m is None:
            rep["missing"].append(f"{mod} (pip install 'glymphmpi[{extra}]')" if extra else mod)
    rep["slurm"] = {c: shutil.which(c) for c in ("sbatch", "srun", "squeue", "sinfo", "scancel")}
    rep["slurm_version"] = _slurm_state() if rep["slurm"]["sbatch"] else None
    if rep["slurm_version"] is None:
        rep["missing"].append("SLURM commands (sbatch/srun): cohort --scheduler slurm unavailable")
    rep["apptainer"] = _cmd_version(["apptainer", "--version"])
    if rep["apptainer"] is None:
        rep["missing"].append("apptainer (build and run the image on the cluster)")
    rep["cpus"] = os.cpu_count()
    rep["methods"] = _methods_report()
    return rep


def _methods_report() -> dict:
    """Each registered method: ``ok``, or what it lacks (without importing the method)."""
    import importlib.util

    from glymphmpi.methods import all_methods

    out = {}
    for name, m in all_methods().items():
        if not m.installed():
            out[name] = "not in this checkout"
            continue
        mod = m.requires[0] if m.requires else None
        try:
            found = mod is None or importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        out[name] = "ok" if found else (f"needs {mod} (pip install 'glymphmpi[{m.requires[1]}]')" if m.requires[1]
                                        else f"needs {mod}")
    return out


def format_report(rep: dict) -> str:
    def yes(v):
        return "missing" if v is None else v

    lines = [
        f"python      {rep['python']} ({rep['executable']})",
        f"numpy       {rep['numpy']}",
        "MPI         " + (f"mpi4py {rep['mpi']['mpi4py']}, {rep['mpi']['library']}, "
                          f"{rep['mpi']['ranks']} rank(s)" if rep["mpi"] else "missing"),
        f"mpirun      {yes(rep['mpirun'])}",
        "PETSc       " + (f"{rep['petsc']['petsc']} (petsc4py {rep['petsc']['petsc4py']})" if rep["petsc"]
                          else "missing"),
        f"DOLFINx     {yes(rep['dolfinx'])}",
        "h5py        " + (f"{rep['h5py']['version']} (HDF5 {rep['h5py']['hdf5']}, "
                          f"{'parallel/MPI' if rep['h5py']['mpi'] else 'serial build'})" if rep["h5py"]
                          else "missing"),
        "torch       " + (f"{rep['torch']['version']}, " + (f"CUDA GPUs: {', '.join(rep['torch']['gpus'])}"
                                                            if rep["torch"]["cuda"] else "no GPU (CPU only)")
                          + f", backends {'/'.join(rep['torch']['distributed_backends'])}"
                          if rep["torch"] else "missing"),
        f"dask-jobq.  {yes(rep['dask_jobqueue'])}",
        f"nibabel     {yes(rep['nibabel'])}",
        f"nilearn     {yes(rep['nilearn'])}",
        f"SLURM       {yes(rep['slurm_version'])}",
        f"apptainer   {yes(rep['apptainer'])}",
        f"cpus        {rep['cpus']}",
        "methods     " + ", ".join(f"{n} ({v})" for n, v in rep.get("methods", {}).items()),
    ]
    if rep["missing"]:
        lines.append("missing:")
        lines += [f"  - {m}" for m in rep["missing"]]
    else:
        lines.append("nothing missing")
    return "\n".join(lines)
