"""Turn a study into cells: one training run per (model, budget, learning rate).

Each cell's length comes from ``convscale.train.config.budget_to_steps`` (the one budget -> steps
conversion the trainer also uses) and its training FLOPs per image from
``TrainConfig.train_flops_per_image`` (3 x forward FLOPs, x2 with SAM: the loop's own charge), so a
cell's planned steps, images and training FLOPs are exactly what its run will do. With FLOP budgets
(IsoFLOP) a model trains for budget / (training FLOPs per image) images, rounded to whole batches:
its training FLOPs are within half a batch of the budget.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from convscale.errors import UserError
from convscale.sweep.study import FamilySpec, StudyConfig


@dataclass(frozen=True)
class Cell:
    """One planned training run. FLOPs follow models/base.py (2 x MACs; training = 3 x forward per
    forward-backward pass, two passes per step with SAM). Fields after ``budget_flops`` were added
    later: plan.json files written before them read as None."""

    cell_id: str
    study: str
    family: str
    model: str  # canonical zoo name
    optimizer: str
    lr: float
    budget_kind: str  # "train_flops" | "epochs" | "images"
    budget: float  # the budget in its own unit (FLOPs, epochs or images)
    params: int  # every parameter, the classifier head included
    flops_per_image: int  # forward FLOPs per image at ``resolution``
    resolution: int
    batch_size: int
    steps: int
    images: int  # images the run will see (steps x batch_size)
    epochs: float  # images / images per epoch
    train_flops: float  # 3 x flops_per_image x images, x2 with SAM (TrainConfig.train_flops_per_image)
    # the IsoFLOP budget (training FLOPs every cell of the budget shares); None for epoch or image
    # budgets, whose cells each have their own compute (the fits then use the Pareto frontier)
    budget_flops: Optional[float]
    params_without_head: Optional[int] = None  # params minus the classifier head's (count_params)
    eval_resolution: Optional[int] = None  # px of the held-out evaluation (TrainConfig.eval_resolution)
    precision: Optional[str] = None  # bf16 | fp32, "auto" resolved when the study was planned

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        return cls(**d)


@dataclass(frozen=True)
class Skipped:
    """A (model, budget) pair left out of the plan, and why."""

    family: str
    model: str
    budget: float
    reason: str


@dataclass
class Plan:
    study: StudyConfig
    cells: list[Cell]
    skipped: list[Skipped] = field(default_factory=list)
    epoch_images: int = 0  # images in one epoch (the data's training set, or TrainConfig.epoch_images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study.name,
            "epoch_images": self.epoch_images,
            "cells": [c.to_dict() for c in self.cells],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _fmt_budget(kind: str, value: float) -> str:
    if kind == "train_flops":
        return f"C{value:g}"
    if kind == "epochs":
        return f"E{value:g}"
    return f"I{int(value)}"


def make_cell_id(model: str, budget_kind: str, budget: float, lr: float, family: Optional[str] = None) -> str:
    """Stable, file-system-safe id, e.g. ``nfnet-w0.0625-d1.1.1__C1e+12__lr0.2``."""
    cid = f"{model}__{_fmt_budget(budget_kind, budget)}__lr{lr:g}"
    return f"{cid}__{family}" if family else cid


def base_train_config(study: StudyConfig, fam: FamilySpec):
    """The TrainConfig shared by a family's cells (study [train], then the family's overrides)."""
    from convscale.train.config import TrainConfig, apply_overrides

    from convscale.train.precision import resolve_precision

    kw = {**study.train, **fam.train}
    model_overrides = dict(kw.pop("model_overrides", {}) or {})
    cfg = apply_overrides(TrainConfig(data=study.data), kw)
    if study.log:  # the [log] table: its trackers, its options over any [train] log_options
        options = {**cfg.log_options, **{k: v for k, v in study.log.items() if k != "to"}}
        cfg = cfg.replace(log=list(study.log.get("to", [])), log_options=options)
    # "auto" is resolved here, for the study's device: every cell records the same numerics
    precision = resolve_precision(cfg.precision, "cuda" if study.data.device == "cuda" else "cpu")
    return cfg.replace(model_overrides=model_overrides, optimizer=fam.optimizer, precision=precision)


def cell_train_config(study: StudyConfig, cell: Cell, run_dir: str, data_path: Optional[str] = None,
                      sweep_dir: Optional[str] = None):
    """The full TrainConfig of one cell: what `convscale train --config` receives.

    ``data_path``: a shared procedural-stream cache (``share_procedural_data``) the cell reads.
    ``sweep_dir``: the sweep's folder, where trackers that share a store keep it (MLflow)."""
    from convscale.train.loggers import with_sweep_defaults

    fam = next(f for f in study.families if f.name == cell.family)
    cfg = base_train_config(study, fam)
    if cfg.log:  # one tracked run per cell, grouped under the study's name
        cfg = cfg.replace(log_options=with_sweep_defaults(cfg.log, cfg.log_options, study.name,
                                                          Path(sweep_dir) if sweep_dir else None))
    if data_path is not None:
        cfg = cfg.replace(data=cfg.data.replace(path=data_path))
    # quiet: one line per evaluation instead of a progress bar, since the output goes to a log file
    if cell.precision is not None:  # as planned (an "auto" study keeps the plan machine's choice)
        cfg = cfg.replace(precision=cell.precision)
    return cfg.replace(run_dir=str(run_dir), model=cell.model, lr=cell.lr, quiet=True,
                       **{cell.budget_kind: cell.budget})


