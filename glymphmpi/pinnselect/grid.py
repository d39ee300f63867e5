"""Grids of PINN set-ups: axes over PinnConfig keys, expanded to named runs.

A grid file (``--grid GRID.toml``)::

    [axes]                      # every combination is one set-up
    w_r = [1, 32, 64, 256]
    p_schedule = ["2", "2to1", "1"]
    lr = [[1e-3, 1e-4], [1e-4, 1e-5]]   # (lr_start, lr_end) pairs
    rar = [false, true]                 # RAR at 25/50/75% of the epochs
    [fixed]                     # PinnConfig keys applied to every run
    epochs = 2000

When PinnConfig's epochs (and batches) are automatic (0) and [fixed] does not set them, every
set-up trains GRID_EPOCHS epochs of GRID_BATCHES minibatches (RAR and early stopping are given
in epochs).

Axis names are PinnConfig keys plus the shorthands ``lr`` and ``rar``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from glymphmpi.config import build, load_toml
from glymphmpi.errors import InputError

DEFAULT_AXES: dict[str, list] = {
    "w_r": [1.0, 32.0, 64.0, 256.0],
    "p_schedule": ["2", "2to1", "1"],
    "lr": [[1e-3, 1e-4], [1e-4, 1e-5]],
    "rar": [False, True],
}
RAR_FRACTIONS = (0.25, 0.5, 0.75)
#: epochs of every run when neither the grid's [fixed] nor PinnConfig's default gives a number
#: (PinnConfig.epochs = 0 means "scaled with the data"; the grid's RAR and early-stop epochs need one)
GRID_EPOCHS = 2000
#: minibatches per epoch pinned with GRID_EPOCHS (PinnConfig.batches = 0 is automatic too)
GRID_BATCHES = 20
SHORT = {"w_r": "wr", "p_schedule": "p", "lr": "lr", "rar": "rar"}


@dataclass(frozen=True)
class Setup:
    """One set-up of the grid: its name, axis values and PinnConfig keys."""

    name: str
    axes: dict
    keys: dict  # PinnConfig overrides (fixed + axis values expanded)


@dataclass(frozen=True)
class Run:
    setup: Setup
    seed: int

    @property
    def rel_dir(self) -> str:
        return f"runs/{self.setup.name}/seed{self.seed}"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def setup_name(axes: dict) -> str:
    name = "_".join(f"{SHORT.get(k, k)}{_fmt(v)}" for k, v in axes.items())
    return re.sub(r"[^A-Za-z0-9._-]", "", name.replace("+", ""))


def _expand(axis: str, value, fixed: dict, where: str) -> dict:
    if axis == "lr":
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise InputError(f"axis 'lr' values must be [lr_start, lr_end] pairs, got {value!r}", where)
        return {"lr_start": float(value[0]), "lr_end": float(value[1])}
    if axis == "rar":
        if not isinstance(value, bool):
            raise InputError(f"axis 'rar' values must be true/false, got {value!r}", where)
        if not value:
            return {"rar_epochs": []}
        epochs = grid_epochs(fixed)
        return {"rar_epochs": sorted({max(1, int(f * epochs)) for f in RAR_FRACTIONS})}
    return {axis: value}


def grid_epochs(fixed: dict) -> int:
    """The epochs of the grid's runs: [fixed] epochs, else PinnConfig's default, else GRID_EPOCHS."""
    return int(fixed.get("epochs") or _pinn_defaults()["epochs"] or GRID_EPOCHS)


def _pinn_defaults() -> dict:
    from glymphmpi.pinn.config import PinnConfig

    return dataclasses.asdict(PinnConfig())


def make_setups(axes: dict | None = None, fixed: dict | None = None, where: str = "grid",
                early_stop_fraction: float = 0.0) -> list[Setup]:
    """All combinations of the axes, each checked as a full PinnConfig.

    ``early_stop_fraction`` > 0 adds a hopeless-run check at that fraction of
    the epochs after ``delta_freeze_epochs`` to every set-up that does not set
    ``early_stop_epochs`` itself.
    """
    from glymphmpi.pinn.config import PinnConfig

    axes = dict(DEFAULT_AXES if axes is None else axes)
    fixed = dict(fixed or {})
    if not fixed.get("epochs") and not _pinn_defaults()["epochs"]:
        # automatic epochs: pin them (RAR and early stop are set in epochs), and the minibatches with them
        fixed["epochs"] = GRID_EPOCHS
        if not fixed.get("batches") and not _pinn_defaults().get("batches", 1):
            fixed["batches"] = GRID_BATCHES
    valid = set(_pinn_defaults()) | {"lr", "rar"}
    for k, vals in axes.items():
        if k not in valid:
            raise InputError(f"unknown grid axis {k!r} (PinnConfig keys, 'lr' or 'rar')", where)
        if not isinstance(vals, list) or not vals:
            raise InputError(f"grid axis {k!r} must be a non-empty list", where)
    for k in ("seed", "ensemble"):
        if k in axes or k in fixed:
            raise InputError(f"{k!r} is set by pinn-select (use [pinn_select] seeds)", where)
    setups = []
    names = set()
    for combo in itertools.product(*axes.values()):
        ax = dict(zip(axes.keys(), combo))
        keys = dict(fixed)
        for k, v in ax.items():
            keys.update(_expand(k, v, fixed, where))
        if early_stop_fraction > 0 and "early_stop_epochs" not in keys:
            # judged at that share of the epochs in which D may move: while delta is held
            # (delta_freeze_epochs) neither D nor the residual can show progress
            epochs = grid_epochs(keys)
            freeze = int(keys.get("delta_freeze_epochs", _pinn_defaults().get("delta_freeze_epochs", 0)))
            if freeze < 0:  # automatic: half the epochs (PinnConfig)
                freeze = epochs // 2
            at = max(2, freeze + int(early_stop_fraction * (epochs - freeze)))
            if epochs >= 4 and at < epochs:
                keys["early_stop_epochs"] = [at]
        build(PinnConfig, {**keys, "ensemble": 1}, where)  # validates types and values
        name = setup_name(ax)
        if name in names:
            raise InputError(f"grid gives two set-ups named {name!r}", where)
        names.add(name)
        setups.append(Setup(name=name, axes=ax, keys=keys))
    return setups


def load_grid(path, early_stop_fraction: float = 0.0) -> list[Setup]:
    doc = load_toml(path)
    unknown = set(doc) - {"axes", "fixed"}
    if unknown:
        raise InputError(f"unknown table {sorted(unknown)[0]!r} (valid: axes, fixed)", path)
    if "axes" not in doc or not isinstance(doc["axes"], dict) or not doc["axes"]:
        raise InputError("needs an [axes] table with at least one axis", path)
    return make_setups(doc["axes"], doc.get("fixed", {}), str(Path(path)), early_stop_fraction)


def expand_runs(setups: list[Setup], seeds: int) -> list[Run]:
    return [Run(s, k) for s in setups for k in range(seeds)]


def toml_value(v) -> str:
    import tomli_w

    return tomli_w.dumps({"v": list(v) if isinstance(v, tuple) else v}).split("=", 1)[1].strip()


def run_overrides(run: Run) -> list[str]:
    """``--set`` arguments of one run."""
    sets = [f"pinn.{k}={toml_value(v)}" for k, v in run.setup.keys.items()]
    return sets + [f"pinn.seed={run.seed}", "pinn.ensemble=1"]
