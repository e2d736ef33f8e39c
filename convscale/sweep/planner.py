"""Turn a study into cells: one training run per (model, budget, learning rate, seed).

Each cell's length comes from ``convscale.train.config.budget_to_steps`` (the one budget -> steps
conversion the trainer also uses) and its training FLOPs per image from
``TrainConfig.train_flops_per_image`` (3 x forward FLOPs, x2 with SAM: the loop's own charge), so a
cell's planned steps, images and training FLOPs are exactly what its run will do. With FLOP budgets
(IsoFLOP) a model trains for budget / (training FLOPs per image) images, rounded to whole batches:
its training FLOPs are within half a batch of the budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from convscale.errors import UserError
from convscale.serde import Serde, to_dict
from convscale.sweep.study import FamilySpec, StudyConfig


@dataclass(frozen=True)
class Cell(Serde):
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
    seed: Optional[int] = None  # TrainConfig.seed of the run; None: the family's base seed (plans before seeds)
    # cooldown branches (study cooldown_branches): None for a run of its own
    role: Optional[str] = None  # "trunk" | "branch"
    trunk_id: Optional[str] = None  # a branch's trunk
    start_step: Optional[int] = None  # a branch's first step: its cooldown start, a checkpoint of its trunk
    schedule_steps: Optional[int] = None  # a trunk's schedule length (its largest branch's steps); it stops at ``steps``
    branch_steps: Optional[tuple[int, ...]] = None  # a trunk's checkpoints its branches start from
    warmup_steps: Optional[int] = None  # the warm-up every cell of a trunk shares
    #: training FLOPs the cell itself computes: a trunk all of its steps, a branch its cooldown only,
    #: any other run its ``train_flops`` (None in plans before branches: read as train_flops)
    spent_flops: Optional[float] = None

    @property
    def own_flops(self) -> float:
        """The training FLOPs this cell computes itself (``spent_flops``, else ``train_flops``)."""
        return self.spent_flops if self.spent_flops is not None else self.train_flops


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
            "skipped": [to_dict(s) for s in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _fmt_budget(kind: str, value: float) -> str:
    if kind == "trunk":
        return "trunk"
    if kind == "train_flops":
        return f"C{value:g}"
    if kind == "epochs":
        return f"E{value:g}"
    return f"I{int(value)}"


def make_cell_id(model: str, budget_kind: str, budget: float, lr: float, family: Optional[str] = None,
                 seed_index: Optional[int] = None) -> str:
    """Stable, file-system-safe id, e.g. ``nfnet-w0.0625-d1.1.1__C1e+12__lr0.2``; with several seeds
    per cell, ``__s0``, ``__s1``, ... follow (a one-seed study keeps the ids of plans before seeds)."""
    cid = f"{model}__{_fmt_budget(budget_kind, budget)}__lr{lr:g}"
    if seed_index is not None:
        cid = f"{cid}__s{seed_index}"
    return f"{cid}__{family}" if family else cid


def make_trunk_id(model: str, lr: float, family: Optional[str] = None, seed_index: Optional[int] = None) -> str:
    """Id of the trunk of a model's cooldown branches at one lr (and seed), e.g. ``vit-w8-d4-p4__trunk__lr0.004``."""
    return make_cell_id(model, "trunk", 0, lr, family, seed_index)


def base_train_config(study: StudyConfig, fam: FamilySpec):
    """The TrainConfig shared by a family's cells (study [train], the family's overrides, then the
    study's ``overrides``: `sweep run --set`)."""
    from convscale.train.config import TrainConfig, apply_overrides

    from convscale.train.precision import resolve_precision

    kw = {**study.train, **fam.train}
    model_overrides = dict(kw.pop("model_overrides", {}) or {})
    cfg = apply_overrides(TrainConfig(data=study.data), kw).replace(model_overrides=model_overrides)
    cfg = apply_overrides(cfg, study.overrides)  # `sweep run --set`: over every table of the study
    if study.log:  # the [log] table: its trackers, its options over any [train] log_options
        options = {**cfg.runtime.log_options, **{k: v for k, v in study.log.items() if k != "to"}}
        cfg = cfg.replace(log=list(study.log.get("to", [])), log_options=options)
    # "auto" is resolved here, for the study's device: every cell records the same numerics
    precision = resolve_precision(cfg.precision, "cuda" if study.data.device == "cuda" else "cpu")
    return cfg.replace(optimizer=fam.optimizer, precision=precision)


