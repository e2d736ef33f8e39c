"""Metric loggers: metrics.jsonl always, experiment trackers beside it when a run asks for them.

A run names its trackers in ``TrainConfig.log`` (``["tensorboard", "wandb"]``, or
``convscale train --log tensorboard,wandb``) and gives each its options in
``TrainConfig.log_options`` (``{"wandb": {"project": "scaling"}}``); a study does the same in a
``[log]`` table, and its cells are grouped under the study's name (``sweep_defaults``).

Adding a tracker is one module plus one line in ``LOGGERS``. The module defines:
  ``Options``         a dataclass of its settings (JSON-typed fields, every one with a default)
  ``EXTRA``           the pyproject extra that installs its library: pip install 'convscale[EXTRA]'
  ``sweep_defaults``  (sweep_name, sweep_dir) -> options that put a sweep's cells in one group
  ``build``           (Options, LoggerContext) -> an object with write(row), close() and ``state``
                      (a JSON dict stored in the run dir, read back on resume as ``context.state``),
                      optionally abandon(): at exit of a run that ended by an exception
and imports its library inside ``build`` only: a run that tracks nothing never pays for it.

This module is torch-free and imports no tracker: TrainConfig.validate() calls ``check_log``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from convscale.errors import UserError

#: tracker name -> the module that implements it
LOGGERS = {
    "tensorboard": "convscale.train.loggers.tensorboard",
    "wandb": "convscale.train.loggers.wandb",
    "mlflow": "convscale.train.loggers.mlflow",
}


def logger_module(name: str) -> ModuleType:
    """The module of tracker ``name``; UserError naming the valid ones."""
    if name not in LOGGERS:
        raise UserError(f"unknown logger {name!r} in log; valid: {sorted(LOGGERS)} (metrics.jsonl is always written)")
    return importlib.import_module(LOGGERS[name])


def parse_options(name: str, options: Any) -> Any:
    """Tracker ``name``'s ``Options`` from a JSON dict; UserError for an unknown or mistyped field."""
    from convscale.train.config import check_field_types

    cls = logger_module(name).Options
    if not isinstance(options, dict):
        raise UserError(f"log_options.{name} must be a table of {cls.__name__} fields, not {options!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise UserError(f"unknown log_options.{name} field(s) {unknown}; valid: {sorted(valid)}")
    opts = cls(**options)
    check_field_types(opts, f"log_options.{name}.")
    return opts


def check_log(log: list[str], log_options: dict[str, Any]) -> None:
    """UserError unless ``log`` names known trackers once each and ``log_options`` fits them."""
    if not all(isinstance(n, str) for n in log):
        raise UserError(f"log must be a list of logger names like ['tensorboard', 'wandb'], not {log!r}")
    if len(set(log)) != len(log):
        raise UserError(f"log names a logger twice ({log}); name each once")
    for name in log:
        logger_module(name)
    for name, options in log_options.items():
        parse_options(name, options)


def with_sweep_defaults(log: list[str], log_options: dict[str, Any], sweep_name: str,
                        sweep_dir: Optional[Path]) -> dict[str, Any]:
    """``log_options`` for one cell of sweep ``sweep_name``: each chosen tracker's sweep grouping
    (W&B group, MLflow experiment, TensorBoard subfolder), under what the study set itself."""
    out = dict(log_options)
    for name in log:
        out[name] = {**logger_module(name).sweep_defaults(sweep_name, sweep_dir), **out.get(name, {})}
    return out


def open_loggers(cfg, run_dir: Path, resolved: dict[str, Any], start_step: int):
    """metrics.jsonl plus the trackers ``cfg.runtime.log`` names, behind one write(row) / close().

    Called on the process that writes files (rank 0) only. A tracker that cannot start is a
    UserError naming the fix; one that fails later is warned about once and dropped."""
    from convscale.train.loggers.fanout import open_fanout

    return open_fanout(cfg.runtime.log, cfg.runtime.log_options, Path(run_dir), resolved, start_step)
