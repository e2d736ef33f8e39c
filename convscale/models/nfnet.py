"""NFNets (Brock et al. 2021), faithful to DeepMind's reference (deepmind-research/nfnets).

A config names a model: ``nfnet-f0`` ... ``nfnet-f7``, ``nfnet-f0+`` ... ``nfnet-f7+`` (wider
"+" base widths), ``nfnet-tiny`` (tests), and scaled-down ``nfnet-w{mult}[+]-d{d1}.{d2}...``.

Scaling width by ``width_mult`` (any value, also > 1):
    stage widths  = round(base * width_mult)                 (base [256,512,1536,1536] or "+")
    stem widths   = round((16, 32, 64, base[0] // 2) * width_mult)
    group width   = round(group_width * width_mult)          (128 at width_mult 1)
    groups        = int(0.5 * base) // group_width            (as in the full model, per stage)
    bottleneck    = groups * scaled group width
so every scaled model keeps the full model's group count per stage and its stem/body ratios;
at width_mult 1 this is exactly the reference. Rounding is half-up, each width at least 1.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from convscale.errors import UserError
from convscale.models.base import FLOPS_PER_MAC, FamilyTraits
from convscale.models.layers import ACTIVATION_GAMMAS, Activation, ScaledStdConv2d, SqueezeExcite, avg_pool_same_2x

BASE_WIDTHS = (256, 512, 1536, 1536)
PLUS_BASE_WIDTHS = (384, 768, 2048, 2048)
STEM_BASE_WIDTHS = (16, 32, 64)  # the 4th stem conv has base[0] // 2 channels
STAGE_STRIDES = (1, 2, 2, 2)
BOTTLENECK_RATIO = 0.5  # of the block's output width ("big_width" in the reference)

# The reference's variant table (deepmind-research nfnets/base.py): depth multiplier N, so that
# depths = N * (1, 2, 6, 3); dropout before the classifier; ImageNet train/test resolutions.
F_VARIANTS: dict[str, dict] = {
    "f0": dict(n=1, drop_rate=0.2, train_px=192, test_px=256),
    "f1": dict(n=2, drop_rate=0.3, train_px=224, test_px=320),
    "f2": dict(n=3, drop_rate=0.4, train_px=256, test_px=352),
    "f3": dict(n=4, drop_rate=0.4, train_px=320, test_px=416),
    "f4": dict(n=5, drop_rate=0.5, train_px=384, test_px=512),
    "f5": dict(n=6, drop_rate=0.5, train_px=416, test_px=544),
    "f6": dict(n=7, drop_rate=0.5, train_px=448, test_px=576),
    "f7": dict(n=8, drop_rate=0.5, train_px=480, test_px=608),
}
F0_DEPTHS = (1, 2, 6, 3)
IMAGENET_DROP_PATH_RATE = 0.25  # stochastic depth of the ImageNet recipe, every F variant


class BlockSpec(NamedTuple):
    """One residual block, as both ``build`` and ``forward_flops`` see it."""

    in_ch: int
    out_ch: int
    mid_ch: int
    groups: int
    stride: int
    beta: float
    drop_path_rate: float


def _round(x: float) -> int:
    return max(1, int(math.floor(x + 0.5)))


def _fmt_mult(m: float) -> str:
    short = format(m, "g")
    return short if float(short) == m else repr(float(m))


@dataclass(frozen=True)
class NFNetConfig:
    """A normalizer-free network; the default fields are NFNet-F0's shape (without dropout)."""

    family: ClassVar[str] = "nfnet"

    depths: tuple[int, ...] = F0_DEPTHS  # blocks per stage; 1 to 4 stages
    width_mult: float = 1.0
    plus: bool = False  # base widths [384,768,2048,2048] instead of [256,512,1536,1536]
    group_width: int = 128  # at width_mult 1
    se_ratio: float = 0.5
    alpha: float = 0.2
    activation: str = "gelu"
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear in block index)
    stem_strides: tuple[int, ...] = (2, 1, 1, 2)
    final_conv_mult: int = 2
    num_classes: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "stem_strides", tuple(int(s) for s in self.stem_strides))
        if not 1 <= len(self.depths) <= 4 or min(self.depths) < 1:
            raise UserError(f"NFNet depths {list(self.depths)} invalid; give 1 to 4 stages of >= 1 block")
        if not self.width_mult > 0:
            raise UserError(f"NFNet width_mult {self.width_mult} invalid; use a positive number")
        if self.activation not in ACTIVATION_GAMMAS:
            raise UserError(f"unknown activation {self.activation!r}; use one of {sorted(ACTIVATION_GAMMAS)}")
        if len(self.stem_strides) != 4 or min(self.stem_strides) < 1:
            raise UserError(f"stem_strides {list(self.stem_strides)} invalid; give 4 positive strides")
        for rate, what in ((self.drop_rate, "drop_rate"), (self.drop_path_rate, "drop_path_rate")):
            if not 0.0 <= rate < 1.0:
                raise UserError(f"{what} {rate} invalid; use a value in [0, 1)")
        if self.group_width < 1 or int(BOTTLENECK_RATIO * min(self.base_widths)) < self.group_width:
            raise UserError(f"group_width {self.group_width} invalid; use 1..{int(BOTTLENECK_RATIO * min(self.base_widths))}")
        if self.se_ratio <= 0 or self.alpha <= 0 or self.final_conv_mult < 1 or self.num_classes < 1:
            raise UserError("se_ratio and alpha must be > 0, final_conv_mult and num_classes >= 1; fix the config")

    # --- shape ------------------------------------------------------------------------------
    @property
    def base_widths(self) -> tuple[int, ...]:
        return (PLUS_BASE_WIDTHS if self.plus else BASE_WIDTHS)[: len(self.depths)]

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each stage."""
        return tuple(_round(b * self.width_mult) for b in self.base_widths)

    @property
    def stem_widths(self) -> tuple[int, ...]:
        base = (*STEM_BASE_WIDTHS, (PLUS_BASE_WIDTHS if self.plus else BASE_WIDTHS)[0] // 2)
        return tuple(_round(c * self.width_mult) for c in base)

    @property
    def final_width(self) -> int:
        return self.final_conv_mult * self.widths[-1]

    @property
    def total_stride(self) -> int:
        return math.prod(self.stem_strides) * math.prod(STAGE_STRIDES[: len(self.depths)])

    def blocks(self) -> list[BlockSpec]:
        """Every residual block in order, with its beta and stochastic-depth rate."""
        specs, expected_std, index, num_blocks = [], 1.0, 0, sum(self.depths)
        in_ch = self.stem_widths[-1]
        gw = _round(self.group_width * self.width_mult)
        for depth, base, out_ch, stride in zip(self.depths, self.base_widths, self.widths, STAGE_STRIDES):
            groups = int(BOTTLENECK_RATIO * base) // self.group_width
            for i in range(depth):
                specs.append(BlockSpec(in_ch, out_ch, groups * gw, groups, stride if i == 0 else 1,
                                       1.0 / expected_std, self.drop_path_rate * index / num_blocks))
                in_ch, index = out_ch, index + 1
                if i == 0:  # the transition block's output variance restarts at 1 (+ alpha^2)
                    expected_std = 1.0
                expected_std = (expected_std**2 + self.alpha**2) ** 0.5
        return specs

    def shape_key(self) -> tuple:
        """What the name encodes: two configs with equal keys share a name."""
        return (self.depths, float(self.width_mult), bool(self.plus))

    @property
    def name(self) -> str:
        """``nfnet-f3+`` for a named shape, else ``nfnet-w{mult}[+]-d{d1}.{d2}...``; the other
        fields (regularisation, group width, activation, classes, ...) are not part of it.
        ``nfnet-tiny`` is an alias of its scaled name, so a ladder of sizes reads as one family."""
        for vname, cfg in VARIANTS.items():
            if vname != TEST_VARIANT and cfg.shape_key() == self.shape_key():
                return vname
        return f"nfnet-w{_fmt_mult(self.width_mult)}{'+' if self.plus else ''}-d{'.'.join(map(str, self.depths))}"

    # --- protocol ---------------------------------------------------------------------------
    def build(self) -> NFNet:
        return NFNet(self)

    def check_resolution(self, resolution: int) -> None:
        if resolution < self.total_stride:
            raise UserError(f"resolution {resolution} is too small for {self.name} (total stride "
                            f"{self.total_stride}); use a resolution of at least {self.total_stride}")

    @property
    def head_params(self) -> int:
        """The classifier's weight and bias: (final_width + 1) x num_classes."""
        return (self.final_width + 1) * self.num_classes

    def forward_flops(self, resolution: int) -> int:
        """2 x MACs of every conv and linear (SE and classifier included) for one image; spatial
        sizes follow TF "SAME" (ceil(size / stride)), so odd sizes count exactly."""
        if resolution < 1:
            raise UserError(f"resolution {resolution} invalid; use a positive number of pixels")
        macs, size, ch = 0, resolution, 3
        for out_ch, stride in zip(self.stem_widths, self.stem_strides):
            size = -(-size // stride)
            macs += size * size * ch * out_ch * 9
            ch = out_ch
        for b in self.blocks():
            macs += size * size * b.in_ch * b.mid_ch  # conv0 (1x1), before any downsampling
            size = -(-size // b.stride)
            macs += 2 * size * size * b.mid_ch * (b.mid_ch // b.groups) * 9  # conv1, conv1b
            macs += size * size * b.mid_ch * b.out_ch  # conv2
            if b.stride > 1 or b.in_ch != b.out_ch:
                macs += size * size * b.in_ch * b.out_ch  # projection shortcut
            macs += 2 * b.out_ch * max(1, int(b.out_ch * self.se_ratio))  # SE fc0, fc1
        macs += size * size * self.widths[-1] * self.final_width + self.final_width * self.num_classes
        return FLOPS_PER_MAC * macs


class NFBlock(nn.Module):
    """Pre-activation bottleneck: ``h + alpha * skip_gain * f(act(h) * beta)``, where f is
    1x1 -> 3x3 grouped (strided) -> 3x3 grouped -> 1x1 -> squeeze-excite, each conv after
    ``act = gamma * f``. A transition block's shortcut is avg-pool + 1x1 conv on ``act(h) * beta``.
    The activations compute ``f`` only: gamma (and beta) is each following conv's
    ``input_scale``, folded into its standardized weight (avg-pool is linear, so the shortcut
    conv takes gamma * beta too)."""

    def __init__(self, spec: BlockSpec, activation: str, alpha: float, se_ratio: float):
        super().__init__()
        self.stride, self.alpha, self.beta = spec.stride, float(alpha), spec.beta
        # The reference applies stochastic depth only for rates strictly inside (0, 1).
        self.drop_path_rate = spec.drop_path_rate if 0.0 < spec.drop_path_rate < 1.0 else 0.0
        gamma = ACTIVATION_GAMMAS[activation]
        self.act_in = Activation(activation)
        self.conv0 = ScaledStdConv2d(spec.in_ch, spec.mid_ch, 1, input_scale=gamma * spec.beta)
        self.act0 = Activation(activation)
        self.conv1 = ScaledStdConv2d(spec.mid_ch, spec.mid_ch, 3, stride=spec.stride, groups=spec.groups,
                                     input_scale=gamma)
        self.act1 = Activation(activation)
        self.conv1b = ScaledStdConv2d(spec.mid_ch, spec.mid_ch, 3, groups=spec.groups, input_scale=gamma)
        self.act1b = Activation(activation)
        self.conv2 = ScaledStdConv2d(spec.mid_ch, spec.out_ch, 1, input_scale=gamma)
        self.se = SqueezeExcite(spec.out_ch, max(1, int(spec.out_ch * se_ratio)))
        project = spec.stride > 1 or spec.in_ch != spec.out_ch
        self.conv_shortcut = (ScaledStdConv2d(spec.in_ch, spec.out_ch, 1, input_scale=gamma * spec.beta)
                              if project else None)
        self.skip_gain = nn.Parameter(torch.zeros(()))  # SkipInit: the block is the identity at init

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual branch before skip gain and alpha, shortcut)."""
        out, shortcut = self._branches_before_se(x)
        return self.se(out), shortcut

    def _branches_before_se(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.act_in(x)
        if self.stride > 1:
            shortcut = self.conv_shortcut(avg_pool_same_2x(out))
        elif self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(self.act0(out))
        out = self.conv1b(self.act1(out))
        return self.conv2(self.act1b(out)), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, shortcut = self._branches_before_se(x)
        # SE gate, skip gain, alpha and the stochastic-depth mask all scale (sample, channel):
        # multiply them on the small (batch, channels) gate, then one pass over the big tensor
        # (equal to shortcut + alpha * skip_gain * se(out) up to float rounding).
        scale = self.se.gate(out) * (self.skip_gain * self.alpha)
        if self.training and self.drop_path_rate > 0.0:
            # Per-sample drop of the whole branch, no 1/keep rescale (the reference's StochDepth).
            keep = torch.empty((x.shape[0], 1), dtype=scale.dtype, device=x.device)
            scale = scale * keep.bernoulli_(1.0 - self.drop_path_rate)
        return torch.addcmul(shortcut, out, scale.to(out.dtype)[:, :, None, None])

    def extra_repr(self) -> str:
        return f"stride={self.stride}, beta={self.beta:.6g}, alpha={self.alpha}, drop_path={self.drop_path_rate:.4g}"


class NFNet(nn.Module):
    """Stem (4 convs, stride 4) -> stages of NFBlocks -> 1x1 conv to 2x width -> act -> mean
    pool -> dropout -> ``classifier`` (nn.Linear). As in the blocks, each activation's gamma is
    applied by its consumer: the next stem conv, or the pooled features (batch, width)."""

    def __init__(self, cfg: NFNetConfig):
        super().__init__()
        self.config = cfg
        stem, ch, gamma = nn.Sequential(), 3, ACTIVATION_GAMMAS[cfg.activation]
        for i, (out_ch, stride) in enumerate(zip(cfg.stem_widths, cfg.stem_strides)):
            stem.add_module(f"conv{i}", ScaledStdConv2d(ch, out_ch, 3, stride=stride, input_scale=gamma if i else 1.0))
            if i < 3:  # no activation after the last stem conv: the first block applies one
                stem.add_module(f"act{i}", Activation(cfg.activation))
            ch = out_ch
        self.stem = stem
        specs, stages, start = cfg.blocks(), [], 0
        for depth in cfg.depths:
            stages.append(nn.Sequential(*(NFBlock(s, cfg.activation, cfg.alpha, cfg.se_ratio)
                                          for s in specs[start : start + depth])))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.final_conv = ScaledStdConv2d(cfg.widths[-1], cfg.final_width, 1)
        self.final_act = Activation(cfg.activation)
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.classifier = nn.Linear(cfg.final_width, cfg.num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (batch, final_width), before dropout and classifier."""
        x = self.stages(self.stem(x))
        return self.final_act(self.final_conv(x)).mean((2, 3)) * self.final_act.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))

    @torch.no_grad()
    def signal_stats(self, x: torch.Tensor) -> list[dict[str, float]]:
        """Signal propagation of the residual stream (the reference's ``signal_metrics``):
        one dict per point (stem output, then after each block) with ``avg_sq_mean`` and
        ``avg_var`` (channel mean^2 and variance over batch and space, averaged over channels);
        block entries add ``res_avg_var`` (variance of the residual branch before skip gain)
        and ``expected_var`` (1 / beta^2 of the *next* block, the variance it assumes)."""

        def stats(t: torch.Tensor) -> dict[str, float]:
            var, mean = torch.var_mean(t.float(), dim=(0, 2, 3), correction=0)
            return {"avg_sq_mean": float((mean**2).mean()), "avg_var": float(var.mean())}

        blocks = [b for stage in self.stages for b in stage]
        out = self.stem(x)
        rows = [{**stats(out), "expected_var": 1.0 / blocks[0].beta**2}]
        for i, block in enumerate(blocks):
            residual, _ = block.branches(out)
            out = block(out)
            nxt = blocks[i + 1].beta ** -2 if i + 1 < len(blocks) else float("nan")
            var = torch.var(residual.float(), dim=(0, 2, 3), correction=0).mean()
            rows.append({**stats(out), "res_avg_var": float(var), "expected_var": nxt})
        return rows


