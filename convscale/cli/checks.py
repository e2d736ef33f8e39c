"""Checks of numeric flags that several commands share, before any work starts."""

from __future__ import annotations

import math
from typing import Optional

from convscale.errors import UserError


def check_number(flag: str, value: Optional[float], low: float = 0.0, high: float = math.inf,
                 low_open: bool = True) -> None:
    """UserError unless ``value`` (None: not given) is a finite number in (low, high] (or [low, high])."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise UserError(f"{flag} must be a finite number in {bounds}, got {value}")
