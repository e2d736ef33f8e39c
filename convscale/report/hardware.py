"""Training FLOPs -> device-hours on reference hardware, with the assumption stated.

device_hours = train_flops / (peak_flops_per_second * mfu) / 3600. The peaks are the dense bf16
datasheet numbers; the paper reports compute in TPU-v4 *core* hours (two TensorCores per chip),
so ``tpu-v4`` converts to core hours. The same table lives in ``convscale.sweep.probe``; it is
repeated here because importing the sweep stage pulls in torch, which the report must not need.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from convscale.errors import UserError
from convscale.serde import Serde

DEFAULT_MFU = 0.4

# name -> (peak bf16 dense FLOP/s per device, the device-hour unit, source)
_DEVICES: dict[str, tuple[float, str, str]] = {
    "h100": (989.4e12, "H100 GPU-hours", "NVIDIA H100 SXM, bf16 dense peak 989.4 TFLOP/s"),
    "tpu-v4": (137.5e12, "TPU-v4 core-hours", "TPU-v4 core, bf16 peak 137.5 TFLOP/s (275 per chip, 2 cores)"),
}
HARDWARE_CHOICES = (*_DEVICES, "none")


@dataclasses.dataclass(frozen=True)
class Hardware(Serde):
    """A reference device and the model-FLOPs utilisation assumed on it."""

    name: str
    peak_flops_per_second: float
    mfu: float
    unit: str  # e.g. "TPU-v4 core-hours"
    source: str

    @property
    def flops_per_hour(self) -> float:
        return self.peak_flops_per_second * self.mfu * 3600.0

    def device_hours(self, train_flops: Any) -> Any:
        """Device-hours (in ``unit``) to do ``train_flops`` at ``mfu`` of peak."""
        return np.asarray(train_flops, dtype=float) / self.flops_per_hour

    def flops(self, device_hours: Any) -> Any:
        return np.asarray(device_hours, dtype=float) * self.flops_per_hour

    def caption(self) -> str:
        """The stated assumption, for captions and legends."""
        return f"{self.unit} assume {self.source} at {100 * self.mfu:g}% MFU"


def get_hardware(name: str, mfu: float = DEFAULT_MFU) -> Hardware | None:
    """The reference device ``name`` (h100, tpu-v4) at ``mfu``; None for ``none``."""
    if name == "none":
        return None
    if name not in _DEVICES:
        raise UserError(f"unknown --hardware {name!r}; choose one of {', '.join(HARDWARE_CHOICES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (a fraction of peak, e.g. 0.4); got {mfu}")
    peak, unit, source = _DEVICES[name]
    return Hardware(name=name, peak_flops_per_second=peak, mfu=float(mfu), unit=unit, source=source)
