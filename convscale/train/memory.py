"""Memory options: activation checkpointing of residual blocks, and the peak-memory reading."""

from __future__ import annotations

import os
import resource
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from convscale.models import is_residual_block



def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    inner = type(self).forward.__get__(self)  # the class's forward, on THIS module
    if not torch.is_grad_enabled():  # evaluation: nothing to save memory on
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each residual block's (a family's ``traits.block_types``) activations in the backward pass instead of storing them.

    The block's ``forward`` is replaced on the instance, so parameter names (and with them
    checkpoints, optimizer state and the by-name parameter groups) are unchanged; RNG state is
    preserved, so dropout and stochastic depth draw the same masks in the recomputation and the
    numbers equal a run without it. The replacement is a method bound to the block, so a
    ``copy.deepcopy`` of the model (the EMA model) runs its own weights, never the original's.
    Returns the number of blocks wrapped.
    """
    wrapped = 0
    for module in model.modules():
        if is_residual_block(module) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_checkpointed_forward, module)
            wrapped += 1
    return wrapped


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def physical_memory_bytes() -> float:
    """RAM of this machine (inf where the platform does not tell)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")
