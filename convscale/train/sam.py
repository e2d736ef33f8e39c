"""Sharpness-Aware Minimization (Foret et al. 2021), around the loop's own forward-backward.

One SAM step: gradient g at w (the loop's usual forward-backward); ascend to w + eps with
eps = rho * g / ||g|| (||.|| the global L2 norm over every parameter with a gradient); take the
gradient again at w + eps, with the same forward-backward function; restore w; give that second
gradient to the base optimizer (so AGC, weight decay and momentum act on the SAM gradient). A step
costs 2 forward-backward passes, which the loop counts in its training FLOPs.

    forward_backward()                                   # g at w
    sam_gradient_(model, rho, forward_backward)          # .grad = g at w + eps; w unchanged
    optimizer.step()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

#: guards the division for an all-zero gradient (eps is then 0: a plain step)
NORM_FLOOR = 1e-12


@dataclass
class Perturbation:
    """What ``sam_ascend_`` moved: the parameters and copies of their weights before the ascent."""

    params: list[torch.Tensor]
    saved: list[torch.Tensor]


def sam_epsilon(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``rho * g / ||g||`` with the global L2 norm over all ``grads`` (computed in fp32)."""
    norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
    scale = rho / norm.clamp_min(NORM_FLOOR)
    return torch._foreach_mul(grads, scale.to(grads[0].dtype))


@torch.no_grad()
def sam_ascend_(model: nn.Module, rho: float) -> Perturbation:
    """Move every parameter that has a gradient to ``w + eps`` and zero the gradients in place
    (in place: the second pass accumulates into the same tensors)."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [p.detach().clone() for p in params]
    torch._foreach_add_(params, sam_epsilon(grads, rho))
    torch._foreach_zero_(grads)
    return Perturbation(params, saved)


@torch.no_grad()
def sam_restore_(perturbation: Perturbation) -> None:
    """Put back the weights from before the ascent, bit for bit (subtracting eps again would round);
    the gradients, taken at ``w + eps``, are kept."""
    torch._foreach_copy_(perturbation.params, perturbation.saved)


def sam_gradient_(model: nn.Module, rho: float, forward_backward: Callable[[], object]) -> None:
    """Replace the gradient at w in ``.grad`` by the one at ``w + eps``: ascend, run
    ``forward_backward`` (which accumulates into the zeroed ``.grad``), restore w bit for bit."""
    perturbation = sam_ascend_(model, rho)
    forward_backward()
    sam_restore_(perturbation)
