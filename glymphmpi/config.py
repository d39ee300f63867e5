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
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from glymphmpi.errors import InputError


# ------------------------------------------------------------------ declarations
@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number field: ``Annotated[float, Range(ge=0)]``. NaN never passes."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, v) -> str | None:
        """The first bound ``v`` breaks, as ``must be >= 0``, or None (``not v >= x`` catches NaN)."""
        for op, bound, ok in ((">=", self.ge, lambda a, b: a >= b), (">", self.gt, lambda a, b: a > b),
                              ("<=", self.le, lambda a, b: a <= b), ("<", self.lt, lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                return f"must be {op} {bound:g}"
        return None

    def describe(self) -> str:
        parts = [f"{op} {b:g}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A string field that must match ``regex`` in full (``re.fullmatch``: a trailing newline does
    not pass): ``Annotated[str, Pattern(r"[a-z]+", "lower-case letters")]``."""

    regex: str
    what: str

    def problem(self, v) -> str | None:
        return None if re.fullmatch(self.regex, v) else f"must be {self.what}"

    def describe(self) -> str:
        return self.what


#: marks a float field that may be NaN or infinite (none does today): ``Annotated[float, NONFINITE_OK]``
NONFINITE_OK = object()

PositiveInt = typing.Annotated[int, Range(ge=1)]
NonNegativeInt = typing.Annotated[int, Range(ge=0)]
Positive = typing.Annotated[float, Range(gt=0)]
NonNegative = typing.Annotated[float, Range(ge=0)]
UnitFraction = typing.Annotated[float, Range(ge=0, lt=1)]


def field_docs(cls) -> dict[str, str]:
    """Field name -> its one-line meaning, from the class docstring's ``Attributes:`` section.

    ``a, b: text`` documents both; the first sentence (up to the first period followed by a space,
    joined over continuation lines) is the one line.
    """
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    indent = None
    current: list[str] = []
    text: list[str] = []

    def flush():
        if current:
            full = " ".join(t.strip() for t in text).replace("``", "")
            first = re.split(r"(?<=\.)\s", full, maxsplit=1)[0]
            for name in current:
                out[name] = first.rstrip(".;")

    for ln in lines[start + 1:]:
        if not ln.strip():
            continue
        ind = len(ln) - len(ln.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*(?:,\s*[A-Za-z_][A-Za-z0-9_]*)*):\s*(.*)$", ln.strip())
        if ind == indent and m:
            flush()
            current = [n.strip() for n in m.group(1).split(",")]
            text = [m.group(2)]
        else:
            text.append(ln)
    flush()
    return out


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

    max_negative_mass_fraction: typing.Annotated[float, Range(ge=0, le=1)] = 0.1


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
    where = None
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
            if len(parts) < 2:
                raise InputError(f"{text!r}: expected SECTION.KEY=VALUE")
            _set_nested(data, parts[1:], value, text)
    table = data
    for name in sub:
        table = table.get(name, {})
        if not isinstance(table, dict):
            raise InputError(f"[{target}] must be a table", where)
    return build(cls, table, where, target)


class _Problem(Exception):
    """A value that does not fit its declaration (the message says how)."""


def _short(value, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters (a message echoes a value, not 100,000 characters)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text)} characters)"


def _tname(tp) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        return _tname(typing.get_args(tp)[0])
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp):
    """Check a TOML value against a declared field type and convert it (int -> float, list -> tuple).

    Raises _Problem with the message after ``table.key: ``.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        allow_nonfinite = any(m is NONFINITE_OK for m in meta)
        v = _convert_base(value, base, allow_nonfinite)
        for m in meta:
            if isinstance(m, (Range, Pattern)):
                problem = m.problem(v)
                if problem:
                    raise _Problem(f"{problem}, got {_short(v)}")
        return v
    return _convert_base(value, tp, False)


def _convert_base(value, tp, allow_nonfinite: bool):
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _convert(value, tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise _Problem(f"must be a valid choice, got {_short(value)} "
                           f"(valid: {', '.join(str(c) for c in choices)})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        problems = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Problem as exc:
                problems.append(str(exc))
        raise _Problem(problems[0] if len(problems) == 1 else
                       f"must be {' or '.join(_tname(a) for a in args if a is not type(None))}, "
                       f"got {type(value).__name__} {_short(value)}")
    if tp is type(None):
        if value is not None:
            raise _Problem(f"must be unset, got {_short(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _Problem(f"must be bool (true/false), got {type(value).__name__} {_short(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Problem(f"must be int, got {type(value).__name__} {_short(value)}")
        if abs(value) >= 2**63:
            raise _Problem(f"must be an integer of magnitude below 2^63, got {value}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Problem(f"must be a finite number (float), got {type(value).__name__} {_short(value)}")
        if isinstance(value, int) and abs(value) >= 2**1023:
            raise _Problem(f"must be a finite number, got {value}")
        v = float(value)
        if not allow_nonfinite and not math.isfinite(v):
            raise _Problem(f"must be a finite number, got {v}")
        return v
    if tp is str:
        if not isinstance(value, str):
            raise _Problem(f"must be str, got {type(value).__name__} {_short(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Problem(f"must be a list, got {type(value).__name__} {_short(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Problem(f"must be a list of {len(args)} values, got {_short(list(value))}")
            pairs = list(zip(value, args))
        else:
            elem = args[0] if args else Any
            pairs = [(v, elem) for v in value]
        out = []
        for i, (v, a) in enumerate(pairs):
            try:
                out.append(_convert(v, a))
            except _Problem as exc:
                raise _Problem(f"[{i}] {exc}") from None
        return tuple(out) if origin is tuple else out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build(tp, value)
        raise _Problem(f"must be a table, got {type(value).__name__} {_short(value)}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Problem(f"must be a table, got {type(value).__name__} {_short(value)}")
        return dict(value)
    if not isinstance(value, tp):
        raise _Problem(f"must be {_tname(tp)}, got {type(value).__name__} {_short(value)}")
    return value


def field_types(cls) -> dict:
    """Field name -> declared type, ``Annotated`` metadata kept."""
    return typing.get_type_hints(cls, include_extras=True)


def build(cls, table: dict, where=None, prefix: str = ""):
    """Instantiate frozen dataclass ``cls`` from a dict, checking every key against its declaration.

    Args:
        cls: the dataclass; fields declare types, ``Literal`` choices and
            ``Annotated[..., Range(...)]`` bounds; floats must be finite unless
            declared ``Annotated[float, NONFINITE_OK]``; ints fit in 64 bits.
        table: key -> value (TOML types).
        where: file the values came from (prefixes the message), or None.
        prefix: the table's name in messages (``fem`` -> ``fem.alpha: must be >= 0, got -1``).
    Raises:
        InputError: one line, ``[FILE: ]TABLE.KEY: problem``.
    """
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dot = f"{prefix}." if prefix else ""
    kwargs = {}
    for key, value in table.items():
        if key not in hints or key not in names:
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed and renamed.isidentifier():
                raise InputError(f"{dot}{key}: renamed {dot}{renamed}", where)
            if renamed:
                raise InputError(f"{dot}{key}: removed; use {renamed}", where)
            raise InputError(f"{prefix + ': ' if prefix else ''}unknown key {key!r} "
                             f"(valid: {', '.join(sorted(names))})", where)
        tp = hints[key]
        try:
            if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
                kwargs[key] = build(tp, value, where, f"{dot}{key}")
            else:
                kwargs[key] = _convert(value, tp)
        except _Problem as exc:
            raise InputError(f"{dot}{key}: {exc}", where) from None
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"{prefix + ': ' if prefix else ''}missing required key {missing[0]!r}", where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{prefix or cls.__name__}: {exc}", where) from None
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            msg = str(exc)
            head = msg.split(":", 1)[0].split(" ", 1)[0]
            raise InputError(f"{dot}{msg}" if head in names else f"{prefix or cls.__name__}: {msg}",
                             where) from None
    return obj


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


def _toml_value(value) -> str:
    import tomli_w

    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, tuple):
        value = list(value)
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _declared(tp) -> str:
    """``one of a, b`` / ``>= 0`` for a field's comment, or ""."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        parts = [_declared(a) for a in typing.get_args(tp) if a is not type(None)]
        return " ".join(p for p in parts if p)
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Annotated:
        return " and ".join(m.describe() for m in typing.get_args(tp)[1:] if isinstance(m, (Range, Pattern)))
    return ""


def to_toml(tables: dict, header: str = "") -> str:
    """Every setting of ``tables`` (name -> dataclass) with its default, as an editable TOML file.

    Each key is preceded by a comment with its one-line meaning and declared bounds/choices; a
    setting whose default is unset (None) is a comment (TOML has no null). Parsing the text and
    building each table gives the defaults back.
    """
    out = [f"# {line}" if line else "#" for line in header.splitlines()]

    def emit(name: str, cls) -> None:
        obj = cls()
        docs = field_docs(cls)
        hints = field_types(cls)
        out.extend(["", f"[{name}]"])
        nested = []
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{name}.{f.name}", type(value)))
                continue
            meaning = docs.get(f.name, "")
            bounds = _declared(hints[f.name])
            note = " ".join(x for x in (meaning, bounds and f"[{bounds}]") if x)
            if note:
                out.append(f"# {note}")
            if value is None:
                out.append(f"# {f.name} =   (unset by default)")
            else:
                out.append(f"{_toml_key(f.name)} = {_toml_value(value)}")
        for sub, sub_cls in nested:
            emit(sub, sub_cls)

    for name, cls in tables.items():
        emit(name, cls)
    return "\n".join(out).lstrip("\n") + "\n"


def to_json(cfg) -> str:
    return json.dumps({type(cfg).__name__: dataclasses.asdict(cfg)}, sort_keys=True, default=str)
