"""ConvNeXt family (Liu et al. 2022, "A ConvNet for the 2020s"), laid out as timm's ``convnext_*``.

Stem: 4x4 stride-4 patchify conv + LayerNorm. Four stages; between them LayerNorm + 2x2 stride-2
conv. Block: 7x7 depthwise conv -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale
(init 1e-6) -> stochastic depth -> residual. Head: global average pool -> LayerNorm -> dropout ->
``model.classifier`` (``nn.Linear``, zero-initialised as the ViT's, so the initial loss is ln C).
LayerNorms have eps 1e-6 and normalise over channels.

Names: ``convnext-t`` … ``convnext-xl`` (``ConvNeXt-T``, ``convnext_tiny`` are aliases); scaled
down by stem width and per-stage depths, widths doubling per stage: ``convnext-w32-d1.1.3.1``
(1-4 stages); other widths as ``convnext-c32.48.96-d1.1.1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import ClassVar

import torch
from torch import nn

from convscale.errors import UserError
from convscale.models.base import FLOPS_PER_MAC, FamilyTraits
from convscale.models.layers import DropPath

IN_CHANNELS = 3
STEM_STRIDE = 4
MLP_RATIO = 4

#: (depths, widths) by size tag; Liu et al. 2022 Table 9 / timm convnext.py
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "t": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "b": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "l": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xl": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
TIMM_SIZES = {"tiny": "t", "small": "s", "base": "b", "large": "l", "xlarge": "xl"}


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """A ConvNeXt fully determined (num_classes included). ``drop_path_rate`` rises linearly from
    0 at the first block to this at the last; ``dropout`` is before the classifier."""

    family: ClassVar[str] = "convnext"
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int = 1000
    kernel_size: int = 7
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    layernorm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 1 <= len(self.depths) <= 4 or len(self.depths) != len(self.widths):
            raise UserError(f"ConvNeXt needs 1-4 stages with one width each, got depths {self.depths} "
                            f"and widths {self.widths}")
        for f in ("depths", "widths"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, f)):
                raise UserError(f"ConvNeXtConfig.{f} must be positive integers, got {getattr(self, f)!r}")
        for f in ("num_classes", "kernel_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise UserError(f"ConvNeXtConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.kernel_size % 2 == 0:
            raise UserError(f"ConvNeXt kernel_size must be odd (same padding), got {self.kernel_size}")
        for f in ("dropout", "drop_path_rate"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise UserError(f"ConvNeXtConfig.{f} must be in [0, 1), got {getattr(self, f)}")

    @property
    def name(self) -> str:
        """``convnext-t``-style name for a named size, else ``convnext-w{W}-d{d1}.{d2}...``
        (widths doubling per stage) or ``convnext-c{w1}.{w2}...-d{d1}.{d2}...``."""
        for size, shape in SIZES.items():
            if shape == (self.depths, self.widths) and self.kernel_size == 7:
                return f"convnext-{size}"
        depths = ".".join(map(str, self.depths))
        if self.widths == tuple(self.widths[0] * 2**i for i in range(len(self.widths))):
            name = f"convnext-w{self.widths[0]}-d{depths}"
        else:
            name = f"convnext-c{'.'.join(map(str, self.widths))}-d{depths}"
        return name if self.kernel_size == 7 else f"{name}-k{self.kernel_size}"

    @property
    def total_stride(self) -> int:
        return STEM_STRIDE * 2 ** (len(self.depths) - 1)

    def check_resolution(self, resolution: int) -> None:
        if resolution < self.total_stride:
            raise UserError(f"resolution {resolution} px is below {self.name}'s total stride {self.total_stride}; "
                            f"use >= {self.total_stride} or fewer stages")

    def forward_flops(self, resolution: int) -> int:
        """Analytic forward FLOPs (2 x MACs) per image at ``resolution`` px; norms/GELU/pooling not counted."""
        self.check_resolution(resolution)
        side = resolution // STEM_STRIDE
        macs = side * side * IN_CHANNELS * STEM_STRIDE**2 * self.widths[0]
        for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
            if i:
                side //= 2
                macs += side * side * 4 * self.widths[i - 1] * width
            per_pixel = self.kernel_size**2 * width + 2 * MLP_RATIO * width * width
            macs += depth * side * side * per_pixel
        macs += self.widths[-1] * self.num_classes
        return FLOPS_PER_MAC * macs

    @property
    def head_params(self) -> int:
        return self.widths[-1] * self.num_classes + self.num_classes

    def build(self) -> ConvNeXt:
        return ConvNeXt(self)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv -> LN -> Linear 4x -> GELU -> Linear -> layer scale -> drop-path, plus the input."""

    def __init__(self, width: int, cfg: ConvNeXtConfig, drop_path_rate: float):
        super().__init__()
        k = cfg.kernel_size
        self.dwconv = nn.Conv2d(width, width, k, padding=k // 2, groups=width)
        self.norm = nn.LayerNorm(width, eps=cfg.layernorm_eps)
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * width, width)
        # layer scale (timm's "gamma"); named a gain so the by-name rules exempt it from weight decay
        self.layer_scale_gain = nn.Parameter(torch.full((width,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC for the norm and the channel MLP
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.layer_scale_gain
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """LayerNorm, then a 2x2 stride-2 conv (the stem: a 4x4 stride-4 conv, then LayerNorm)."""

    def __init__(self, cin: int, cout: int, stride: int, eps: float, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.norm = LayerNorm2d(cin if norm_first else cout, eps=eps)
        self.conv = nn.Conv2d(cin, cout, stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))


class Stage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[ConvNeXtBlock]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """A ConvNeXt built from its config; ``model.classifier`` is the head's ``nn.Linear``."""

    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        self.cfg = cfg
        eps, w0 = cfg.layernorm_eps, cfg.widths[0]
        self.stem = Downsample(IN_CHANNELS, w0, STEM_STRIDE, eps, norm_first=False)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(1, total - 1) for i in range(total)]
        stages, start = [], 0
        for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            down = nn.Identity() if i == 0 else Downsample(cfg.widths[i - 1], width, 2, eps, norm_first=True)
            stages.append(Stage(down, [ConvNeXtBlock(width, cfg, rates[start + j]) for j in range(depth)]))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm_head = nn.LayerNorm(cfg.widths[-1], eps=eps)
        self.head_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cfg.widths[-1], cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.device.type != "meta":
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.classifier.weight.device.type != "meta":
            nn.init.zeros_(self.classifier.weight)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normed features (batch, widths[-1])."""
        x = self.stages(self.stem(images))
        return self.norm_head(x.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_drop(self.forward_features(images)))


VARIANTS: dict[str, ConvNeXtConfig] = {
    f"convnext-{size}": ConvNeXtConfig(depths=d, widths=w) for size, (d, w) in SIZES.items()
}

_NAMED = re.compile(r"(t|s|b|l|xl|tiny|small|base|large|xlarge)")
_SCALED = re.compile(r"(?:w(\d+)|c(\d+(?:\.\d+)*))-d(\d+(?:\.\d+)*)(?:-k(\d+))?")
_USAGE = ("use convnext-t, -s, -b, -l, -xl (ConvNeXt-T, convnext_tiny) or convnext-w<width>-d<d1>.<d2>... "
          "(e.g. convnext-w32-d1.1.3.1; widths double per stage) or convnext-c<w1>.<w2>...-d<d1>.<d2>...")


def parse_name(name: str) -> ConvNeXtConfig | None:
    """Config for a ConvNeXt name (any case); None if ``name`` is not a ConvNeXt name at all."""
    s = name.strip().lower()
    if not s.startswith("convnext"):
        return None
    rest = s[len("convnext"):].lstrip("-_ ")
    m = _NAMED.fullmatch(rest)
    if m:
        return VARIANTS[f"convnext-{TIMM_SIZES.get(m.group(1), m.group(1))}"]
    m = _SCALED.fullmatch(rest)
    if not m:
        close = difflib.get_close_matches(s, list(VARIANTS), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown ConvNeXt name {name!r}; {hint}{_USAGE}")
    depths = tuple(int(d) for d in m.group(3).split("."))
    if m.group(1):
        widths = tuple(int(m.group(1)) * 2**i for i in range(len(depths)))
    else:
        widths = tuple(int(w) for w in m.group(2).split("."))
    kernel = int(m.group(4)) if m.group(4) else 7
    return ConvNeXtConfig(depths=depths, widths=widths, kernel_size=kernel)


CONFIG = ConvNeXtConfig
# Fine-tune defaults: the ViT's AdamW recipe (ConvNeXt is trained with AdamW, Liu et al. 2022),
# not yet tuned on digits. NHWC is allowed but off by default on both devices (not measured here).
ConvNeXtConfig.traits = FamilyTraits(
    block_types=(ConvNeXtBlock,),
    dropout_field="dropout",
    channels_last_allowed=True,
    finetune_defaults=dict(optimizer="adamw", lr=3e-3, weight_decay=1e-4),
)
