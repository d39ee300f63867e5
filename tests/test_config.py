"""Config loading: frozen dataclasses from TOML, --set overrides, unknown keys and wrong types rejected."""

from __future__ import annotations

import dataclasses

import pytest

from glymphmpi.config import SubjectConfig, build, parse_override
from glymphmpi.methods import load_config
from glymphmpi.errors import InputError


@dataclasses.dataclass(frozen=True)
class Toy:
    n: int = 3
    x: float = 1.5
    name: str = "a"
    flag: bool = False
    pair: tuple[float, float] = (1.0, 2.0)
    opt: int | None = None

    def validate(self):
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_build_types_and_conversion():
    t = build(Toy, {"n": 4, "x": 2, "pair": [3, 4], "opt": 7})
    assert t == Toy(n=4, x=2.0, pair=(3.0, 4.0), opt=7) and isinstance(t.x, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.n = 5


@pytest.mark.parametrize("table, needle", [
    ({"nn": 1}, "unknown key 'nn'"),
    ({"n": 1.5}, "key 'n' must be int"),
    ({"n": True}, "key 'n' must be int"),
    ({"x": "fast"}, "key 'x' must be float"),
    ({"flag": 1}, "key 'flag' must be bool"),
    ({"pair": [1, 2, 3]}, "key 'pair' must be"),
    ({"n": -1}, "n must be >= 0"),
])
def test_build_rejects(table, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        build(Toy, table, "f.toml")


def test_parse_override():
    assert parse_override("pinn.epochs=2000") == ("pinn", "epochs", 2000)
    assert parse_override("romt.mode=parallel") == ("romt", "mode", "parallel")
    assert parse_override("a.b=[1, 2]") == ("a", "b", [1, 2])
    assert parse_override('a.b="x y"') == ("a", "b", "x y")
    with pytest.raises(InputError, match="SECTION.KEY=VALUE"):
        parse_override("epochs=3")


def test_load_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[subject]\nmax_negative_mass_fraction = 0.2\n")
    assert load_config("subject", p) == SubjectConfig(0.2)
    assert load_config("subject", p, ["subject.max_negative_mass_fraction=0.3"]) == SubjectConfig(0.3)
    assert load_config("subject") == SubjectConfig()


def test_load_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[subject]\nmax_negative = 0.2\n")
    with pytest.raises(InputError, match="c.toml: unknown key 'max_negative'"):
        load_config("subject", p)
    p.write_text("[nonsense]\na = 1\n")
    with pytest.raises(InputError, match=r"unknown table \[nonsense\]"):
        load_config("subject", p)
    p.write_text("[subject\n")
    with pytest.raises(InputError, match="malformed TOML"):
        load_config("subject", p)
    with pytest.raises(InputError, match="file not found"):
        load_config("subject", tmp_path / "missing.toml")
    with pytest.raises(InputError, match="unknown section 'bogus'"):
        load_config("subject", None, ["bogus.k=1"])
    with pytest.raises(InputError, match="must be float"):
        load_config("subject", None, ["subject.max_negative_mass_fraction=high"])