def cell_train_config(study: StudyConfig, cell: Cell, run_dir: str, data_path: Optional[str] = None,
                      sweep_dir: Optional[str] = None):
    """The full TrainConfig of one cell: what `convscale train --config` receives.

    ``data_path``: a shared procedural-stream cache (``share_procedural_data``) the cell reads.
    ``sweep_dir``: the sweep's folder, where trackers that share a store keep it (MLflow)."""
    from convscale.train.loggers import with_sweep_defaults

    fam = next(f for f in study.families if f.name == cell.family)
    cfg = base_train_config(study, fam)
    if cfg.runtime.log:  # one tracked run per cell, grouped under the study's name
        cfg = cfg.replace(log_options=with_sweep_defaults(cfg.runtime.log, cfg.runtime.log_options, study.name,
                                                          Path(sweep_dir) if sweep_dir else None))
    if data_path is not None:
        cfg = cfg.replace(data=cfg.data.replace(path=data_path))
    # quiet: one line per evaluation instead of a progress bar, since the output goes to a log file
    if cell.precision is not None:  # as planned (an "auto" study keeps the plan machine's choice)
        cfg = cfg.replace(precision=cell.precision)
    if cell.seed is not None:
        cfg = cfg.replace(seed=cell.seed)
    budget = {cell.budget_kind: cell.budget}
    if cell.role is not None:
        cfg = cfg.replace(warmup_steps=cell.warmup_steps)
    if cell.role == "trunk":  # the schedule of its largest branch, stopped where that one's cooldown starts
        budget = {"steps": cell.schedule_steps}
        cfg = cfg.replace(stop_at_step=cell.steps, keep_checkpoint_steps=list(cell.branch_steps or ()))
    elif cell.role == "branch":
        cfg = cfg.replace(branch_from=str(Path(run_dir).parent / str(cell.trunk_id)))
    return cfg.replace(run_dir=str(run_dir), model=cell.model, lr=cell.lr, quiet=True, **budget)


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
        max_epochs = fam.max_epochs if fam.max_epochs is not None else study.budgets.max_epochs
        for name in fam.models:
            probe = get_config(name, num_classes=num_classes, **base.model_overrides)
            probe.check_resolution(resolution)
            if base.finetune.eval_resolution is not None:
                probe.check_resolution(base.finetune.eval_resolution)
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
                n_seeds = study.seeds_of(fam)
                for lr, s in itertools.product(fam.learning_rates(), range(n_seeds)):
                    cells.append(
                        Cell(
                            cell_id=make_cell_id(mcfg.name, kind, budget, lr, tag, s if n_seeds > 1 else None),
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
                            eval_resolution=base.finetune.eval_resolution or resolution,
                            precision=base.precision,
                            seed=base.seed + s,
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
    if study.cooldown_branches:
        cells = _as_branches(study, cells, num_train_images)
    cells.sort(key=lambda c: (c.role != "trunk", c.budget, c.family, c.flops_per_image, c.model, c.lr, c.seed))
    return Plan(study=study, cells=cells, skipped=skipped, epoch_images=epoch_images)


def _as_branches(study: StudyConfig, cells: list[Cell], num_train_images: Optional[int]) -> list[Cell]:
    """The cells of one run per budget as cooldown branches of one trunk per (family, model, lr,
    seed). Every branch keeps its budget's steps and schedule, with the warm-up its trunk's cells
    share (``warmup_steps``, else ``warmup_fraction`` of the smallest budget's steps); it starts from
    the trunk's checkpoint at its own cooldown start, the trunk stops at its largest branch's."""
    from convscale.train.config import build_schedule, resolve_warmup_steps

    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.family, c.model, c.lr, c.seed), []).append(c)
    out: list[Cell] = []
    for (family, model, lr, seed), runs in groups.items():
        fam = next(f for f in study.families if f.name == family)
        base = base_train_config(study, fam).replace(lr=lr)
        runs.sort(key=lambda c: c.steps)
        warmup = resolve_warmup_steps(base, runs[0].steps)
        base = base.replace(warmup_steps=warmup)
        starts = [build_schedule(base, c.steps).cooldown_start_step for c in runs]
        if any(k is None for k in starts):
            raise UserError(f"cooldown_branches: schedule {base.optim.schedule!r} of family {family!r} has no cooldown; "
                            f"use schedule = \"wsd\"")
        tfpi = runs[0].train_flops / runs[0].images
        stop = max(starts)
        tag = family if runs[0].cell_id.endswith(f"__{family}") else None  # as the runs' ids (make_cell_id)
        seed_index = seed - base.seed if study.seeds_of(fam) > 1 and seed is not None else None
        longest = runs[-1]
        trunk = dataclasses.replace(
            longest, cell_id=make_trunk_id(model, lr, tag, seed_index), role="trunk", steps=stop,
            images=stop * longest.batch_size, epochs=longest.epochs * stop / longest.steps,
            train_flops=tfpi * stop * longest.batch_size, budget_flops=None, schedule_steps=longest.steps,
            branch_steps=tuple(sorted(set(starts))), warmup_steps=warmup,
            spent_flops=tfpi * stop * longest.batch_size,
        )
        out.append(trunk)
        for c, k in zip(runs, starts):
            out.append(dataclasses.replace(c, role="branch", trunk_id=trunk.cell_id, start_step=k, warmup_steps=warmup,
                                           spent_flops=tfpi * (c.steps - k) * c.batch_size))
    return out


