"""Warmup-stable-decay (WSD): warm-up, the peak lr held constant, then a cooldown to 0 over the
final ``cooldown_fraction`` of the steps (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
Training Beyond Fixed Training Durations": a 20 % cooldown of shape 1-sqrt matches cosine).

The cooldown starts at update ``total - round(cooldown_fraction * total)`` (never inside the
warm-up) and takes the shape from 1 there towards 0 at ``total``. Every update before it is the
same in runs of any length: a run that stops at its cooldown start is the trunk that cooldown
branches of several budgets can share (``Schedule.cooldown_start_step``).
"""

from __future__ import annotations

from dataclasses import dataclass

from convscale.train.schedules.base import Schedule, check_cooldown, cooldown_multiplier, cooldown_start


@dataclass(frozen=True)
class WSDConfig:
    cooldown_fraction: float = 0.2  # share of the run's steps in the final cooldown
    cooldown_shape: str = "1-sqrt"  # "1-sqrt" (Hägele et al.'s best) | "linear"

    def validate(self) -> None:
        check_cooldown(self.cooldown_fraction, self.cooldown_shape, "wsd")

    def build(self, total_steps: int, warmup_steps: int, peak_lr: float) -> Schedule:
        start = cooldown_start(total_steps, warmup_steps, self.cooldown_fraction)

        def after_warmup(step: int) -> float:
            return peak_lr * cooldown_multiplier(step, start, total_steps, self.cooldown_shape)

        return Schedule(total_steps, warmup_steps, peak_lr, after_warmup, start)