def data_facts(study: StudyConfig) -> tuple[Optional[int], int]:
    """(training images per epoch or None for a stream, number of classes) of the study's data."""
    if study.data.kind == "procedural":
        return None, study.data.num_classes
    from convscale.data import build_source

    source = build_source(study.data)
    return source.num_train_images, source.num_classes


def plan_study(study: StudyConfig) -> Plan:
    """All cells of a study; (model, budget) pairs no run can meet are left out and listed."""
    from convscale.models import config_at_resolution, count_params, get_config
    from convscale.train.config import budget_to_steps

    num_train_images, num_classes = data_facts(study)
    resolution = study.data.resolution
    kind, budgets = study.budgets.kind, study.budgets.values
    max_epochs = study.budgets.max_epochs

    counts: dict[str, int] = {}
    for fam in study.families:
        for m in fam.models:
            canon = get_config(m).name
            counts[canon] = counts.get(canon, 0) + 1

    cells: list[Cell] = []
    skipped: list[Skipped] = []
    epoch_images = 0
    # smallest training FLOPs of one batch over all models, to name the fix of an infeasible budget
    min_batch_flops: dict[float, float] = {}
    for fam in study.families:
        base = base_train_config(study, fam)
        epoch_images = num_train_images or base.epoch_images
        for name in fam.models:
            probe = get_config(name, num_classes=num_classes, **base.model_overrides)
            probe.check_resolution(resolution)
            if base.eval_resolution is not None:
                probe.check_resolution(base.eval_resolution)
            mcfg = config_at_resolution(name, resolution, num_classes=num_classes, **base.model_overrides)
            fwd = int(mcfg.forward_flops(resolution))
            tfpi = base.train_flops_per_image(fwd)
            params = count_params(mcfg)
            # == count_params(mcfg, include_head=False), without building the model a second time
            params_without_head = params - mcfg.head_params
            tag = fam.name if counts[mcfg.name] > 1 else None
            for budget in budgets:
                budget_cfg = base.replace(**{kind: budget})
                images_wanted = _images_for(kind, budget, tfpi, epoch_images)
                reason = None
                min_batch_flops[budget] = min(min_batch_flops.get(budget, float("inf")), base.batch_size * tfpi)
                if images_wanted < base.batch_size:
                    reason = f"{images_wanted:.0f} images is less than one batch of {base.batch_size}"
                elif max_epochs is not None and images_wanted / epoch_images > max_epochs:
                    reason = f"{images_wanted / epoch_images:.3g} epochs is more than max_epochs={max_epochs:g}"
                if reason:
                    skipped.append(Skipped(fam.name, mcfg.name, budget, reason))
                    continue
                steps = budget_to_steps(budget_cfg, tfpi, num_train_images)
                images = steps * base.batch_size
                train_flops = float(tfpi * images)
                for lr in fam.learning_rates():
                    cells.append(
                        Cell(
                            cell_id=make_cell_id(mcfg.name, kind, budget, lr, tag),
                            study=study.name,
                            family=fam.name,
                            model=mcfg.name,
                            optimizer=fam.optimizer,
                            lr=lr,
                            budget_kind=kind,
                            budget=budget,
                            params=params,
                            flops_per_image=fwd,
                            resolution=resolution,
                            batch_size=base.batch_size,
                            steps=steps,
                            images=images,
                            epochs=images / epoch_images,
                            train_flops=train_flops,
                            budget_flops=float(budget) if kind == "train_flops" else None,
                            params_without_head=params_without_head,
                            eval_resolution=base.eval_resolution or resolution,
                            precision=base.precision,
                        )
                    )
    for budget in budgets:
        if not any(c.budget == budget for c in cells):
            reasons = "; ".join(f"{s.model}: {s.reason}" for s in skipped if s.budget == budget)
            if kind == "train_flops":
                fix = (
                    f"raise it to at least {min_batch_flops[budget]:.3g} FLOPs (one batch of the smallest model), "
                    f"lower batch_size, or remove it from [budgets]"
                )
            else:
                fix = "raise it, lower batch_size, raise max_epochs, or remove it from [budgets]"
            raise UserError(f"no model can meet budget {kind}={budget:g} ({reasons}); {fix}")
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):  # only when one family names a model twice (e.g. by an alias)
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise UserError(f"cell {dup} is planned twice: a family lists the same model twice; list it once")
    cells.sort(key=lambda c: (c.budget, c.family, c.flops_per_image, c.model, c.lr))
    return Plan(study=study, cells=cells, skipped=skipped, epoch_images=epoch_images)


def _images_for(kind: str, budget: float, train_flops_per_image: float, epoch_images: int) -> float:
    if kind == "train_flops":
        return budget / train_flops_per_image
    if kind == "epochs":
        return budget * epoch_images
    return float(budget)
