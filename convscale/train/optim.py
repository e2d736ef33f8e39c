"""Optimizers: SGD + Nesterov + Adaptive Gradient Clipping (NFNet reference), and AdamW.

Parameter groups are decided by parameter NAME, never by position:
  * no weight decay: biases, gains (``...gain``, SkipInit ``...skip_gain``), normalisation layers,
    position embeddings, class tokens and the MAP probe (``NO_DECAY_RE``);
  * no AGC: the classifier weight ``classifier.weight`` (better unclipped at ImageNet scale, Brock et al.
    2021, §4; ``agc_clip_classifier`` clips it: tiny NFNets on 10 classes at lr 0.5-1.2 on CPU blew up
    with it unclipped, docs/results/demo-10class), and, with ``agc_exempt_scalar_gains``, every scalar
    gain (0-dim tensor named ``...gain``: SkipInit);
  * ``classifier_lr_scale``: ``classifier.weight`` and ``classifier.bias``.

AGC (Brock et al. 2021, §4): unit i of a tensor is one output unit: a conv weight [O, I, kh, kw] has O units
(norm over I, kh, kw), a linear weight [O, I] has O units (norm over I), a scalar or vector is one
unit (whole-tensor norm). A unit's gradient G_i is rescaled to lambda * max(|W_i|, eps) / |G_i|
when |G_i| / max(|W_i|, eps) > lambda, with |G_i| guarded below by 1e-6.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from convscale.train.config import OptimConfig
from convscale.train.distributed import is_sharded, local, process_group_of

CLASSIFIER_WEIGHT = "classifier.weight"
CLASSIFIER_PREFIX = "classifier."
NO_DECAY_RE = re.compile(
    r"(bias$|gain$|(^|\.)(norm|ln|bn)[^.]*\.|pos_embed|position_embed|cls_token|class_token|probe$)"
)
GRAD_NORM_FLOOR = 1e-6  # DM reference: max(|G|, 1e-6) in the AGC division


def no_weight_decay(name: str) -> bool:
    return bool(NO_DECAY_RE.search(name))


def is_scalar_gain(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 0 and name.endswith("gain")


@dataclass(frozen=True)
class GroupSpec:
    """How one parameter group is treated."""

    weight_decay: bool
    agc: bool
    lr_scale: float


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    agc: bool,
    agc_exempt_scalar_gains: bool,
    classifier_lr_scale: float = 1.0,
    clip_classifier: bool = False,
) -> list[dict]:
    """Optimizer param groups keyed by how each parameter (by name) is treated.

    Each group dict has ``params``, ``names``, ``weight_decay``, ``agc`` and ``lr_scale``.
    """
    groups: dict[GroupSpec, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clip = (agc and (clip_classifier or name != CLASSIFIER_WEIGHT)
                and not (agc_exempt_scalar_gains and is_scalar_gain(name, p)))
        spec = GroupSpec(
            weight_decay=not no_weight_decay(name),
            agc=clip,
            lr_scale=classifier_lr_scale if name.startswith(CLASSIFIER_PREFIX) else 1.0,
        )
        g = groups.setdefault(
            spec,
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if spec.weight_decay else 0.0,
                "agc": spec.agc,
                "lr_scale": spec.lr_scale,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    # A stable order (by first parameter's position) keeps checkpoints readable; names decide content.
    return list(groups.values())


def _unit_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's unit norms, flattened: one per output unit for ndim >= 2 (a norm over dims
    1.., one kernel per tensor, any memory format), one whole-tensor norm for scalars and vectors
    (all of them in one ``_foreach_norm``). The sum of squares is taken in the tensor's dtype."""
    out: list[Optional[torch.Tensor]] = [None] * len(tensors)
    small = [i for i, t in enumerate(tensors) if t.ndim < 2]
    for i, n in zip(small, torch._foreach_norm([tensors[i] for i in small]) if small else ()):
        out[i] = n.reshape(1)
    for i, t in enumerate(tensors):
        if t.ndim >= 2:
            out[i] = torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim))).reshape(-1)
    return out  # type: ignore[return-value]


