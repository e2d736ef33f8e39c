"""Learning-rate schedules: a registration table of option dataclasses, each with ``build()``.

A run picks one by name (``TrainConfig.schedule``) and sets its options as a table
(``schedule_options``, e.g. ``{"cooldown_fraction": 0.1}``). A new schedule is one module with a
frozen dataclass of options (``validate()``; ``build(total_steps, warmup_steps, peak_lr)`` ->
``Schedule``, sharing base.py's warm-up) plus one line in ``SCHEDULES``. Torch-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from convscale.errors import UserError
from convscale.train.schedules.base import Schedule
from convscale.train.schedules.cosine import CosineConfig, cosine_lr
from convscale.train.schedules.linear import LinearConfig
from convscale.train.schedules.rsqrt import RsqrtConfig
from convscale.train.schedules.wsd import WSDConfig

SCHEDULES: dict[str, type] = {
    "cosine": CosineConfig,
    "linear": LinearConfig,
    "rsqrt": RsqrtConfig,
    "wsd": WSDConfig,
}


def schedule_config(name: str, options: dict[str, Any]) -> Any:
    """The options dataclass of schedule ``name``; UserError for an unknown name or option
    (values are checked by the caller's type check and ``validate()``)."""
    if name not in SCHEDULES:
        raise UserError(f"schedule must be one of {list(SCHEDULES)}, not {name!r}")
    cls = SCHEDULES[name]
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"unknown schedule_options {unknown} for schedule {name!r}; valid: {valid or 'none'}")
    return cls(**options)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """The default (cosine) schedule's lr for update ``step``: the function runs used before the registry."""
    return CosineConfig().build(total_steps, warmup_steps, peak_lr).lr(step)


__all__ = ["SCHEDULES", "Schedule", "cosine_lr", "lr_at", "schedule_config"]