def _f_variant(key: str, plus: bool) -> NFNetConfig:
    v = F_VARIANTS[key]
    return NFNetConfig(depths=tuple(v["n"] * d for d in F0_DEPTHS), plus=plus, drop_rate=v["drop_rate"],
                       drop_path_rate=IMAGENET_DROP_PATH_RATE)


TEST_VARIANT = "nfnet-tiny"
VARIANTS: dict[str, NFNetConfig] = {
    **{f"nfnet-{k}": _f_variant(k, False) for k in F_VARIANTS},
    **{f"nfnet-{k}+": _f_variant(k, True) for k in F_VARIANTS},
    # ~15k parameters (10 classes): for tests that run real forward/backward passes in seconds.
    "nfnet-tiny": NFNetConfig(depths=(1, 1, 1), width_mult=1 / 32),
}

_NAMED = re.compile(r"f(\d+)(\+|plus)?")
_SCALED = re.compile(r"w(\d+\.?\d*|\.\d+)(\+)?[-_ ]?d(\d+(?:\.\d+)*)")
_USAGE = "or use nfnet-f0..nfnet-f7, nfnet-f0+..nfnet-f7+, nfnet-tiny or nfnet-w<mult>[+]-d<d1>.<d2>... (e.g. nfnet-w0.0625-d1.1.1)"