def adaptive_grad_clip_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    clip: float,
    eps: float,
    sharded_whole: Optional[list[bool]] = None,
    group=None,
) -> None:
    """AGC in place on ``grads`` (Brock et al. 2021, §4): per-tensor unit norms, then one vectorised pass
    over all units of all tensors and one ``_foreach_mul_``; O(tensors) kernels, not O(units).

    FSDP2 (local shards, split on dim 0): rows of a matrix/conv shard are whole units, but a
    vector's norm is split over ranks; ``sharded_whole[i]`` marks such tensors, whose squared
    norms are summed over ``group`` (one all-reduce for all of them).
    """
    if not params:
        return
    counts = [p.shape[0] if p.ndim >= 2 else 1 for p in params]
    p_norm = torch.cat(_unit_norms(params))
    g_norm = torch.cat(_unit_norms(grads)).to(p_norm.dtype)
    if sharded_whole is not None and any(sharded_whole):
        starts = [0, *itertools.accumulate(counts)][:-1]
        idx = torch.tensor([s for s, w in zip(starts, sharded_whole) if w], device=p_norm.device)
        squares = torch.stack([p_norm[idx], g_norm[idx]]).square()
        torch.distributed.all_reduce(squares, group=group)
        p_norm[idx], g_norm[idx] = squares.sqrt().unbind(0)
    max_norm = p_norm.clamp_min_(eps).mul_(clip)
    scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
    # One scale per unit, shaped to broadcast over the unit's elements: [O, 1, 1, ...] or [1...].
    scales = [
        s.view((c,) + (1,) * (g.ndim - 1)) if g.ndim >= 2 else s.view([1] * g.ndim)
        for s, c, g in zip(scale.split(counts), counts, grads)
    ]
    torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales, grads)])


class SGDAGC(torch.optim.Optimizer):
    """SGD with Nesterov momentum, coupled L2 weight decay and AGC, in the DM reference's order:
    clip raw gradient -> g += wd * p -> m = mu * m + g -> g = g + mu * m -> p -= lr * g.

    Groups carry ``agc`` (bool) and ``weight_decay`` (see ``parameter_groups``); a group's ``lr``
    already includes its ``lr_scale`` (``set_lr``).
    All maths uses ``torch._foreach_*`` over a group's tensors. Gradients are modified in place.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = True,
                 agc_clip: float = 0.01, agc_eps: float = 1e-3):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0,
                        agc=True, agc_clip=agc_clip, agc_eps=agc_eps, lr_scale=1.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dparams = [p for p in group["params"] if p.grad is not None]
            if not dparams:
                continue
            # FSDP2: the maths runs on local shards (plain tensors); state stays DTensor for checkpoints
            params = [local(p) for p in dparams]
            grads = [local(p.grad) for p in dparams]
            if group["agc"] and group["agc_clip"] > 0:
                whole = [p.ndim < 2 and is_sharded(p) for p in dparams]
                pg = process_group_of(dparams[whole.index(True)]) if any(whole) else None
                adaptive_grad_clip_(params, grads, group["agc_clip"], group["agc_eps"], whole, pg)
            if group["weight_decay"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            mu = group["momentum"]
            if mu:
                bufs = []
                for p in dparams:  # bookkeeping only: fetch or create each tensor's buffer
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(local(state["momentum_buffer"]))
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
                if group["nesterov"]:
                    torch._foreach_add_(grads, bufs, alpha=mu)
                else:
                    grads = bufs
            torch._foreach_add_(params, grads, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The run's optimizer from a TrainConfig's ``optim`` group (lr is set every step by the schedule)."""
    if o.optimizer == "sgd_agc":
        groups = parameter_groups(model, o.weight_decay, o.agc_clip > 0, o.agc_exempt_scalar_gains,
                                  o.classifier_lr_scale, o.agc_clip_classifier)
        return SGDAGC(groups, lr=o.lr, momentum=o.momentum, nesterov=True, agc_clip=o.agc_clip, agc_eps=o.agc_eps)
    if o.optimizer == "adamw":
        groups = parameter_groups(model, o.weight_decay, False, False, o.classifier_lr_scale)
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, o.beta2),
                                 foreach=not fused, fused=fused or None)
    raise ValueError(f"unknown optimizer {o.optimizer!r}")  # validated earlier: a bug if reached


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_global_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global-norm gradient clipping (AdamW runs); returns the pre-clip norm."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
