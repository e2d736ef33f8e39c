"""A study: which models, learning rates and compute budgets a sweep trains, read from TOML.

Study file (every table and field is checked; an unknown one is a ``UserError`` naming the valid ones)::

    name = "mini"                       # file-system-safe; the default sweep dir is sweeps/<name>
    [data]                              # DataConfig fields
    kind = "procedural"
    resolution = 16
    num_classes = 100
    [train]                             # TrainConfig defaults for every cell
    batch_size = 128
    precision = "auto"                  # bf16 where the device has it natively, else fp32
    schedule = "wsd"                    # optional: cosine (default) | linear | rsqrt | wsd
    schedule_options = {cooldown_fraction = 0.2}  # that schedule's options (train/schedules/)
    [[family]]
    name = "nfnet"
    models = ["nfnet-w0.0625-d1.1.1", "nfnet-w0.125-d1.1.1"]
    optimizer = "sgd_agc"
    lr_center = 0.2                     # grid = lr_center x lr_factors ...
    lr_factors = [0.5, 1, 2]
    # lrs = [0.1, 0.2]                  # ... or explicit learning rates
    # seeds = 3                         # optional: this family's seeds per cell (else the study's)
    # max_epochs = 0.3                  # optional: this family's epoch cap (else [budgets] max_epochs)
    [family.train]                      # optional TrainConfig overrides for this family only
    agc_exempt_scalar_gains = true
    [budgets]                           # exactly one of train_flops / epochs / images
    train_flops = [1e11, 3e11, 1e12]    # IsoFLOP: images = budget / (3 x forward FLOPs per image, x2 with SAM)
    max_epochs = 100                    # optional: leave out cells that would need more epochs
    [log]                               # optional experiment tracking (metrics.jsonl is always written)
    to = ["tensorboard", "wandb", "mlflow"]
    [log.wandb]                         # optional per-tracker options (convscale/train/loggers)
    project = "scaling"

Every cell is tracked as its own run named by its cell id, grouped under the study's name (W&B
group, MLflow experiment, TensorBoard subfolder of ``[log.tensorboard] dir``); MLflow's store is
SWEEP_DIR/mlruns unless ``[log.mlflow] tracking_uri`` or $MLFLOW_TRACKING_URI says otherwise.

A top-level ``seeds = N`` (default 1; a family's own ``seeds`` wins) trains every (model, budget,
lr) cell N times, with TrainConfig ``seed`` = the study's seed + 0 .. N-1: the model's
initialisation and the training randomness change, the data stream and held-out set do not, so the
seeds measure the run-to-run noise the fits resample (scaling/design.py).

A top-level ``cooldown_branches = true`` (with a schedule that has a cooldown, e.g. ``schedule =
"wsd"``) trains, per (model, lr, seed), one trunk at constant lr up to the cooldown start of its
largest budget, and each budget as a branch from the trunk's checkpoint at that budget's own
cooldown start (sweep/planner.py): the same runs as one per budget, for the trunk plus the
cooldowns' compute. Warm-up is then a fixed number of steps for every budget (``warmup_steps``, or
``warmup_fraction`` of the smallest budget's steps), so the branches share their prefix.

A top-level ``overrides`` table holds settings in the form of `train --set` (``warmup_fraction =
0.1``, ``"model_overrides.drop_path_rate" = 0.1``: dotted keys quoted in TOML) applied to every cell
over all of the above; `sweep run --set` writes them there (``with_overrides``), so the sweep dir's
study.json records them.

A top-level ``share_procedural_data = true`` makes `sweep run` generate the procedural training
stream once (as many images as the longest cell needs) and point every cell's ``data.path`` at it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.serde import to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUDGET_KINDS = ("train_flops", "epochs", "images")
#: TrainConfig fields the sweep sets per cell; a study may not set them in [train].
CELL_FIELDS = ("run_dir", "model", "data", "optimizer", "lr", "epochs", "steps", "images", "train_flops")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class FamilySpec:
    """One model family of a study: its models, optimizer and learning-rate grid."""

    name: str
    models: tuple[str, ...]
    optimizer: str
    lr_center: Optional[float] = None
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    lrs: Optional[tuple[float, ...]] = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this family
    seeds: Optional[int] = None  # runs per cell, each with its own seed; None: the study's ``seeds``
    #: leave out this family's cells that would need more epochs; None: [budgets] max_epochs
    max_epochs: Optional[float] = None

    def learning_rates(self) -> list[float]:
        """The family's learning-rate grid, smallest first, without duplicates."""
        if self.lrs is not None:
            values = list(self.lrs)
        else:
            assert self.lr_center is not None
            values = [self.lr_center * f for f in self.lr_factors]
        # 12 significant digits: 0.1 x 3 and 0.3 are the same grid point
        return sorted({float(f"{v:.12g}") for v in values})

    def serde_write(self, d: dict[str, Any]) -> dict[str, Any]:
        if self.lrs is not None:  # explicit lrs: the centre and factors do not apply
            del d["lr_factors"]
        return d


