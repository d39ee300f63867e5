"""The results.h5 tree and the summary fields of an rOMT run."""

from __future__ import annotations

import numpy as np

from glymphmpi.romt.config import RomtConfig


def speeds_mm_per_h(velocity: np.ndarray, density: np.ndarray, voxel_size_mm, hours_per_model_time: float,
                    threshold: float = 0.01) -> tuple[float, float]:
    """(max, density-weighted mean) speed in mm/h over voxels with density > threshold * max.

    velocity (nt, 3, ...) model units; density (nt+1, ...) (the step-start densities are used).
    """
    vs = np.asarray(voxel_size_mm, dtype=np.float64).reshape(1, 3, *([1] * (velocity.ndim - 2)))
    sp = np.sqrt(((velocity.astype(np.float64) * vs) ** 2).sum(axis=1)) / hours_per_model_time
    rho = density[:-1].astype(np.float64)
    sel = rho > threshold * rho.max()
    if not np.any(sel):
        return 0.0, 0.0
    return float(sp[sel].max()), float((sp[sel] * rho[sel]).sum() / rho[sel].sum())


MISFIT_WARN = 0.05  # relative misfit above which a loop's end density does not match its target image


def loop_warnings(loops: list, cfg: RomtConfig) -> list[str]:
    """One line per loop that is not a converged estimate: on its iteration limit, misfit above
    MISFIT_WARN, or more than :data:`glymphmpi.romt.crop.RISK_TOLERANCE` of its mass carried by particles
    that may have reached the edge of the cropped box; each names the loop and the setting to change."""
    out = []
    for k, res in enumerate(loops):
        m = float(res["misfit_rel"])
        need = int(res.get("crop_margin_needed", 0) or 0)
        if need > 0:
            out.append(f"loop {k}: particles carrying {float(res['mass_at_risk']):.2g} of the mass jumped as far as "
                       f"the edge of the cropped box in one step, so mass may have left it: set "
                       f"romt.crop_margin={need} (now {cfg.crop_margin})")
        if str(res["stop_reason"]).startswith("max iterations"):
            out.append(f"loop {k}: stopped on its iteration limit ({int(res['gn_iterations'])} Gauss-Newton "
                       f"iterations, relative misfit {m:.3g}): not converged; raise romt.max_iterations")
        if m > MISFIT_WARN:
            head = (f"loop {k}: relative misfit {m:.3g} > {MISFIT_WARN} (the end density does not match the "
                    f"next scan): ")
            change = res.get("target_mass_change")
            if cfg.model == "unbalanced":
                out.append(head + f"raise romt.beta (now {cfg.beta:g}) or lower romt.alpha (now {cfg.alpha:g}), "
                                  "the cost of the source")
            elif change is not None and abs(float(change)) > 0.05:
                out.append(head + f"the mass changes by {100 * float(change):+.0f}% between the scans, which "
                                  "balanced rOMT cannot create or remove: use romt.model=unbalanced")
            else:
                out.append(head + f"raise romt.beta (now {cfg.beta:g}) or romt.max_iterations")
    return out


def build_results_tree(loops: list, subject, cfg: RomtConfig) -> tuple[dict, dict]:
    """results.h5 tree (contract in the module glymphmpi.romt) and the summary fields."""
    times = np.asarray(subject.times_h, dtype=np.float64)
    vox = np.asarray(subject.voxel_size_mm, dtype=np.float64)
    tree_loops = {}
    smax, smean, misfit, gn, pcg, secs, rates = [], [], [], [], [], [], []
    for k, res in enumerate(loops):
        t0, t1 = float(times[k]), float(times[k + 1])
        hpm = (t1 - t0) / (cfg.nt * cfg.dt)
        mx, mean = speeds_mm_per_h(res["velocity"], res["density"], vox, hpm)
        smax.append(mx)
        smean.append(mean)
        misfit.append(float(res["misfit_rel"]))
        gn.append(int(res["gn_iterations"]))
        pcg.append(int(res["pcg_iterations"]))
        secs.append(float(res["runtime_s"]))
        tree_loops[f"{k:03d}"] = {
            "velocity": np.asarray(res["velocity"], dtype=np.float32),
            "density": np.asarray(res["density"], dtype=np.float32),
            "t0_h": t0, "t1_h": t1, "hours_per_model_time": hpm,
            "velocity_mm_per_h_factor": vox / hpm,
            "objective_history": np.asarray(res["objective_history"], dtype=np.float64),
            "gn_iterations": int(res["gn_iterations"]), "pcg_iterations": int(res["pcg_iterations"]),
            "kinetic": float(res["kinetic"]), "fit": float(res["fit"]), "smooth": float(res["smooth"]),
            "objective": float(res["objective"]),
            "mass_error": float(res["mass_error"]), "misfit_rel": float(res["misfit_rel"]),
            "stop_reason": str(res["stop_reason"]), "runtime_s": float(res["runtime_s"]),
            "speed_max_mm_per_h": mx, "speed_mean_mm_per_h": mean,
        }
        if "source" in res:
            src = np.asarray(res["source"], dtype=np.float32)
            rho = np.asarray(res["density"][:-1], dtype=np.float64)
            rate = float((src * rho).sum() / max(rho.sum(), 1e-300)) / hpm  # mass-weighted, 1/h
            tree_loops[f"{k:03d}"].update(source=src, source_rate_per_h=rate,
                                          source_cost=float(res.get("source_cost", 0.0)))
            rates.append(rate)
    tree = {
        "params": {
            "nt": cfg.nt, "dt": cfg.dt, "sigma": cfg.sigma, "beta": cfg.beta, "gamma": cfg.gamma,
            "mode": cfg.mode, "boundary": cfg.boundary, "voxel_size_mm": vox,
            "affine": np.asarray(subject.affine, dtype=np.float64),
            "shape": np.asarray(subject.shape, dtype=np.int64), "times_h": times, "n_loops": len(loops),
        },
        "mask": subject.mask.astype(np.uint8),
        "loops": tree_loops,
    }
    fields = {
        "n_loops": len(loops), "mode": cfg.mode, "boundary": cfg.boundary,
        "final_misfit_rel": misfit, "gn_iterations": gn, "pcg_iterations": pcg,
        "seconds_per_loop": [round(s, 3) for s in secs],
        "mass_error": [float(r["mass_error"]) for r in loops],
        "speed_max_mm_per_h": float(max(smax)) if smax else 0.0,
        "speed_mean_mm_per_h": float(np.mean(smean)) if smean else 0.0,
        "speed_max_mm_per_h_per_loop": smax, "speed_mean_mm_per_h_per_loop": smean,
        "model": cfg.model,
        "converged": [not str(r["stop_reason"]).startswith("max iterations") for r in loops],
        "warnings": loop_warnings(loops, cfg),
    }
    if rates:
        fields["source_rate_per_h_per_loop"] = rates
    tree["params"]["model"] = cfg.model
    if cfg.model == "unbalanced":
        tree["params"]["alpha"] = cfg.alpha
    return tree, fields


