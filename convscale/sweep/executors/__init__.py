"""Where a sweep's cells run: a registry of executors, each one module with a ``Config`` dataclass
(its options, with ``parallel_cells``: how many cells run at once; JSON round-trips through
``executor_config``) and ``build(config, train_command,
on_outcome)``, whose result runs cells with ``run(root, cell_ids) -> list[CellOutcome]``.

    local   cells as subprocesses here, ``jobs`` at once            (local.py)
    slurm   one submitit array task per cell                        (slurm.py)

How one cell runs (its lock, subprocess, outcome, failure record) is the same for all of them
(cell.py). A new executor is one module with ``Config`` and ``build`` plus its line in ``EXECUTORS``.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Callable, Optional, Protocol

from convscale.errors import UserError
from convscale.sweep.executors import local, slurm
from convscale.sweep.executors.cell import CellOutcome, Resources, run_cell, stop_children, visible_gpus
from convscale.sweep.executors.local import LocalExecutor
from convscale.sweep.executors.slurm import SlurmExecutor, torchrun_train_command

#: executor name -> its module (``Config``, ``build``)
EXECUTORS: dict[str, ModuleType] = {"local": local, "slurm": slurm}


class Executor(Protocol):
    def run(self, root: Any, cell_ids: list[str],
            on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> list[CellOutcome]: ...


def _module(name: str) -> ModuleType:
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]


def executor_config(name: str, options: Optional[dict[str, Any]] = None):
    """The ``Config`` of executor ``name`` from a dict of its fields; an unknown field is a UserError."""
    cls = _module(name).Config
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise UserError(f"executor {name!r} has no option(s) {unknown}; valid: {sorted(valid)}")
    return cls(**options)


def build_executor(name: str, options: Optional[dict[str, Any]] = None, train_command: Optional[list[str]] = None,
                   on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> Executor:
    """Executor ``name`` built from its options (a dict of its ``Config`` fields, or the Config)."""
    config = options if dataclasses.is_dataclass(options) else executor_config(name, options)
    return _module(name).build(config, train_command, on_outcome)


__all__ = ["EXECUTORS", "CellOutcome", "Executor", "LocalExecutor", "Resources", "SlurmExecutor", "build_executor",
           "executor_config", "run_cell", "stop_children", "torchrun_train_command", "visible_gpus"]
