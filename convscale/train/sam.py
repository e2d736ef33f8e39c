"""Sharpness-Aware Minimization (Foret et al. 2021), as two helpers around the loop's own step.

One SAM step: gradient g at w (the loop's usual forward-backward); ascend to w + eps with
eps = rho * g / ||g|| (||.|| the global L2 norm over every parameter with a gradient); take the
gradient again at w + eps; restore w; give that second gradient to the base optimizer (so AGC,
weight decay and momentum act on the SAM gradient). A step costs 2 forward-backward passes,
which the loop counts in its training FLOPs.

    loss = forward_backward()                  # g at w
    perturbation = sam_ascend_(model, rho)    # w += eps, grads zeroed in place
    forward_backward()                         # g at w + eps
    sam_restore_(perturbation)                 # w -= eps
    optimizer.step()
"""

from __future__ import annotations

from dataclasses import dataclass

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
