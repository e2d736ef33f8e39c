"""Vision Transformer family (Dosovitskiy et al. 2021; Zhai et al. 2022 for g/G and the MAP head).

Pre-norm blocks (LayerNorm eps 1e-6), one qkv linear, GELU MLP, attention through
``F.scaled_dot_product_attention``. Pooling: ``"token"`` (class token, the original ViT / timm
``vit_*_224``), ``"gap"`` (mean of the normed patch tokens) or ``"map"`` (big_vision's multihead
attention pooling: one learned probe attends over the tokens, then a residual MLP). The classifier
is ``model.classifier`` (``nn.Linear``), zero-initialised as in big_vision so the initial loss is ln C.

Checkpoints across image sizes: ``model.load_state_dict`` resamples a learned position embedding
of another grid (bicubic, class token kept) by a ``_load_from_state_dict`` hook;
``load_pretrained(model, state_dict)`` also drops a classifier of another shape (fine-tuning
on new classes). A model run at another resolution than ``image_size`` resamples (learned) or
recomputes (sin-cos) its position embedding on the fly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convscale.errors import UserError
from convscale.models.base import FLOPS_PER_MAC, FamilyTraits
from convscale.models.layers import DropPath
from convscale.models.vit_posemb import posemb_sincos_2d, resample_pos_embed

IN_CHANNELS = 3
POOLS = ("token", "gap", "map")
POSEMBS = ("learn", "sincos2d")

# (width, depth, mlp_dim, num_heads) by canonical size tag; big_vision decode_variant / Zhai Table 2.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "gg": (1664, 48, 8192, 16),  # ViT-G/14; "gg" because canonical names are lower case
    "so400m": (1152, 27, 4304, 16),
}
MAP_POOLED_SIZES = frozenset({"g", "gg", "so400m"})  # Zhai et al. / SigLIP: MAP head, no class token
PAPER_SIZES = {"ti": "ti", "s": "s", "b": "b", "l": "l", "h": "h", "so400m": "so400m", "400m": "so400m"}
TIMM_SIZES = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h", "giant": "g",
              "gigantic": "gg", "so400m": "so400m"}
TINY_SHAPE = dict(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=4)


def default_num_heads(width: int) -> int:
    """Heads for a scaled-down ``vit-w{W}-d{D}-p{P}``: the largest divisor of W not above max(2, W/64).

    Wide models get head_dim 64 when W is a multiple of 64 (192 -> 3, 384 -> 6, 768 -> 12); tiny
    ones still get 2 heads of head_dim >= W/2 (32 -> 2 x 16, 48 -> 2 x 24) instead of 1 or of
    slivers of a few channels; odd widths fall back to 1 head.
    """
    limit = max(2.0, width / 64)
    return max(h for h in range(1, int(limit) + 1) if width % h == 0)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A ViT fully determined (num_classes included). ``image_size`` (px) sizes the learned position grid."""

    family: ClassVar[str] = "vit"
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int = 224
    num_classes: int = 1000
    pool: str = "token"
    posemb: str = "learn"
    qkv_bias: bool = True
    dropout: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 at block 0 to this at the last
    layernorm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for f in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "num_classes"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise UserError(f"ViTConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.width % self.num_heads:
            raise UserError(f"ViT width {self.width} is not divisible by num_heads {self.num_heads}; pick a divisor")
        if self.pool not in POOLS:
            raise UserError(f"ViT pool {self.pool!r} is unknown; use one of {list(POOLS)}")
        if self.posemb not in POSEMBS:
            raise UserError(f"ViT posemb {self.posemb!r} is unknown; use one of {list(POSEMBS)}")
        if self.posemb == "sincos2d" and (self.width % 4 or self.width < 8):
            raise UserError(f"sincos2d posemb needs width a multiple of 4 and >= 8 (got {self.width}); use posemb='learn'")
        if self.image_size % self.patch_size:
            raise UserError(f"ViT image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                            f"use {max(1, self.image_size // self.patch_size) * self.patch_size}")
        for f in ("dropout", "drop_path_rate"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise UserError(f"ViTConfig.{f} must be in [0, 1), got {getattr(self, f)}")

    @property
    def name(self) -> str:
        """``vit-b16``-style name when the shape is a named size, else ``vit-w{W}-d{D}-p{P}[-m{M}][-h{H}]``."""
        shape = (self.width, self.depth, self.mlp_dim, self.num_heads)
        for size, s in SIZES.items():
            if s == shape:
                return f"vit-{size}{self.patch_size}"
        if dict(zip(("width", "depth", "mlp_dim", "num_heads"), shape), patch_size=self.patch_size) == TINY_SHAPE:
            return "vit-tiny"
        name = f"vit-w{self.width}-d{self.depth}-p{self.patch_size}"
        if self.mlp_dim != 4 * self.width:
            name += f"-m{self.mlp_dim}"
        if self.num_heads != default_num_heads(self.width):
            name += f"-h{self.num_heads}"
        return name

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "token" else 0

    def grid(self, resolution: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for square images of ``resolution`` px."""
        return resolution // self.patch_size, resolution // self.patch_size

    def check_resolution(self, resolution: int) -> None:
        p = self.patch_size
        if resolution < p:
            raise UserError(f"resolution {resolution} px is smaller than one {p}-px patch of {self.name}; use >= {p}")
        if resolution % p:
            lo, hi = resolution // p * p, (resolution // p + 1) * p
            raise UserError(f"resolution {resolution} px is not a multiple of {self.name}'s patch size {p}; "
                            f"use {lo} or {hi}")

    def forward_flops(self, resolution: int) -> int:
        """Analytic forward FLOPs (2 x MACs) per image at ``resolution`` px; norms/softmax/GELU not counted."""
        self.check_resolution(resolution)
        gh, gw = self.grid(resolution)
        n = gh * gw
        t = n + self.num_prefix_tokens
        w, m = self.width, self.mlp_dim
        macs = n * IN_CHANNELS * self.patch_size**2 * w  # patch embedding
        block = t * w * 3 * w + t * w * w + 2 * t * w * m  # qkv, proj, MLP
        block += 2 * t * t * w  # QK^T and AV (summed over heads: t*t*head_dim*heads each)
        macs += self.depth * block
        if self.pool == "map":  # one probe query: q, kv of all tokens, scores/AV, out proj, MLP
            macs += w * w + t * 2 * w * w + 2 * t * w + w * w + 2 * w * m
        macs += w * self.num_classes
        return FLOPS_PER_MAC * macs

    @property
    def head_params(self) -> int:
        """The classifier's weight and bias: (width + 1) x num_classes. A MAP pooling head is body."""
        return (self.width + 1) * self.num_classes

    def build(self) -> VisionTransformer:
        return VisionTransformer(self)


# ----------------------------------------------------------------------------------------- names

def _sized(size: str, patch: int, image_size: int | None = None) -> ViTConfig:
    w, d, m, h = SIZES[size]
    kw: dict[str, Any] = dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=patch)
    if size in MAP_POOLED_SIZES:
        kw["pool"] = "map"
    if image_size is not None:
        kw["image_size"] = image_size
    return ViTConfig(**kw)


VARIANTS: dict[str, ViTConfig] = {
    "vit-ti16": _sized("ti", 16),
    "vit-s16": _sized("s", 16),
    "vit-b16": _sized("b", 16),
    "vit-l16": _sized("l", 16),
    "vit-h14": _sized("h", 14),
    "vit-g14": _sized("g", 14),
    "vit-gg14": _sized("gg", 14),
    "vit-so400m14": _sized("so400m", 14),
    "vit-tiny": ViTConfig(**TINY_SHAPE, image_size=16),
}

_CANONICAL = re.compile(r"vit-(ti|s|b|l|h|g|gg|so400m)(\d+)", re.I)
_PAPER = re.compile(r"(?:vit-(ti|s|b|l|h|g|so400m)|sovit-(400m))/(\d+)", re.I)
_TIMM = re.compile(r"vit_(tiny|small|base|large|huge|giant|gigantic|so400m)_patch(\d+)(?:_siglip)?(?:_(\d+))?", re.I)
_SCALED = re.compile(r"vit-w(\d+)-d(\d+)-p(\d+)(?:-m(\d+))?(?:-h(\d+))?", re.I)
_LOOKS_LIKE_VIT = re.compile(r"(so)?vit($|[-_/])", re.I)
_FORMS = "vit-b16, ViT-B/16, ViT-g/14, ViT-G/14 (= vit-gg14), SoViT-400m/14, vit_base_patch16_224, vit-w64-d4-p4, vit-tiny"


def parse_name(name: str) -> ViTConfig | None:
    """ViTConfig for a ViT name; None for a non-ViT name; UserError for a malformed ViT name.

    Accepted: canonical ``vit-b16`` / ``vit-gg14`` (any patch: ``vit-b32``), the papers'
    ``ViT-B/16``, ``ViT-g/14``, ``ViT-G/14``, ``SoViT-400m/14`` (case-insensitive except g vs G),
    timm-style ``vit_base_patch16_224`` (the trailing number sets image_size), ``vit-tiny`` and
    scaled-down ``vit-w{W}-d{D}-p{P}[-m{M}][-h{H}]`` (mlp 4W and ``default_num_heads(W)`` unless given).
    Names give shapes only: pool/posemb are this module's defaults for the size (g, G, So400m: map).
    """
    s = name.strip()
    if not _LOOKS_LIKE_VIT.match(s):
        return None
    if s.lower() == "vit-tiny":
        return VARIANTS["vit-tiny"]
    if mt := _CANONICAL.fullmatch(s):
        size = mt.group(1)
        if size == "G":
            raise UserError(f"ViT name {name!r} is ambiguous; write vit-g14 for ViT-g/14 or vit-gg14 for ViT-G/14")
        return _sized(size.lower(), _positive(mt.group(2), name))
    if mt := _PAPER.fullmatch(s):
        size = mt.group(1) or mt.group(2)
        tag = {"g": "g", "G": "gg"}.get(size) or PAPER_SIZES[size.lower()]
        return _sized(tag, _positive(mt.group(3), name))
    if mt := _TIMM.fullmatch(s):
        image_size = _positive(mt.group(3), name) if mt.group(3) else None
        return _sized(TIMM_SIZES[mt.group(1).lower()], _positive(mt.group(2), name), image_size)
    if mt := _SCALED.fullmatch(s):
        w, d, p = (_positive(g, name) for g in mt.group(1, 2, 3))
        m = _positive(mt.group(4), name) if mt.group(4) else 4 * w
        h = _positive(mt.group(5), name) if mt.group(5) else default_num_heads(w)
        return ViTConfig(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=p)
    raise UserError(f"malformed ViT name {name!r}; use a form like {_FORMS}")


def _positive(digits: str, name: str) -> int:
    v = int(digits)
    if v < 1:
        raise UserError(f"ViT name {name!r} has a zero size; every number in it must be >= 1")
    return v


# ----------------------------------------------------------------------------------------- model

class Attention(nn.Module):
    """Multi-head self-attention: one qkv linear, SDPA, output projection."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, c))


def _dropout(rate: float) -> nn.Module:
    """Dropout, or nothing at rate 0: at the small widths of a CPU study the no-op module calls of
    every block cost measurable step time (there are no parameters, so state dicts are unchanged)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU()
        self.drop = _dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(LN(x)), then x + MLP(LN(x)), each branch with dropout and drop-path."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.dropout)
        self.drop = _dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.drop(self.attn(self.norm1(x))))
        return x + self.drop_path(self.drop(self.mlp(self.norm2(x))))


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision): a learned probe attends over all tokens, then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        w = cfg.width
        self.num_heads = cfg.num_heads
        self.probe = nn.Parameter(torch.empty(1, 1, w))
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)
        self.proj = nn.Linear(w, w)
        self.norm = nn.LayerNorm(w, eps=cfg.layernorm_eps)
        self.mlp = Mlp(w, cfg.mlp_dim, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h, hd = self.num_heads, c // self.num_heads
        # The probe is projected per image (not once per batch) so counted FLOPs scale with batch.
        q = self.q(self.probe.expand(b, -1, -1)).reshape(b, 1, h, hd).transpose(1, 2)
        k, v = self.kv(x).reshape(b, t, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        y = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, c))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    """ViT built from a ``ViTConfig``; ``forward`` gives logits, ``forward_features`` the pooled features."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.grid = cfg.grid(cfg.image_size)
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = nn.Conv2d(IN_CHANNELS, w, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if cfg.pool == "token" else None
        if cfg.posemb == "learn":  # covers the class token too (timm layout), so timm's parameter counts match
            self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + self.grid[0] * self.grid[1], w))
        else:  # recomputed, so kept out of the state dict
            self.register_buffer("pos_embed_fixed", posemb_sincos_2d(self.grid, w), persistent=False)
        self.pos_drop = _dropout(cfg.dropout)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(w, eps=cfg.layernorm_eps)
        self.head = MAPHead(cfg) if cfg.pool == "map" else None
        self.classifier = nn.Linear(w, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """big_vision-style init: xavier linears with zero bias, lecun patch embedding, zero classifier."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        fan_in = IN_CHANNELS * self.cfg.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.weight, std=1 / math.sqrt(fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        if self.cfg.posemb == "learn":
            nn.init.normal_(self.pos_embed, std=1 / math.sqrt(self.cfg.width))
        if self.head is not None:
            bound = math.sqrt(6 / (1 + self.cfg.width))
            nn.init.uniform_(self.head.probe, -bound, bound)
        # Zero head: initial logits are 0, loss ln(num_classes); the body learns through the first update.
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def _add_pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1).to(x.dtype)] if self.cls_token is not None else []
        if self.cfg.posemb == "learn":
            pe = self.pos_embed
            if grid != self.grid:
                pe = resample_pos_embed(pe, grid, self.num_prefix_tokens, old_grid=self.grid)
            return torch.cat(prefix + [x], dim=1) + pe
        pe = self.pos_embed_fixed if grid == self.grid else posemb_sincos_2d(grid, self.cfg.width, device=x.device)
        return torch.cat(prefix + [x + pe.to(x.dtype)], dim=1)

    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled, normed features ``(batch, width)`` for images ``(batch, 3, H, W)``, H and W multiples of the patch."""
        for side in images.shape[-2:]:
            self.cfg.check_resolution(int(side))
        x = self.patch_embed(images)
        grid = (x.shape[-2], x.shape[-1])
        x = self._add_pos_embed(x.flatten(2).transpose(1, 2), grid)
        x = self.norm(self.blocks(self.pos_drop(x)))
        if self.cfg.pool == "token":
            return x[:, 0]
        if self.cfg.pool == "gap":
            return x.mean(dim=1)
        return self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.forward_features(images))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints of another image_size: resample their learned grid to ours before loading.
        key = prefix + "pos_embed"
        if self.cfg.posemb == "learn" and key in state_dict:
            old = state_dict[key]
            if old.shape != self.pos_embed.shape and old.ndim == 3 and old.shape[-1] == self.pos_embed.shape[-1]:
                try:
                    state_dict[key] = resample_pos_embed(old, self.grid, self.num_prefix_tokens)
                except ValueError:  # not a square grid after our prefix (other pooling): let the size check report it
                    pass
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def load_pretrained(model: VisionTransformer, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> list[str]:
    """Load a checkpoint for fine-tuning: resample its position grid and drop a classifier of another shape.

    Returns the names of the dropped classifier tensors (left at their zero init). With ``strict``
    any other missing or unexpected key raises, as ``load_state_dict`` would.
    """
    sd = dict(state_dict)
    dropped = []
    for name, own in (("classifier.weight", model.classifier.weight), ("classifier.bias", model.classifier.bias)):
        if name in sd and sd[name].shape != own.shape:
            del sd[name]
            dropped.append(name)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"checkpoint does not fit {model.cfg.name}: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    return dropped


ViTConfig.traits = FamilyTraits(
    block_types=(Block,),
    dropout_field="dropout",
    finetune_defaults=dict(optimizer="adamw", lr=3e-3, weight_decay=1e-4),
)

CONFIG = ViTConfig
