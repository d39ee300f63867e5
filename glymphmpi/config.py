"""Frozen configuration dataclasses, TOML loading and ``--set`` overrides.

A config file has one table per method (``[romt]``, ``[fem]``, ``[pinn]``,
...); a nested dataclass field is a nested table (``[romt.post]``). Each method
defines one frozen dataclass in its own light module; the method registry
(:mod:`glymphmpi.methods`) says which table holds which class, and passes the
tables to :func:`resolve_table`. This module knows no method. Unknown keys and
wrong types are :class:`InputError`.
``--set pinn.epochs=2000`` overrides a key (the value is parsed as TOML; a
bare word is taken as a string).
"""

from __future__ import annotations

import dataclasses
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


def table_class(tables: dict, section: str, aliases: dict | None = None) -> type:
    """The dataclass of ``section`` in ``tables`` (a dotted name reaches a nested table, e.g.
    ``romt.post``); raises listing the valid tables."""
    target = (aliases or {}).get(section, section)
    root, *sub = target.split(".")
    if root not in tables:
        raise InputError(f"unknown config table [{section}]; valid tables: {', '.join(sorted(tables))}")
    cls = tables[root]
    for name in sub:
        cls = _nested_class(cls, name)
        if cls is None:
            raise InputError(f"unknown config table [{section}]; valid tables: {', '.join(sorted(tables))}")
    return cls


def _nested_class(cls, name: str):
    """The dataclass type of field ``name`` of ``cls``, or None."""
    if not dataclasses.is_dataclass(cls):
        return None
    hints = typing.get_type_hints(cls, include_extras=False)
    tp = hints.get(name)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _split_override(item, aliases: dict) -> tuple[list[str], Any, str]:
    """``"a.b.c=v"`` or ``("a.b.c", v)`` -> (["a", "b", "c"], v, text), aliases of the first part applied."""
    if isinstance(item, tuple):
        dotted, value = item
        text = f"{dotted}={value!r}"
    else:
        section, key, value = parse_override(item)
        dotted, text = f"{section}.{key}", f"--set {item}"
    parts = dotted.split(".")
    if parts[0] in aliases:
        parts = aliases[parts[0]].split(".") + parts[1:]
    return parts, value, text


def _set_nested(table: dict, keys: list[str], value, where) -> None:
    for k in keys[:-1]:
        nxt = table.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise InputError(f"key {k!r} is not a table", where)
        table = nxt
    table[keys[-1]] = value


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def resolve_table(tables: dict, section: str, path=None, overrides=(), aliases: dict | None = None):
    """Resolve one table from an optional TOML file and overrides.

    Args:
        tables: table name -> frozen dataclass (all tables a file may hold).
        section: the table to build (``"romt"``, ``"romt.post"`` for a nested table, an alias).
        path: TOML file with one table per method, or None for the defaults.
        overrides: ``SECTION.KEY=VALUE`` strings or ``("section.key", value)`` pairs; other
            sections' are ignored, unknown sections are errors.
        aliases: old table name -> dotted table path (``{"romt_post": "romt.post"}``).
    """
    aliases = aliases or {}
    target = aliases.get(section, section)
    cls = table_class(tables, section, aliases)
    root, *sub = target.split(".")
    valid = ", ".join(sorted(tables))
    data: dict = {}
    where = "config"
    if path is not None:
        doc = load_toml(path)
        where = str(path)
        for name, value in doc.items():
            if not isinstance(value, dict):
                raise InputError(f"top-level key {name!r} must be a table like [{root}]", path)
            parts = aliases.get(name, name).split(".")
            if parts[0] not in tables:
                raise InputError(f"unknown table [{name}] (valid: {valid})", path)
            if parts[0] == root:
                nested = value
                for k in reversed(parts[1:]):
                    nested = {k: nested}
                _merge(data, nested)
    for item in overrides:
        parts, value, text = _split_override(item, aliases)
        if parts[0] not in tables:
            raise InputError(f"{text!r}: unknown section {parts[0]!r} (valid: {valid})")
        if parts[0] == root:
            _set_nested(data, parts[1:], value, text)
            where = text if path is None else where
    table = data
    for name in sub:
        table = table.get(name, {})
        if not isinstance(table, dict):
            raise InputError(f"[{target}] must be a table", where)
    return build(cls, table, where)


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return True, value
        if isinstance(value, dict):
            return True, build(tp, value)
        return False, value
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
    """Transitional: :func:`glymphmpi.methods.load_config` (the tables come from the registry)."""
    from glymphmpi.methods import load_config as _load

    return _load(section, path, overrides)


def config_class(section: str):
    """Transitional: :func:`glymphmpi.methods.config_class`."""
    from glymphmpi.methods import config_class as _cc

    return _cc(section)


def known_sections() -> list[str]:
    """Transitional: :func:`glymphmpi.methods.known_sections`."""
    from glymphmpi.methods import known_sections as _ks

    return _ks()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    return json.dumps({type(cfg).__name__: to_dict(cfg)}, sort_keys=True, default=str)
