"""Training losses and held-out evaluation.

Held-out ``loss`` is ALWAYS softmax cross-entropy without label smoothing, whatever the training
loss: it is the quantity the scaling laws are fitted to, and it must be comparable across runs
that trained with different losses or smoothing. Runs trained with the sigmoid loss also report
``sigmoid_loss`` (their own training objective) on the held-out set.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def autocast(device_type: str, precision: str):
    """bf16 autocast for activations (params stay fp32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sigmoid_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy against one-hot targets, summed over classes, mean over the batch
    (big_vision's ``sigmoid_xent`` convention)."""
    num_classes = logits.shape[-1]
    targets = F.one_hot(labels, num_classes).to(logits.dtype)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


def training_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str, label_smoothing: float) -> torch.Tensor:
    """The training objective on fp32 logits (reference: logits are cast to fp32 before the loss)."""
    logits = logits.float()
    if loss == "sigmoid":
        return sigmoid_cross_entropy(logits, labels, label_smoothing)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    sigmoid: bool = False,
) -> dict[str, Any]:
    """Held-out metrics over every batch: ``loss`` (softmax CE), ``top1``, ``top5`` (fractions),
    ``images``; plus ``sigmoid_loss`` when ``sigmoid``. Leaves the model in eval mode's caller state."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_sigmoid = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device.type, precision):
            logits = model(images)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").double()
        if sigmoid:
            total_sigmoid += sigmoid_cross_entropy(logits, labels).double() * labels.shape[0]
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=-1).sum()
        n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("the held-out set is empty")
    out = {
        "loss": float(total_loss) / n,
        "top1": int(correct1) / n,
        "top5": int(correct5) / n,
        "images": n,
    }
    if sigmoid:
        out["sigmoid_loss"] = float(total_sigmoid) / n
    return out
