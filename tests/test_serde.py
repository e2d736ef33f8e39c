"""convscale.serde: dataclasses to and from JSON-ready dicts, and the result classes that use it."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import numpy as np
import pytest

from convscale.errors import UserError
from convscale.serde import Serde, from_dict, to_dict


@dataclasses.dataclass(frozen=True)
class Interval(Serde):
    value: float
    low: float
    high: float


@dataclasses.dataclass
class Law(Serde):
    name: str
    slope: Interval
    r2: float
    offset: Interval | None = None
    note: Optional[str] = None
    points: tuple[float, ...] = ()
    pair: tuple[str, int] = ("a", 1)
    per_family: dict[str, Interval] = dataclasses.field(default_factory=dict)
    rows: list[list[float]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Renamed(Serde):
    """Reads its legacy key ``lr`` (as the regrouped TrainConfig will) and writes no empty note."""

    learning_rate: float
    note: str = ""

    @classmethod
    def serde_read(cls, data: dict) -> dict:
        if "lr" in data:
            data["learning_rate"] = data.pop("lr")
        return data

    def serde_write(self, data: dict) -> dict:
        return {k: v for k, v in data.items() if not (k == "note" and v == "")}


def test_nested_optional_nan_and_containers_written_as_strict_json():
    law = Law("nfnet", Interval(np.float64(0.3), math.nan, np.float32(0.5)), r2=math.inf, offset=None,
              points=(1.0, np.float64(2.0)), per_family={"vit": Interval(1.0, 0.5, 2.0)},
              rows=[[1.0, math.nan]], extra={"n": np.int64(3), "flag": np.bool_(True)})
    d = law.to_dict()
    assert d == {"name": "nfnet", "slope": {"value": 0.3, "low": None, "high": 0.5}, "r2": None, "offset": None,
                 "note": None, "points": [1.0, 2.0], "pair": ["a", 1],
                 "per_family": {"vit": {"value": 1.0, "low": 0.5, "high": 2.0}}, "rows": [[1.0, None]],
                 "extra": {"n": 3, "flag": True}}
    assert type(d["extra"]["n"]) is int and type(d["extra"]["flag"]) is bool
    json.dumps(d, allow_nan=False)  # strict JSON


def test_read_back_types_nan_and_defaults():
    d = json.loads(json.dumps(Law("x", Interval(1.0, math.nan, 2.0), r2=math.nan, offset=Interval(0.1, 0.0, 0.2),
                                  points=(3.0, 4.0), pair=("b", 2), per_family={"f": Interval(1.0, 1.0, 1.0)},
                                  rows=[[math.nan, 1.0]]).to_dict()))
    back = Law.from_dict(d)
    assert isinstance(back.slope, Interval) and back.slope.value == 1.0 and math.isnan(back.slope.low)
    assert math.isnan(back.r2)  # a plain float field: null reads as NaN
    assert back.offset == Interval(0.1, 0.0, 0.2)
    assert back.note is None  # Optional: null stays None
    assert back.points == (3.0, 4.0) and back.pair == ("b", 2)
    assert back.per_family == {"f": Interval(1.0, 1.0, 1.0)}
    assert math.isnan(back.rows[0][0]) and back.rows[0][1] == 1.0
    assert back.to_dict() == d
    # fields with defaults may be missing (files written before they existed)
    old = Law.from_dict({"name": "y", "slope": {"value": 1, "low": 0, "high": 2}, "r2": 0.9})
    assert old.offset is None and old.points == () and old.per_family == {} and old.extra == {}


def test_unknown_key_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"^unknown Law field 'slop'; did you mean 'slope'\?; valid fields: \[.*'r2'"):
        Law.from_dict({"name": "x", "slop": {}, "r2": 1.0})
    with pytest.raises(UserError, match=r"^unknown Interval field 'mid' in slope; valid fields: \['high', 'low'"):
        Law.from_dict({"name": "x", "slope": {"value": 1, "low": 0, "high": 2, "mid": 1}, "r2": 1.0})
    with pytest.raises(UserError, match=r"^unknown Interval field 'hgh' in fit\.json\.per_family\.vit; did you mean"):
        from_dict(Law, {"name": "x", "slope": {"value": 1, "low": 0, "high": 2}, "r2": 1.0,
                        "per_family": {"vit": {"value": 1, "low": 0, "hgh": 2}}}, where="fit.json")
    with pytest.raises(UserError, match=r"^missing Law field 'slope'$"):
        Law.from_dict({"name": "x", "r2": 1.0})
    with pytest.raises(UserError, match=r"^expected a JSON object for Law in fit\.json, got list$"):
        from_dict(Law, [1, 2], where="fit.json")


def test_hooks_read_legacy_keys_and_shape_what_is_written():
    assert Renamed.from_dict({"lr": 0.1}) == Renamed(0.1)
    assert Renamed.from_dict({"learning_rate": 0.2, "note": "n"}) == Renamed(0.2, "n")
    assert Renamed(0.1).to_dict() == {"learning_rate": 0.1}
    assert to_dict(Renamed(0.1, "n")) == {"learning_rate": 0.1, "note": "n"}
    with pytest.raises(UserError, match=r"^unknown Renamed field 'lrr'; valid fields: \['learning_rate', 'note'\]$"):
        Renamed.from_dict({"lrr": 0.1})


def test_to_dict_refuses_what_is_not_a_dataclass_instance():
    with pytest.raises(TypeError):
        to_dict(Interval)
    with pytest.raises(TypeError):
        to_dict({"value": 1.0})


# ---------------------------------------------------------------------------------------------
# the result classes that read and write JSON through it: one of each, from a real fit and study

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{name: instance} of every class family written to disk: fits, comparison, findings, study, plan."""
    from support import make_sweep

    from convscale.report import compare_all, load_sweep
    from convscale.report.findings import study_findings
    from convscale.report.hardware import get_hardware
    from convscale.scaling import fit_table
    from convscale.sweep.planner import plan_study
    from convscale.sweep.presets import preset
    from convscale.sweep.study import StudyConfig

    root = tmp_path_factory.mktemp("serde") / "sweep"
    df = make_sweep(root, curves=False)
    fit = fit_table(df, bootstrap=4, seed=0)
    fam = fit.families["nfnet"]
    inputs = load_sweep(root, bootstrap=4, seed=0)
    cmp = compare_all(inputs)[0]
    study = StudyConfig.from_dict(preset("tiny"))
    return {
        "Estimate": fam.power_law.a, "PowerLawFit": fam.power_law, "AllocationFit": fam.optimal_params_parabola,
        "LrTrendFit": fam.lr_trend, "ParametricFit": fam.parametric, "ExtrapolationCheck": fam.extrapolation,
        "FamilyFit": fam, "StudyFit": fit, "Comparison": cmp, "Reach": next(iter(cmp.reach_loss.values())),
        "Finding": study_findings(inputs, [cmp])[0], "Hardware": get_hardware("tpu-v4"),
        "Cell": plan_study(study).cells[0], "StudyConfig": study,
    }


