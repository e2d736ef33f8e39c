"""`sweep run --smoke`: any study shrunk to a minute-long check of the whole path (plan -> cells ->
results -> fit -> report), as big_vision's ``runlocal`` shrinks a config.

What is kept: the data (kind, resolution, classes), every family and model, the training recipe.
What shrinks: one learning rate per family (the middle of its grid), two budgets of 2 and 4 steps
of a batch of 8 images (image budgets: the fits see a grid of 2 data sizes x the models), a
procedural held-out set of 64 images, no evaluations but the last. The demo study's smoke run
takes ~30 s on 2 CPU cores; the paper's (F0-F7 at 224 px) keeps its models and resolution, so
its 12 cells want a GPU to take minutes rather than hours. Real data keeps its held-out split.

A smoke study is named ``<name>-smoke`` and its default directory is ``sweeps/<name>-smoke``;
``check_no_mixing`` refuses a smoke run into a real sweep's directory and a real run into a smoke
one, so smoke results never enter a real results table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convscale.errors import UserError
from convscale.fileio import read_json
from convscale.sweep.study import Budgets, StudyConfig, with_overrides

SMOKE_SUFFIX = "-smoke"
SMOKE_BATCH = 8  # images per step
SMOKE_STEPS = (2, 4)  # the two budgets, in steps
SMOKE_HELDOUT_IMAGES = 64  # procedural data's held-out set


def is_smoke(name: str) -> bool:
    return name.endswith(SMOKE_SUFFIX)


def smoke_study(study: StudyConfig) -> StudyConfig:
    """The study shrunk as the module docstring says (a smoke study is returned as it is)."""
    if is_smoke(study.name):
        return study
    families = []
    for fam in study.families:
        lrs = fam.learning_rates()
        families.append(dataclasses.replace(fam, lrs=(lrs[len(lrs) // 2],), lr_center=None))
    shrunk = dataclasses.replace(
        study, name=study.name + SMOKE_SUFFIX, families=tuple(families),
        budgets=Budgets(images=tuple(s * SMOKE_BATCH for s in SMOKE_STEPS)))
    settings = {"batch_size": SMOKE_BATCH, "grad_accum_steps": 1, "eval_every_steps": 0, "eval_batch_size": 0}
    if study.data.kind == "procedural":
        settings["data.heldout_images"] = min(SMOKE_HELDOUT_IMAGES, study.data.heldout_images)
    return with_overrides(shrunk, settings, where="--smoke")


def check_no_mixing(root: str | Path, study: StudyConfig) -> None:
    """UserError if ``root`` holds a sweep of the other kind (smoke vs real) than ``study``."""
    old = read_json(Path(root) / "study.json")
    if not isinstance(old, dict) or not isinstance(old.get("name"), str):
        return
    if is_smoke(old["name"]) != is_smoke(study.name):
        what = "a smoke run" if is_smoke(old["name"]) else f"the real sweep of study {old['name']!r}"
        raise UserError(f"{root} holds {what}; smoke and real results never share a directory: "
                        f"give another --dir (a smoke run defaults to sweeps/<study name>{SMOKE_SUFFIX})")
