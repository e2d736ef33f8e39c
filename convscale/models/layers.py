"""Layers shared by the model families (kept apart from the architectures that use them)."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool, scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if scale_by_keep:
        mask = mask / keep
    return x * mask


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.rate = float(rate)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
