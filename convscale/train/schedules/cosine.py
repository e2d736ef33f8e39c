"""Cosine decay to 0 after the warm-up: the paper's schedule and the default."""

from __future__ import annotations

import math
from dataclasses import dataclass

from convscale.train.schedules.base import Schedule


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """After warm-up: ``peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``."""
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineConfig:
    """No options: the curve is fixed by the run's steps, warm-up and peak lr."""

    def validate(self) -> None:
        pass

    def build(self, total_steps: int, warmup_steps: int, peak_lr: float) -> Schedule:
        return Schedule(total_steps, warmup_steps, peak_lr,
                        lambda step: cosine_lr(step, total_steps, warmup_steps, peak_lr))
