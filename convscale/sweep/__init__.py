"""Compute-matched sweeps: a study (TOML) -> cells (model x budget x lr) -> runs -> a results table.

    from convscale.sweep import load_study, plan_study, SweepDir, LocalExecutor, collect
    study = load_study("studies/example.toml")
    plan = plan_study(study)
    sweep = SweepDir("sweeps/example"); sweep.prepare(plan)
    LocalExecutor(jobs=2).run(sweep.root, [c.cell_id for c in plan.cells])
    df = collect(sweep.root)
"""

from __future__ import annotations

from convscale.sweep.executors import CellOutcome, LocalExecutor, Resources, SlurmExecutor, build_executor, run_cell
from convscale.sweep.planner import Cell, Plan, Skipped, cell_train_config, make_cell_id, plan_study
from convscale.sweep.results import COLUMNS, collect, write_results
from convscale.sweep.study import Budgets, FamilySpec, StudyConfig, load_study, parse_study
from convscale.sweep.sweepdir import SweepDir

__all__ = [
    "COLUMNS", "Budgets", "Cell", "CellOutcome", "FamilySpec", "LocalExecutor", "Plan", "Resources",
    "SlurmExecutor", "Skipped", "StudyConfig", "SweepDir", "build_executor", "cell_train_config", "collect", "load_study",
    "make_cell_id", "parse_study", "plan_study", "run_cell", "write_results",
]
