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
def heldout_sums(
    models: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    sigmoid: bool = False,
) -> dict[str, dict[str, float]]:
    """One pass over the held-out ``batches`` for every model (the EMA model shares the decoded
    images): per model the sums ``loss`` (softmax CE), ``top1``/``top5`` (hits) and, with
    ``sigmoid``, ``sigmoid_loss``, plus ``images``. Sums, not means, so ranks can add them;
    ``means`` divides. The images may be empty for one rank of a distributed run."""
    training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    zero = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
    totals = {name: {"loss": zero(torch.float64), "sigmoid_loss": zero(torch.float64),
                     "top1": zero(torch.int64), "top5": zero(torch.int64)} for name in models}
    n = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for name, model in models.items():
            with autocast(device.type, precision):
                logits = model(images)
            logits = logits.float()
            t = totals[name]
            t["loss"] += F.cross_entropy(logits, labels, reduction="sum").double()
            if sigmoid:
                t["sigmoid_loss"] += sigmoid_cross_entropy(logits, labels).double() * labels.shape[0]
            hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
            t["top1"] += hits[:, 0].sum()
            t["top5"] += hits.any(dim=-1).sum()
        n += labels.shape[0]
    for name, m in models.items():
        m.train(training[name])
    out = {}
    for name, t in totals.items():  # one host sync per model, after the last batch
        keys = ["loss", "top1", "top5"] + (["sigmoid_loss"] if sigmoid else [])
        out[name] = {k: float(t[k]) for k in keys}
        out[name]["images"] = n
    return out


def means(sums: dict[str, float]) -> dict[str, Any]:
    """Held-out metrics from ``heldout_sums``' sums: ``loss``, ``top1``, ``top5`` (fractions),
    ``images`` (and ``sigmoid_loss``)."""
    n = int(sums["images"])
    if n == 0:
        raise ValueError("the held-out set is empty")
    out: dict[str, Any] = {k: (round(v) if k in ("top1", "top5") else v) / n for k, v in sums.items() if k != "images"}
    out["images"] = n
    return out


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    sigmoid: bool = False,
) -> dict[str, Any]:
    """Held-out metrics of one model over every batch: ``loss`` (softmax CE), ``top1``, ``top5``
    (fractions), ``images``; plus ``sigmoid_loss`` when ``sigmoid``. Leaves the model in its
    train/eval mode."""
    return means(heldout_sums({"": model}, batches, device, precision, channels_last, sigmoid)[""])
