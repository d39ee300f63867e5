"""Config loading: frozen dataclasses from TOML, --set overrides, unknown keys and wrong types rejected."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Annotated, Literal

import pytest

from glymphmpi.config import NONFINITE_OK, NonNegativeInt, Range, SubjectConfig, build, field_docs, parse_override
from glymphmpi.errors import InputError
from glymphmpi.methods import load_config


@dataclasses.dataclass(frozen=True)
class Toy:
    """A toy.

    Attributes:
        n: a count. More text
            on a second line.
        x, y: two numbers (the second line
            of their meaning). Not this.
        name: a name.
    """

    n: NonNegativeInt = 3
    x: float = 1.5
    y: Annotated[float, Range(gt=0, le=2)] = 2.0
    name: str = "a"
    flag: bool = False
    pair: tuple[float, float] = (1.0, 2.0)
    opt: int | None = None
    kind: Literal["a", "b"] = "a"
    wild: Annotated[float, NONFINITE_OK] = 0.0

    def validate(self):
        if self.kind == "b" and self.x > 10:
            raise ValueError("x: must be <= 10 with kind 'b'")


def test_build_types_and_conversion():
    t = build(Toy, {"n": 4, "x": 2, "pair": [3, 4], "opt": 7})
    assert t == Toy(n=4, x=2.0, pair=(3.0, 4.0), opt=7) and isinstance(t.x, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.n = 5


@pytest.mark.parametrize("table, needle", [
    ({"nn": 1}, "f.toml: toy: unknown key 'nn'"),
    ({"n": 1.5}, "f.toml: toy.n: must be int, got float 1.5"),
    ({"n": True}, "toy.n: must be int"),
    ({"x": "fast"}, "toy.x: must be a finite number (float), got str 'fast'"),
    ({"flag": 1}, "toy.flag: must be bool"),
    ({"pair": [1, 2, 3]}, "toy.pair: must be a list of 2 values"),
    ({"n": -1}, "toy.n: must be >= 0, got -1"),
    ({"y": 0}, "toy.y: must be > 0, got 0.0"),
    ({"y": 2.5}, "toy.y: must be <= 2, got 2.5"),
    ({"y": float("nan")}, "toy.y: must be a finite number, got nan"),
    ({"x": float("inf")}, "toy.x: must be a finite number, got inf"),
    ({"x": 10**400}, "toy.x: must be a finite number"),
    ({"pair": [1.0, float("nan")]}, "toy.pair: [1] must be a finite number"),
    ({"n": 99999999999999999999}, "toy.n: must be an integer of magnitude below 2^63"),
    ({"kind": "c"}, "toy.kind: must be a valid choice, got 'c' (valid: a, b)"),
    ({"kind": "b", "x": 11}, "toy.x: must be <= 10 with kind 'b'"),
])
def test_build_rejects(table, needle):
    with pytest.raises(InputError) as err:
        build(Toy, table, "f.toml", "toy")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_declared_exceptions_and_docs():
    assert build(Toy, {"wild": float("nan")}, prefix="toy").wild != 0.0  # declared NONFINITE_OK
    assert build(Toy, {"n": 0, "y": 2}).y == 2.0  # inclusive bound, int -> float
    d = field_docs(Toy)
    assert d == {"n": "a count", "x": "two numbers (the second line of their meaning)",
                 "y": "two numbers (the second line of their meaning)", "name": "a name"}


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
    with pytest.raises(InputError, match="c.toml: subject: unknown key 'max_negative'"):
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
    with pytest.raises(InputError, match="must be a finite number"):
        load_config("subject", None, ["subject.max_negative_mass_fraction=high"])
    with pytest.raises(InputError, match=r"^subject.max_negative_mass_fraction: must be <= 1, got 2.0$"):
        load_config("subject", None, ["subject.max_negative_mass_fraction=2"])


@pytest.mark.parametrize("item, needle", [
    ("pinn.w_r=nan", "pinn.w_r: must be a finite number, got nan"),
    ("pinn.lr_start=inf", "pinn.lr_start: must be a finite number, got inf"),
    ("romt.beta=nan", "romt.beta: must be a finite number, got nan"),
    ("romt.sigma=nan", "romt.sigma: must be a finite number, got nan"),
    ("subject.max_negative_mass_fraction=nan", "subject.max_negative_mass_fraction: must be a finite number"),
    ("fem.alpha=nan", "fem.alpha: must be a finite number, got nan"),
    ("fem.alpha=-1", "fem.alpha: must be >= 0, got -1.0"),
    ("romt.nt=99999999999999999999", "romt.nt: must be an integer of magnitude below 2^63"),
    ("romt.post.integrator=rk9", "romt.post.integrator: must be a valid choice, got 'rk9' (valid: euler, rk2, rk4)"),
    ("romt_post.seed_max_fraction=1.5", "romt.post.seed_max_fraction: must be < 1, got 1.5"),
    ("fem.D_min=0.2", "fem.D_min: renamed fem.d_min"),
    ("fem.quiet=true", "fem.quiet: removed; use the command-line switch `glymph --quiet`"),
    ("romt.gn_max_iter=3", "romt.gn_max_iter: renamed romt.max_iterations"),
    ("cohort.max_attempts=0", "cohort.max_attempts: must be >= 1, got 0"),
])
def test_every_method_setting_is_checked_in_one_style(item, needle):
    section = item.split("=")[0].rsplit(".", 1)[0].replace("romt_post", "romt.post")
    with pytest.raises(InputError) as err:
        load_config(section, None, [item])
    assert str(err.value) == needle or str(err.value).startswith(needle)


def test_cli_bad_setting_is_one_line_exit_2(tmp_path, small_phantom):
    from glymphmpi.cli import main

    for item in ("pinn.w_r=nan", "romt.nt=99999999999999999999", "fem.alpha=nan", "romt.beta=nan"):
        method = item.split(".")[0]
        assert main([method, str(small_phantom), "--out", str(tmp_path / method), "--set", item]) == 2
        assert not (tmp_path / method).exists()  # refused before anything is written


def test_glymph_config_prints_every_setting_as_toml_that_parses_back(capsys):
    from glymphmpi import methods
    from glymphmpi.cli import main

    assert main(["config"]) == 0
    text = capsys.readouterr().out
    doc = tomllib.loads(text)
    tables = methods.config_tables()
    assert set(doc) == set(tables)
    for name, cls in tables.items():
        assert build(cls, doc[name], prefix=name) == cls(), name  # the printed values are the defaults
        for f in dataclasses.fields(cls):  # every setting is printed, with its meaning on the line above
            if getattr(cls(), f.name) is not None:
                assert f.name in doc[name], (name, f.name)
    assert "# weight of the end-point fit" in text and "[romt.post]" in text
    assert main(["config", "fem"]) == 0
    fem = tomllib.loads(capsys.readouterr().out)
    assert list(fem) == ["fem"] and fem["fem"]["d_min"] == 0.1 and fem["fem"]["petsc_options"]["pc_type"] == "jacobi"
    assert main(["config", "nope"]) == 2