def parse_name(name: str) -> NFNetConfig | None:
    """Config for an NFNet name (any case; ``NFNet-F7+``, ``NFNet F0``, ``nfnet_f1`` and scaled
    ``nfnet-w0.25-d1.1.1`` all work); None if ``name`` is not an NFNet name at all.

    Named F variants carry the ImageNet recipe's dropout and stochastic depth; scaled-down
    names and ``nfnet-tiny`` carry none (override the fields to add them)."""
    s = name.strip().lower()
    if not s.startswith("nfnet"):
        return None
    cfg = _parse(s)
    if cfg is None:
        close = difflib.get_close_matches(s, list(VARIANTS), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown NFNet name {name!r}; {hint}{_USAGE}")
    return cfg


def _parse(s: str) -> NFNetConfig | None:
    """Config for a lower-case ``nfnet...`` name, None if it fits no NFNet name pattern."""
    rest = s[len("nfnet"):].lstrip("-_ ")
    if rest == "tiny":
        return VARIANTS["nfnet-tiny"]
    m = _NAMED.fullmatch(rest)
    if m:
        return VARIANTS.get(f"nfnet-f{int(m.group(1))}{'+' if m.group(2) else ''}")
    m = _SCALED.fullmatch(rest)
    if not m:
        return None
    mult = float(m.group(1))
    depths = tuple(int(d) for d in m.group(3).split("."))
    if mult <= 0 or not 1 <= len(depths) <= 4 or min(depths) < 1:
        raise UserError(f"bad NFNet name {s!r}: need width > 0 and 1-4 stages of >= 1 block each; {_USAGE[3:]}")
    return NFNetConfig(depths=depths, width_mult=mult, plus=bool(m.group(2)))


# Fine-tune defaults (train/finetune.py explains them): NFNet features are not normalised, so the
# zero-initialised new head runs at 0.05x the body's lr with a long warm-up.
NFNetConfig.traits = FamilyTraits(
    block_types=(NFBlock,),
    dropout_field="drop_rate",
    channels_last_allowed=True,
    channels_last_cpu=True,  # NHWC convolutions are faster on CPU; on CUDA the default stays NCHW
    channels_last_cuda=False,
    finetune_defaults=dict(optimizer="sgd_agc", lr=0.05, weight_decay=1e-5, classifier_lr_scale=0.05,
                           warmup_fraction=0.3),
)

CONFIG = NFNetConfig