FAMILIES = ["Estimate", "PowerLawFit", "AllocationFit", "LrTrendFit", "ParametricFit", "ExtrapolationCheck",
            "FamilyFit", "StudyFit", "Comparison", "Reach", "Finding", "Hardware", "Cell", "StudyConfig"]


@pytest.mark.parametrize("name", FAMILIES)
def test_result_classes_round_trip_through_strict_json(made, name):
    obj = made[name]
    assert type(obj).__name__ == name
    text = json.dumps(obj.to_dict(), allow_nan=False)
    back = type(obj).from_dict(json.loads(text))
    assert type(back) is type(obj)
    assert json.dumps(back.to_dict(), allow_nan=False) == text
    if name in ("Cell", "StudyConfig", "Finding", "Hardware", "Reach"):  # no NaN inside: equal as objects
        assert back == obj


def test_fit_items_come_back_typed_with_nan_intervals(made):
    fam = made["StudyFit"].from_dict(json.loads(json.dumps(made["StudyFit"].to_dict()))).families["nfnet"]
    assert type(fam.power_law.a).__name__ == "Estimate" and type(fam.lr_trend).__name__ == "LrTrendFit"
    assert fam.power_law.a.value == pytest.approx(made["PowerLawFit"].a.value, rel=1e-12)
    assert fam.extrapolation_irreducible is None and fam.chance_loss is None
    nan_rows = [v for rows in fam.samples.values() for r in rows for v in r if not v == v]
    assert all(isinstance(v, float) for v in nan_rows)  # a failed replicate's null reads as NaN


def test_files_of_earlier_versions_still_read(made):
    """Fields added later (curvature, allocation_method, the Cell's params_without_head, eval_resolution,
    precision) are missing from files written before them: they read as their defaults."""
    from convscale.scaling import StudyFit
    from convscale.sweep.planner import Cell

    d = json.loads(json.dumps(made["StudyFit"].to_dict()))
    fam = d["families"]["nfnet"]
    del fam["power_law"]["curvature"], fam["parametric"]["allocation_method"], fam["frontier_law_points"]
    old = StudyFit.from_dict(d).families["nfnet"]
    assert old.power_law.curvature is None and old.parametric.allocation_method == "closed form, one k"
    assert old.frontier_law_points == "all"
    cell = made["Cell"].to_dict()
    for k in ("params_without_head", "eval_resolution", "precision"):
        del cell[k]
    assert Cell.from_dict(cell).precision is None and Cell.from_dict(cell).cell_id == made["Cell"].cell_id


def test_fit_json_of_another_layout_or_with_a_foreign_key_is_refitted_not_read(made, tmp_path):
    from convscale.scaling import read_fit

    d = made["StudyFit"].to_dict()
    (tmp_path / "v1.json").write_text(json.dumps({**d, "version": 1}))
    (tmp_path / "foreign.json").write_text(json.dumps({**d, "new_field": 1}))
    (tmp_path / "ok.json").write_text(json.dumps(d))
    assert read_fit(tmp_path / "v1.json") is None and read_fit(tmp_path / "foreign.json") is None
    assert read_fit(tmp_path / "ok.json").to_dict() == d


def test_study_json_drops_the_lr_factors_of_explicit_lrs():
    from convscale.sweep.study import FamilySpec

    spec = FamilySpec(name="vit", models=("vit-a",), optimizer="adamw", lrs=(1e-3, 2e-3))
    assert to_dict(spec) == {"name": "vit", "models": ["vit-a"], "optimizer": "adamw", "lr_center": None,
                             "lrs": [1e-3, 2e-3], "train": {}, "seeds": None, "max_epochs": None}
    centred = FamilySpec(name="vit", models=("vit-a",), optimizer="adamw", lr_center=1e-3)
    assert to_dict(centred)["lr_factors"] == [0.5, 1.0, 2.0] and to_dict(centred)["lrs"] is None
