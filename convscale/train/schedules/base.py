"""What every schedule shares: the linear warm-up, the cooldown shapes, and the built ``Schedule``.

Step convention (all schedules): ``step`` is the 0-based number of the update about to be taken,
of ``total_steps``. Warm-up: ``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps``
updates, so the first update is not wasted at lr 0 and the last warm-up update uses the peak.
After warm-up each schedule gives a multiplier of the peak; the first update after warm-up uses
the peak and curves that decay to 0 would reach it at ``step == total_steps`` (never taken).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from convscale.errors import UserError

#: cooldown shapes: multiplier of the lr at ``progress`` in [0, 1) through the cooldown
COOLDOWN_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    # Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


@dataclass(frozen=True)
class Schedule:
    """A schedule built for one run: ``lr(step)`` for each update, and where its cooldown starts."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    #: lr for an update at or after the warm-up (``step >= warmup_steps``)
    after_warmup: Callable[[int], float]
    #: first update of the final cooldown; None for schedules without one (cosine, linear)
    cooldown_start_step: Optional[int] = None

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        return self.after_warmup(step)


def cooldown_start(total_steps: int, warmup_steps: int, cooldown_fraction: float) -> int:
    """First update of a cooldown over ``round(cooldown_fraction * total_steps)`` final updates,
    never inside the warm-up."""
    return max(total_steps - int(round(cooldown_fraction * total_steps)), warmup_steps)


def cooldown_multiplier(step: int, start: int, total_steps: int, shape: str) -> float:
    """1 before ``start``; then ``shape`` from 1 at ``start`` towards 0 at ``total_steps``."""
    if step < start:
        return 1.0
    progress = min((step - start) / max(total_steps - start, 1), 1.0)
    return COOLDOWN_SHAPES[shape](progress)


def check_cooldown(cooldown_fraction: float, cooldown_shape: str, where: str) -> None:
    """UserError for a cooldown no run can use."""
    if not 0.0 <= cooldown_fraction <= 1.0:
        raise UserError(f"schedule_options.cooldown_fraction of {where} must be in [0, 1], not {cooldown_fraction}")
    if cooldown_shape not in COOLDOWN_SHAPES:
        raise UserError(f"schedule_options.cooldown_shape of {where} must be one of {list(COOLDOWN_SHAPES)}, "
                        f"not {cooldown_shape!r}")
