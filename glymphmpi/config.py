"""Frozen configuration dataclasses, TOML loading and ``--set`` overrides.

A config file has one table per method (``[romt]``, ``[fem]``, ``[pinn]``,
...). Each method defines one frozen dataclass in its own light module
``glymphmpi/<method>/config.py`` exposing ``CONFIG = <Class>``; the table
name is the method name. Unknown keys and wrong types are :class:`InputError`.
``--set pinn.epochs=2000`` overrides a key (the value is parsed as TOML; a
bare word is taken as a string).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from glymphmpi.errors import InputError


@dataclasses.dataclass(frozen=True)
class SubjectConfig:
    """Settings of subject loading.

    Attributes:
        max_negative_mass_fraction: negative values (noise) inside the mask
            are clipped to zero with one warning when their summed magnitude,
            per scan, is at most this share of the largest scan's positive
            mass; more is an error (e.g. a bad baseline subtraction). Measured
            against the largest scan so that a noisy baseline scan (true
            concentration 0) passes.
    """

    max_negative_mass_fraction: float = 0.1


_BUILTIN = {"subject": SubjectConfig}


def _registry() -> dict:
    """Table name -> dataclass, from every ``glymphmpi/<pkg>/config*.py``.

    A module exposes ``CONFIGS = {"table": Class, ...}`` or ``CONFIG = Class``
    (table name = the subpackage's name). Modules are light (no heavy imports).
    """
    import pkgutil

    import glymphmpi

    reg = dict(_BUILTIN)
    for info in pkgutil.iter_modules(glymphmpi.__path__):
        if not info.ispkg:
            continue
        pkg = importlib.import_module(f"glymphmpi.{info.name}")
        for sub in pkgutil.iter_modules(pkg.__path__):
            if sub.ispkg or not (sub.name == "config" or sub.name.startswith("config_")
                                 or sub.name.endswith("_config")):
                continue
            mod = importlib.import_module(f"glymphmpi.{info.name}.{sub.name}")
            if hasattr(mod, "CONFIGS"):
                reg.update(mod.CONFIGS)
            elif hasattr(mod, "CONFIG"):
                reg[info.name] = mod.CONFIG
    return reg


def config_class(section: str):
    """The config dataclass of a table name; raises with the valid names."""
    reg = _registry()
    if section not in reg:
        raise InputError(f"unknown config table [{section}]; valid tables: {', '.join(sorted(reg))}")
    return reg[section]


def known_sections() -> list[str]:
    return sorted(_registry())


def _type_ok(value, tp) -> tuple[bool, Any]:
    """Check/convert a TOML value to a dataclass field type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return True, None
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            pairs = list(zip(value, args))
        else:
            elem = args[0] if args else Any
            pairs = [(v, elem) for v in value]
        out = []
        for v, a in pairs:
            ok, cv = _type_ok(v, a)
            if not ok:
                return False, value
            out.append(cv)
        return True, tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    return isinstance(value, tp), value


def build(cls, table: dict, where: str = "config"):
    """Instantiate frozen dataclass ``cls`` from a dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise InputError(f"unknown key {key!r} (valid: {', '.join(sorted(fields))})", where)
        ok, conv = _type_ok(value, hints[key])
        if not ok:
            raise InputError(
                f"key {key!r} must be {_tname(hints[key])}, got {type(value).__name__} {value!r}",
                where,
            )
        kwargs[key] = conv
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc), where) from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise InputError(str(exc), where) from None
    return obj


def _tname(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_override(item: str) -> tuple[str, str, Any]:
    """``"pinn.epochs=2000"`` -> ``("pinn", "epochs", 2000)``."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. pinn.epochs=2000")
    lhs, raw = item.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_toml(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except IsADirectoryError:
        raise InputError("is a directory, expected a TOML file", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"malformed TOML: {exc}", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc}", path) from None


def load_config(section: str, path=None, overrides=()):
    """Resolve the config of one method from an optional TOML file and overrides.

    Args:
        section: table name (``"romt"``, ``"fem"``, ``"pinn"``, ...).
        path: TOML file with one table per method, or None for the defaults.
        overrides: ``SECTION.KEY=VALUE`` strings; other sections' are ignored,
            unknown sections are errors.
    """
    cls = config_class(section)
    table: dict = {}
    where = "config"
    if path is not None:
        data = load_toml(path)
        where = str(path)
        for name in data:
            if not isinstance(data[name], dict):
                raise InputError(f"top-level key {name!r} must be a table like [{section}]", path)
            if name not in known_sections():
                raise InputError(f"unknown table [{name}] (valid: {', '.join(known_sections())})", path)
        table.update(data.get(section, {}))
    for item in overrides:
        sec, key, value = parse_override(item)
        if sec not in known_sections():
            raise InputError(f"--set {item!r}: unknown section {sec!r} (valid: {', '.join(known_sections())})")
        if sec == section:
            table[key] = value
            where = f"--set {item}" if path is None else where
    return build(cls, table, where)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps({type(cfg).__name__: to_dict(cfg)}, sort_keys=True, default=str)
