"""What every model family provides, and the one FLOP convention used everywhere.

FLOP convention (the same for every family, stated once):
    FLOPs = 2 x multiply-accumulates (MACs) of convolutions, linear layers and matmuls
            (attention's QK^T and AV included); element-wise ops, norms and activations are not counted.
    training FLOPs per image = 3 x forward FLOPs per image (forward + backward ~ 2 x forward).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping, Protocol, TypeVar, runtime_checkable

from torch import nn

TRAIN_FLOPS_PER_FORWARD_FLOP = 3
FLOPS_PER_MAC = 2

C = TypeVar("C")


def train_flops_per_image(forward_flops_per_image: float) -> float:
    """Training FLOPs for one image given its forward FLOPs (the 3x convention)."""
    return TRAIN_FLOPS_PER_FORWARD_FLOP * forward_flops_per_image


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
    """What training code needs to know of a family, so it never compares family names.

    ``block_types``: the residual-block classes, the units of activation checkpointing and of
    FSDP wrapping; ``channels_last_cpu`` / ``channels_last_cuda``: the memory format by default on
    each device (NHWC where it is faster for the family); ``channels_last_allowed``: False where
    NHWC means nothing (a ViT's tokens); ``dropout_field`` / ``drop_path_field``: the config fields
    of classifier dropout and stochastic depth; ``finetune_defaults``: TrainConfig fields a
    fine-tune of the family starts from.
    """

    block_types: tuple[type[nn.Module], ...]
    dropout_field: str
    drop_path_field: str = "drop_path_rate"
    channels_last_allowed: bool = False
    channels_last_cpu: bool = False
    channels_last_cuda: bool = False
    finetune_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def channels_last(self, requested: bool | None, device_type: str) -> bool:
        """Whether the model runs in NHWC: ``requested`` (None: the device default) where allowed."""
        if not self.channels_last_allowed:
            return False
        if requested is not None:
            return requested
        return self.channels_last_cpu if device_type == "cpu" else self.channels_last_cuda


@runtime_checkable
class ModelConfig(Protocol):
    """A frozen dataclass that fully determines a model (num_classes included).

    Implementations: ``NFNetConfig`` (models/nfnet.py), ``ViTConfig`` (models/vit.py) and
    ``ConvNeXtConfig`` (models/convnext.py).
    The classifier of every model is ``model.classifier`` (an ``nn.Linear``), so training code
    can select it by the parameter names ``classifier.weight`` / ``classifier.bias``.
    """

    family: ClassVar[str]
    traits: ClassVar[FamilyTraits]
    num_classes: int

    @property
    def name(self) -> str:
        """Canonical, file-system-safe name, e.g. ``nfnet-f0`` or ``vit-w64-d4-p4``."""
        ...

    def build(self) -> nn.Module:
        """Construct the model (parameters on the current default device)."""
        ...

    def forward_flops(self, resolution: int) -> int:
        """Analytic forward FLOPs (2 x MACs) for one image of ``resolution`` x ``resolution``."""
        ...

    def check_resolution(self, resolution: int) -> None:
        """Raise ``UserError`` if the model cannot take images of this size."""
        ...

    @property
    def head_params(self) -> int:
        """Parameters of the classifier head ``model.classifier`` (weight and bias), analytic."""
        ...


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a model config, with its family so it can be rebuilt."""
    d = dataclasses.asdict(cfg)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return {"family": type(cfg).family, **d}


def config_from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Rebuild a config dataclass from ``config_to_dict`` output (lists become tuples)."""
    d = {k: v for k, v in d.items() if k != "family"}
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        from convscale.errors import UserError

        raise UserError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)  # type: ignore[call-arg]


def config_json(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)