RESULTS_ATTRS = {
    "velocity_units": "model units: voxels per model time along the index axes i, j, k",
    "velocity_to_mm_per_h": "v_mm_per_h[d] = v[d] * voxel_size_mm[d] / hours_per_model_time, "
                            "hours_per_model_time = (t1_h - t0_h) / (nt * dt); per loop the (3,) "
                            "factor voxel_size_mm / hours_per_model_time is velocity_mm_per_h_factor",
    "density_units": "the scans' units (interpolated densities rho_0..rho_nt of each loop)",
    "source_units": "loops/NNN/source: relative source r (unbalanced model) per model time; divide by "
                    "hours_per_model_time for 1/h (maps/relative_source.nii.gz is in 1/h); source_rate_per_h: its "
                    "density-weighted mean in 1/h",
    "speed_fields": "speed_*_mm_per_h over voxels with density > 1% of the loop's max; mean weighted by density",
}


#: the ``units`` attribute of every dataset of results.h5, by its name (under loops/NNN/, params/ or the root);
#: "solver units": the objective's terms on the images rescaled by params/intensity_factor (glymphmpi.romt.scale)
UNITS = {
    # loops/NNN
    "velocity": "voxel/model time (index axes i, j, k)",
    "density": "the scans' units (rho_0..rho_nt of the loop)",
    "t0_h": "h", "t1_h": "h",
    "hours_per_model_time": "h/model time",
    "velocity_mm_per_h_factor": "(mm/h)/(voxel/model time), per index axis i, j, k",
    "objective_history": "solver units (objective per Gauss-Newton iteration)",
    "gn_iterations": "count", "pcg_iterations": "count",
    "kinetic": "solver units", "fit": "solver units", "smooth": "solver units", "objective": "solver units",
    "mass_error": "1 (relative: mass change of the loop / start mass)",
    "misfit_rel": "1 (relative: ||rho_nt - target|| / ||target||)",
    "stop_reason": "text", "runtime_s": "s",
    "speed_max_mm_per_h": "mm/h", "speed_mean_mm_per_h": "mm/h",
    "source": "1/model time (relative source r)", "source_rate_per_h": "1/h", "source_cost": "solver units",
    # params
    "nt": "count (time steps per loop)", "dt": "model time (per step)", "sigma": "voxel^2/model time",
    "beta": "1 (weight)", "gamma": "1 (weight)", "alpha": "1 (weight)",
    "mode": "text", "boundary": "text", "model": "text",
    "voxel_size_mm": "mm", "affine": "mm (voxel index -> world mm)", "shape": "voxels", "times_h": "h",
    "n_loops": "count",
    "intensity_scale": "the scans' units (robust intensity of the series)",
    "intensity_factor": "1/(the scans' units) (images x factor = solver intensities)",
    # root
    "mask": "1 (0/1 mask)",
}


def results_node_attrs(tree: dict) -> dict:
    """``node_attrs`` for :func:`glymphmpi.io.write_h5_tree`: a ``units`` attribute on every dataset of
    the rOMT results tree (names from :data:`UNITS`), and on each loop's velocity its conversion to mm/h
    (``mm_per_h_factor_i/j/k``: v_mm_per_h[:, d] = v[:, d] * factor_d = voxel_size_mm[d] / hours_per_model_time).

    Raises:
        KeyError: a dataset with no entry in :data:`UNITS` (a new field must say its unit).
    """
    out = {}

    def walk(node: dict, where: str) -> None:
        for k, v in node.items():
            path = f"{where}/{k}" if where else str(k)
            if isinstance(v, dict):
                walk(v, path)
            elif v is not None:
                if k not in UNITS:
                    raise KeyError(f"results.h5 {path}: no unit in glymphmpi.romt.results.UNITS")
                out[path] = {"units": UNITS[k]}

    walk(tree, "")
    for name, lp in tree.get("loops", {}).items():
        f = np.asarray(lp["velocity_mm_per_h_factor"], dtype=np.float64)
        out[f"loops/{name}/velocity"].update(
            {f"mm_per_h_factor_{a}": float(x) for a, x in zip("ijk", f)},
            to_mm_per_h="v_mm_per_h[:, d] = v[:, d] * mm_per_h_factor_d (voxel_size_mm[d] / hours_per_model_time)")
    return out
