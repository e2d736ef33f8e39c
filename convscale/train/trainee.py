"""The modules a run trains and one optimizer update of them: build (model, EMA copy, DDP/FSDP
wrapper, optimizer), the forward-backward over a batch's micro-batches (shared by SAM's second
pass), and the update itself (SAM, clipping, optimizer step, EMA)."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from convscale.models.layers import to_channels_last
from convscale.train.config import TrainConfig
from convscale.train.distributed import fsdp_shard, gradient_sync, resolve_parallel, wrap_model
from convscale.train.evaluate import autocast, training_loss
from convscale.train.finetune import PretrainedRun, load_pretrained_weights
from convscale.train.memory import enable_activation_checkpointing
from convscale.train.optim import build_optimizer, clip_global_norm_
from convscale.train.sam import sam_gradient_


@dataclass
class Trainee:
    """``model`` holds the parameters; ``train_model`` is what the forward calls (the DDP/FSDP
    wrapper, maybe compiled); the EMA copy and the optimizer."""

    model: nn.Module
    train_model: nn.Module
    ema_model: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def build_trainee(cfg: TrainConfig, model_cfg: Any, device: torch.device, num_classes: int,
                  pretrained: Optional[PretrainedRun] = None) -> Trainee:
    """Model at ``cfg.seed`` (or the pre-trained weights), in its memory format, wrapped for
    the process group, with its EMA copy and optimizer. ``cfg.precision`` must be resolved."""
    torch.manual_seed(cfg.seed)
    model = model_cfg.build().to(device)
    if pretrained is not None:
        load_pretrained_weights(model, pretrained, model_cfg)
    if cfg.loss == "sigmoid":  # start at the prior p = 1/C per class instead of 0.5
        with torch.no_grad():
            model.classifier.bias.fill_(-math.log(num_classes))
    channels_last = model_cfg.traits.channels_last(cfg.runtime.channels_last, device.type)
    if channels_last:
        model = to_channels_last(model)
    if cfg.runtime.activation_checkpointing:
        enable_activation_checkpointing(model)
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema_decay > 0 else None
    # before the optimizer: FSDP2 replaces ``model``'s parameters by sharded ones (DDP wraps it)
    param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # FSDP2 all-gathers in bf16
    train_model = wrap_model(model, cfg.runtime.parallel, device, param_dtype)
    if ema_model is not None and resolve_parallel(cfg.runtime.parallel) == "fsdp":
        # sharded like model: EMA updates stay local (and evaluation gathers what training does)
        fsdp_shard(ema_model, average_replicated_grads=False, param_dtype=param_dtype)
    optimizer = build_optimizer(model, cfg.optim)
    return Trainee(model, train_model, ema_model, optimizer, channels_last)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA of the weights with the NFNet reference warm-up: min(decay, (1 + t) / (10 + t))."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    ema_p = [p for p in ema_model.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)


def forward_backward(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                     device_type: str, loss_sum: Optional[torch.Tensor] = None) -> None:
    """Accumulate the gradient of the batch's mean loss into ``.grad``, one micro-batch at a time
    (``cfg.grad_accum_steps``), under autocast; gradients cross ranks once, after the last
    micro-batch. ``loss_sum``: each micro-batch's share of the mean loss is added to it, in order."""
    micro_batches = cfg.grad_accum_steps
    for i, (x, y) in enumerate(zip(images.chunk(micro_batches), labels.chunk(micro_batches))):
        with gradient_sync(trainee.train_model, trainee.model, enabled=i == micro_batches - 1):
            with autocast(device_type, cfg.precision):
                logits = trainee.train_model(x)
            # equal micro-batches: the mean of their mean losses is the full batch's mean loss
            loss = training_loss(logits, y, cfg.loss, cfg.label_smoothing) / micro_batches
            loss.backward()
        if loss_sum is not None:
            loss_sum += loss.detach()


def optimizer_update(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                     device_type: str, step: int, loss_sum: torch.Tensor) -> None:
    """One update on this rank's share of a batch at the lr already set: gradient (SAM's at
    ``w + eps`` when ``sam_rho > 0``), clipping, optimizer step, EMA. The batch's mean training
    loss is added to ``loss_sum``."""
    forward_backward(trainee, images, labels, cfg, device_type, loss_sum=loss_sum)
    if cfg.finetune.sam_rho > 0:  # the step uses the gradient taken at w + eps (sam.py)
        sam_gradient_(trainee.model, cfg.finetune.sam_rho,
                      functools.partial(forward_backward, trainee, images, labels, cfg, device_type))
    o = cfg.optim
    if o.optimizer == "adamw" and o.grad_clip_norm > 0:
        clip_global_norm_(trainee.model, o.grad_clip_norm)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    if trainee.ema_model is not None:
        update_ema(trainee.ema_model, trainee.model, o.ema_decay, step)
