"""Learning-rate schedule: linear warm-up, then cosine decay to 0 over the run's own steps."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate for update number ``step`` (0-based) of ``total_steps``.

    Warm-up: ``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` updates, so the
    first update is not wasted at lr 0 and the last warm-up update uses the peak. Then
    ``peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``: the first update after
    warm-up uses the peak and the curve would reach 0 at ``step == total_steps`` (never taken).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