@dataclass(frozen=True)
class PlanCost:
    """A plan's training compute: what its budget runs represent and what its cells compute."""

    represented_flops: float  # sum of the budget runs' train_flops: the cost of one run per budget
    spent_flops: float  # what the cells compute (with branches: trunks plus cooldowns)

    @property
    def ratio(self) -> float:
        return self.spent_flops / self.represented_flops if self.represented_flops else float("nan")


def plan_cost(plan: Plan) -> PlanCost:
    """Compute of a plan: branches count the budget they represent, trunks only as spent."""
    runs = [c for c in plan.cells if c.role != "trunk"]
    return PlanCost(sum(c.train_flops for c in runs), sum(c.own_flops for c in plan.cells))


def _images_for(kind: str, budget: float, train_flops_per_image: float, epoch_images: int) -> float:
    if kind == "train_flops":
        return budget / train_flops_per_image
    if kind == "epochs":
        return budget * epoch_images
    return float(budget)


def both_plan_costs(study: StudyConfig, plan: Plan) -> tuple[PlanCost, PlanCost]:
    """(one run per budget, cooldown branches): the cost of ``plan`` and of the study's other plan,
    which keeps the study's schedule where it has a cooldown, else takes WSD's default (20 %, 1-sqrt).
    UserError if the other plan cannot be made."""
    from convscale.train.config import build_schedule

    other = dataclasses.replace(study, cooldown_branches=not study.cooldown_branches)
    if other.cooldown_branches and any(build_schedule(base_train_config(study, f), 1000).cooldown_start_step is None
                                       for f in study.families):
        other = dataclasses.replace(
            other, train={**study.train, "schedule": "wsd", "schedule_options": {}},
            families=tuple(dataclasses.replace(f, train={k: v for k, v in f.train.items()
                                                         if k not in ("schedule", "schedule_options")})
                           for f in study.families))
    mine, theirs = plan_cost(plan), plan_cost(plan_study(other))
    return (theirs, mine) if study.cooldown_branches else (mine, theirs)
