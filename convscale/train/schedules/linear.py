"""Linear decay to 0 after the warm-up."""

from __future__ import annotations

from dataclasses import dataclass

from convscale.train.schedules.base import Schedule


@dataclass(frozen=True)
class LinearConfig:
    """After warm-up: ``peak * (1 - (step - warmup) / (total - warmup))``."""

    def validate(self) -> None:
        pass

    def build(self, total_steps: int, warmup_steps: int, peak_lr: float) -> Schedule:
        decay_steps = max(total_steps - warmup_steps, 1)

        def after_warmup(step: int) -> float:
            return peak_lr * (1.0 - min((step - warmup_steps) / decay_steps, 1.0))

        return Schedule(total_steps, warmup_steps, peak_lr, after_warmup)
