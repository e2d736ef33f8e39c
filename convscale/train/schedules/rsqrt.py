"""Inverse square root after the warm-up, optionally with a final cooldown, as in Zhai et al. 2022
("Scaling Vision Transformers"; big_vision's ``decay_type="rsqrt"`` with ``timescale``).

After warm-up: ``peak / sqrt(1 + (step - warmup) / timescale_steps)``, which is big_vision's
``rsqrt((step + timescale - warmup) / timescale)``: the peak at the first update after warm-up,
half the peak ``3 x timescale_steps`` updates later. With ``cooldown_fraction > 0`` the last
``round(cooldown_fraction * total)`` updates are multiplied by the cooldown shape (big_vision's
``cooldown_steps``: linear, ``(total - step) / cooldown``). Unlike big_vision, warm-up counts from
``(step + 1) / warmup`` (base.py), not from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from convscale.errors import UserError
from convscale.train.schedules.base import Schedule, check_cooldown, cooldown_multiplier, cooldown_start


@dataclass(frozen=True)
class RsqrtConfig:
    timescale_steps: int = 10_000  # big_vision's default
    cooldown_fraction: float = 0.0  # share of the run's steps in the final cooldown; 0: none
    cooldown_shape: str = "linear"  # "linear" | "1-sqrt"

    def validate(self) -> None:
        if self.timescale_steps < 1:
            raise UserError(f"schedule_options.timescale_steps of rsqrt must be >= 1, not {self.timescale_steps}")
        check_cooldown(self.cooldown_fraction, self.cooldown_shape, "rsqrt")

    def build(self, total_steps: int, warmup_steps: int, peak_lr: float) -> Schedule:
        start = cooldown_start(total_steps, warmup_steps, self.cooldown_fraction)

        def after_warmup(step: int) -> float:
            rsqrt = 1.0 / math.sqrt(1.0 + (step - warmup_steps) / self.timescale_steps)
            return peak_lr * rsqrt * cooldown_multiplier(step, start, total_steps, self.cooldown_shape)

        return Schedule(total_steps, warmup_steps, peak_lr, after_warmup,
                        start if self.cooldown_fraction > 0 else None)