@dataclass(frozen=True)
class Budgets:
    """Compute budgets. Exactly one of ``train_flops`` (FLOPs per run), ``epochs`` or ``images``."""

    train_flops: tuple[float, ...] = ()
    epochs: tuple[float, ...] = ()
    images: tuple[int, ...] = ()
    max_epochs: Optional[float] = None  # a model needing more epochs than this is left out

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k))

    @property
    def values(self) -> tuple[float, ...]:
        return getattr(self, self.kind)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: data, shared training settings, families and budgets."""

    name: str
    data: DataConfig
    families: tuple[FamilySpec, ...]
    budgets: Budgets
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig defaults for every cell
    #: procedural data only: generate the training stream once into SWEEP_DIR/data and let every
    #: cell read it (same images by construction; saves regenerating them in each of many cells)
    share_procedural_data: bool = False
    seeds: int = 1  # runs per (model, budget, lr) cell, seeds 0..seeds-1 added to TrainConfig.seed
    #: one constant-lr trunk per (model, lr, seed) and a cooldown branch per budget (see above)
    cooldown_branches: bool = False
    #: experiment trackers for every cell: {"to": [names], <name>: {options}} (the [log] table)
    log: dict[str, Any] = field(default_factory=dict)

    def seeds_of(self, family: FamilySpec) -> int:
        """Runs per cell of ``family``: its own ``seeds`` if given, else the study's."""
        return family.seeds if family.seeds is not None else self.seeds
    #: `train --set`-style ``key: value`` settings over [train] and every [family.train] (`sweep run --set`)
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The study as ``study.json`` holds it (``from_dict`` reads it back through the TOML checks)."""
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudyConfig":
        """Build and validate a study from a dict (parsed TOML, or ``to_dict`` output)."""
        return parse_study(d)

    @classmethod
    def from_json(cls, text: str) -> "StudyConfig":
        return parse_study(json.loads(text))

    def write(self, path: str | Path) -> None:
        from convscale.fileio import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file (or a ``study.json`` written by a sweep)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file {str(p)!r} not found; give the path of a .toml study (see studies/example.toml)")
    try:
        text = p.read_bytes().decode("utf-8")
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        what = "UTF-8 text" if isinstance(e, UnicodeDecodeError) else "valid " + ("JSON" if p.suffix == ".json" else "TOML")
        raise UserError(f"{p}: not {what} ({str(e)[:120]}); fix the file") from None
    if p.suffix == ".json":
        return parse_study(raw, where=str(p))
    return parse_study(raw, where=str(p))


def _check_keys(d: Any, valid: tuple[str, ...] | list[str], where: str) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a table, got {type(d).__name__}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise UserError(f"unknown field(s) {unknown} in {where}; valid fields: {sorted(valid)}")


def _numbers(v: Any, where: str, positive: bool = True) -> tuple[float, ...]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v:
        raise UserError(f"{where} must be a non-empty list of numbers, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise UserError(f"{where} must hold numbers only, got {x!r}")
        if positive and x <= 0:
            raise UserError(f"{where} must hold positive numbers, got {x!r}")
        out.append(x)
    return tuple(out)


def _check_train_overrides(d: Any, where: str) -> dict[str, Any]:
    """Validate a [train]-like table against TrainConfig (fields the sweep sets are refused)."""
    from convscale.train.config import FIELD_GROUP, GROUPS, TrainConfig

    # a group's fields by their own names (flat, as before the groups) or in its table ([train.optim])
    names = [f.name for f in dataclasses.fields(TrainConfig)] + list(FIELD_GROUP)
    valid = [n for n in names if n not in CELL_FIELDS]
    if isinstance(d, dict):
        grouped = [k for g in GROUPS if isinstance(d.get(g), dict) for k in d[g]]
        taken = sorted((set(d) | set(grouped)) & set(CELL_FIELDS))
        if taken:
            raise UserError(
                f"{where} sets {taken}, which the sweep sets per cell: give data in [data], "
                f"optimizer and lr_center/lrs in [[family]], budgets in [budgets]"
            )
    _check_keys(d, valid, where)
    return dict(d)


def _parse_family(d: Any, i: int) -> FamilySpec:
    where = f"[[family]] #{i + 1}"
    _check_keys(d, [f.name for f in dataclasses.fields(FamilySpec)], where)
    d = {k: v for k, v in d.items() if v is not None}  # JSON (to_dict) spells "not given" as null
    from convscale.train.config import OPTIMIZERS

    for key in ("name", "models", "optimizer"):
        if key not in d:
            raise UserError(f"{where} needs '{key}'")
    name = d["name"]
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise UserError(f"{where}: name must be a short file-system-safe string like 'nfnet', got {name!r}")
    where = f"[[family]] {name!r}"
    models = d["models"]
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise UserError(f"{where}: models must be a non-empty list of zoo names (see `convscale models`)")
    if len(set(models)) != len(models):
        raise UserError(f"{where}: models lists a model twice; list each once")
    if d["optimizer"] not in OPTIMIZERS:
        raise UserError(f"{where}: optimizer must be one of {list(OPTIMIZERS)}, got {d['optimizer']!r}")
    has_center, has_lrs = "lr_center" in d, "lrs" in d
    if has_center == has_lrs:
        raise UserError(f"{where}: give either lr_center (with optional lr_factors) or lrs, not {'both' if has_lrs else 'neither'}")
    if has_lrs and "lr_factors" in d:
        raise UserError(f"{where}: lr_factors goes with lr_center, not with explicit lrs")
    spec = FamilySpec(
        name=name,
        models=tuple(models),
        optimizer=d["optimizer"],
        lr_center=_numbers(d["lr_center"], f"{where} lr_center")[0] if has_center else None,
        lr_factors=_numbers(d.get("lr_factors", [0.5, 1.0, 2.0]), f"{where} lr_factors"),
        lrs=_numbers(d["lrs"], f"{where} lrs") if has_lrs else None,
        train=_check_train_overrides(d.get("train", {}), f"{where} train"),
        seeds=_seeds(d["seeds"], f"{where} seeds") if "seeds" in d else None,
        max_epochs=_max_epochs(d["max_epochs"], f"{where} max_epochs") if "max_epochs" in d else None,
    )
    return spec


#: more runs per cell than any study needs to see its noise; past it a typo would plan thousands of runs
MAX_SEEDS = 100


def _seeds(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SEEDS:
        raise UserError(f"{where} must be a whole number of runs per cell from 1 to {MAX_SEEDS}, got {v!r}")
    return v


def _max_epochs(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise UserError(f"{where} must be a number of epochs > 0, got {v!r}")
    return float(v)


def _parse_budgets(d: Any) -> Budgets:
    _check_keys(d, [f.name for f in dataclasses.fields(Budgets)], "[budgets]")
    # JSON (to_dict) writes every kind, the unused ones as empty lists
    d = {k: v for k, v in d.items() if v is not None and v != []}
    given = [k for k in BUDGET_KINDS if k in d]
    if len(given) != 1:
        raise UserError(
            f"[budgets] needs exactly one of {list(BUDGET_KINDS)} (a list), got {given or 'none'}"
        )
    kind = given[0]
    values = _numbers(d[kind], f"[budgets] {kind}")
    if kind == "images":
        if any(v != int(v) for v in values):
            raise UserError(f"[budgets] images must be whole numbers, got {list(values)}")
        values = tuple(int(v) for v in values)
    else:
        values = tuple(float(v) for v in values)
    if len(set(values)) != len(values):
        raise UserError(f"[budgets] {kind} lists a budget twice; list each once")
    max_epochs = d.get("max_epochs")
    if max_epochs is not None:
        max_epochs = _max_epochs(max_epochs, "[budgets] max_epochs")
    return Budgets(**{kind: tuple(sorted(values))}, max_epochs=max_epochs)


def _parse_log(d: Any) -> dict[str, Any]:
    """The [log] table: ``to`` (tracker names) and one options table per tracker."""
    from convscale.train.loggers import LOGGERS, check_log

    _check_keys(d, ["to", *LOGGERS], "[log]")
    to = d.get("to", [])
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list):
        raise UserError(f"[log] to must be a list of logger names like ['tensorboard', 'wandb'], got {to!r}")
    options = {k: v for k, v in d.items() if k != "to"}
    check_log(to, options)
    return {"to": list(to), **options} if to or options else {}


def parse_study(raw: dict[str, Any], where: str = "study") -> StudyConfig:
    """Validate a parsed study (TOML or JSON) and build the typed config."""
    top = ("name", "data", "train", "family", "families", "budgets", "share_procedural_data", "seeds",
           "cooldown_branches", "overrides", "log")
    _check_keys(raw, top, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise UserError(f"{where}: 'name' must be a file-system-safe string like 'mini-isoflop', got {name!r}")
    data_raw = raw.get("data", {})
    _check_keys(data_raw, [f.name for f in dataclasses.fields(DataConfig)], "[data]")
    try:
        data = DataConfig(**data_raw)
    except TypeError as e:  # pragma: no cover - keys were checked above
        raise UserError(f"[data]: {e}") from None
    train = _check_train_overrides(raw.get("train", {}), "[train]")
    fams_raw = raw.get("family", raw.get("families"))
    if not isinstance(fams_raw, list) or not fams_raw:
        raise UserError(f"{where}: add at least one [[family]] table with name, models, optimizer and lr_center or lrs")
    families = tuple(_parse_family(f, i) for i, f in enumerate(fams_raw))
    names = [f.name for f in families]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: two [[family]] tables share a name ({names}); give each a distinct name")
    if "budgets" not in raw:
        raise UserError(f"{where}: add a [budgets] table with train_flops, epochs or images")
    budgets = _parse_budgets(raw["budgets"])
    share = raw.get("share_procedural_data", False)
    if not isinstance(share, bool):
        raise UserError(f"{where}: share_procedural_data must be true or false, got {share!r}")
    seeds = _seeds(raw["seeds"], f"{where} seeds") if raw.get("seeds") is not None else 1
    branches = raw.get("cooldown_branches", False)
    if not isinstance(branches, bool):
        raise UserError(f"{where}: cooldown_branches must be true or false, got {branches!r}")
    overrides = raw.get("overrides", {})
    _check_cell_fields(overrides, f"{where} overrides")
    study = StudyConfig(name=name, data=data, families=families, budgets=budgets, train=train,
                        share_procedural_data=share, seeds=seeds, cooldown_branches=branches,
                        overrides=dict(overrides), log=_parse_log(raw.get("log", {})))
    _check_types(study)
    return study


def _check_cell_fields(overrides: Any, where: str) -> None:
    if not isinstance(overrides, dict):
        raise UserError(f"{where} must be a table of key = value settings")
    taken = sorted(k for k in overrides if k.partition(".")[0] in CELL_FIELDS)
    if taken:
        raise UserError(f"{where} sets {taken}, which the sweep sets per cell from the study's [[family]] "
                        f"models / optimizer / lrs and its [budgets]; change those in the study file instead")


def with_overrides(study: StudyConfig, overrides: dict[str, Any], where: str = "--set") -> StudyConfig:
    """The study with `train --set`-style settings applied to every cell (``convscale.train.config.
    apply_overrides`` reads them): ``data.<field>`` goes to the study's data, anything else over
    [train] and each [family.train]. A field the sweep sets per cell (model, lr, budgets) is a UserError."""
    if not overrides:
        return study
    from convscale.train.config import TrainConfig, apply_overrides

    data_keys = {k: v for k, v in overrides.items() if k.startswith("data.")}
    rest = {k: v for k, v in overrides.items() if k not in data_keys}
    _check_cell_fields(rest, where)
    data = apply_overrides(TrainConfig(data=study.data), data_keys).data if data_keys else study.data
    new = dataclasses.replace(study, data=data, overrides={**study.overrides, **rest})
    _check_types(new)
    return new


def _check_types(study: StudyConfig) -> None:
    """Let TrainConfig check values (types via its own coercion, then validate()) for each family."""
    from convscale.train.config import TrainConfig, apply_overrides

    for fam in study.families:
        kw = {**study.train, **fam.train}
        model_overrides = kw.pop("model_overrides", {})
        if not isinstance(model_overrides, dict):
            raise UserError(f"[[family]] {fam.name!r}: model_overrides must be a table")
        cfg = apply_overrides(TrainConfig(data=study.data), kw).replace(model_overrides=model_overrides)
        cfg = apply_overrides(cfg, study.overrides)
        cfg = cfg.replace(
            optimizer=fam.optimizer,
            lr=fam.learning_rates()[0],
            images=cfg.batch_size,
        )
        cfg.validate()
        if study.cooldown_branches:
            from convscale.train.config import build_schedule

            if build_schedule(cfg, 1000).cooldown_start_step is None:
                raise UserError(f"[[family]] {fam.name!r}: cooldown_branches needs a schedule with a cooldown; "
                                f"set schedule = \"wsd\" in [train] (schedule {cfg.optim.schedule!r} has none)")
