"""timm checkpoints in and out: timm's ``dm_nfnet_f*`` and ``vit_*`` state dicts <-> convscale
NFNets and ViTs, by key mapping alone (convscale never imports timm).

Only architectures that compute the same function are mapped; any other is a UserError that
names the difference. What was checked (timm 1.0.31, timm/models/nfnet.py, layers/std_conv.py,
models/vision_transformer.py):

* ``dm_nfnet_f*`` is DeepMind's NFNet-F with two numerical differences, both handled:
  - its GELU is exact (erf), DeepMind's and convscale's default the tanh form: a timm NFNet maps
    onto a convscale NFNet with ``activation="gelu_erf"`` (same gamma, 1.7015, as timm uses);
  - weight standardisation divides by ``sqrt(fan_in * (var + 1e-5))``, convscale (as DeepMind)
    by ``sqrt(max(fan_in * var, 1e-4))``. Both are ``(W - mean) * gain / d(W)``, so the
    difference is a per-channel factor folded into ``gain``: the same function, W untouched.
  Padding (TF "SAME"), the avg-pool shortcut, gamma placement, SE (gain 2), SkipInit gain, alpha,
  beta and the final conv are the same.
* ``nfnet_f*`` / ``nfnet_l*`` / ``eca_nfnet_*`` (timm's own NFNets, no SkipInit gain) pad strided
  convs symmetrically, not TF "SAME": refused. NF-ResNets / NF-RegNets: refused.
* ``vit_*`` with a class token, a learned position embedding that covers it, pre-norm blocks,
  a final norm and class-token pooling is convscale's ``pool="token"`` ViT (LayerNorm eps 1e-6,
  exact GELU). Registers, distillation tokens, ``fc_norm`` / attention pooling, CLIP's
  ``norm_pre``, LayerScale and QK-norm are refused. ``num_heads`` is not in a state dict: it is
  the size table's for a named width (192: 3, 384: 6, 768: 12, 1024+: 16), else convscale's
  ``default_num_heads``; a model given by the caller keeps its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from convscale.errors import UserError
from convscale.models import nfnet, vit
from convscale.models.base import ModelConfig
from convscale.models.layers import ScaledStdConv2d

TIMM_STD_CONV_EPS = 1e-5  # timm NfCfg.std_conv_eps: added to each weight row's variance
STD_CONV_EPS = inspect.signature(ScaledStdConv2d).parameters["eps"].default  # on fan_in * var
TIMM_CH_DIV = 8  # timm rounds NFNet widths to multiples of 8 (NfCfg.ch_div, SE rd_divisor)
TIMM_NFNET_ACTIVATION = "gelu_erf"
TIMM_VIT_LAYERNORM_EPS = 1e-6
# timm entry points whose defaults are a convscale ViT size: (width, depth, mlp_dim, heads) -> (name, patch, px)
TIMM_VIT_ENTRIES = {vit.SIZES[s]: (f"vit_{t}", 14 if s == "h" else 16, 224)
                    for t, s in vit.TIMM_SIZES.items() if s in ("ti", "s", "b", "l", "h")}
DM_NFNET_VARIANTS = ("f0", "f1", "f2", "f3", "f4", "f5", "f6")  # timm's dm_nfnet_* entry points
_F0 = dict(depths=(1, 2, 6, 3), channels=(256, 512, 1536, 1536), stem_chs=128, group_size=128,
           num_features=3072, alpha=0.2)


# ------------------------------------------------------------------------------------- files

def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, never unpickling code: safetensors, or a torch file read with
    ``weights_only=True``. A training checkpoint's ``state_dict`` (``state_dict_ema`` with ``ema``)
    or ``model`` entry is taken, and a ``module.`` prefix dropped."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            obj: Any = load_file(p)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{p} holds pickled objects other than tensors ({first[:120]}); convscale loads "
                        "checkpoints without unpickling code: save its state dict as .safetensors") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{p} is not a readable safetensors or torch checkpoint ({type(e).__name__}); "
                        "pass a .safetensors, .pth or .bin state dict") from None
    if isinstance(obj, dict):
        keys = ("state_dict_ema", "model_ema") if ema else ("state_dict", "model")
        for key in keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            if ema:
                raise UserError(f"{p} holds no EMA weights (no state_dict_ema); drop --use-ema / init_from_ema")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{p} is not a state dict of tensors; pass a model's state dict file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def timm_family(sd: Mapping[str, Tensor]) -> str:
    """``"nfnet"`` or ``"vit"`` for a timm state dict that maps onto convscale; UserError otherwise."""
    if "patch_embed.proj.weight" in sd:
        _check_vit(sd)
        return "vit"
    if "stem.conv1.weight" in sd or "stem.conv.weight" in sd:
        _check_nfnet(sd)
        return "nfnet"
    raise UserError("the file is not a timm NFNet or ViT state dict (no stem.conv1 or patch_embed.proj); "
                    "pass a dm_nfnet_f* or vit_* checkpoint, or a convscale run directory")


def _check_nfnet(sd: Mapping[str, Tensor]) -> None:
    if "stem.conv4.weight" not in sd or "stages.0.0.conv2b.weight" not in sd:
        raise UserError("this timm NF model is an NF-ResNet or NF-RegNet (no 4-conv stem or extra 3x3 conv), "
                        "not an NFNet-F; only dm_nfnet_f* checkpoints map onto convscale NFNets")
    if "stages.0.0.skipinit_gain" not in sd:
        raise UserError("this timm NFNet has no skipinit_gain: it is timm's own nfnet_f*/nfnet_l* design, "
                        "which pads strided convs symmetrically instead of TF 'SAME' (another function than "
                        "DeepMind's NFNet); only dm_nfnet_f* checkpoints map onto convscale NFNets")
    if "stages.0.0.attn_last.fc1.weight" not in sd:
        raise UserError("this timm NFNet has no squeeze-excite (attn_last.fc1; ECA or none instead): another "
                        "function than DeepMind's NFNet; only dm_nfnet_f* checkpoints map onto convscale NFNets")


_VIT_REFUSED = {  # a key that marks a timm ViT variant convscale does not compute -> the difference
    "reg_token": "register tokens",
    "dist_token": "a distillation token",
    "fc_norm.weight": "average pooling with fc_norm (convscale's gap pooling norms before pooling)",
    "attn_pool.latent": "timm's attention-pooling head",
    "norm_pre.weight": "a pre-norm before the blocks (CLIP style)",
    "blocks.0.ls1.gamma": "LayerScale",
    "blocks.0.attn.q_norm.weight": "QK normalisation",
}


def _check_vit(sd: Mapping[str, Tensor]) -> None:
    for key, what in _VIT_REFUSED.items():
        if key in sd:
            raise UserError(f"this timm ViT has {what} ({key}): another function than convscale's ViT; "
                            "only class-token vit_* checkpoints (e.g. vit_base_patch16_224) map")
    if "cls_token" not in sd:
        raise UserError("this timm ViT has no class token (cls_token): its pooling differs from convscale's "
                        "token pooling; only class-token vit_* checkpoints (e.g. vit_base_patch16_224) map")
    patches = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else -1
    if patches < 1 or math.isqrt(patches) ** 2 != patches:
        raise UserError("this timm ViT's pos_embed does not cover the class token plus a square patch grid "
                        "(no_embed_class or a fixed embedding); only class-token vit_* checkpoints map")


# ------------------------------------------------------------------------------ key mapping

_NFNET_BLOCK_KEYS = {  # convscale block module -> timm's
    "conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3", "conv_shortcut": "downsample.conv",
    "se.fc0": "attn_last.fc1", "se.fc1": "attn_last.fc2", "skip_gain": "skipinit_gain",
}


def timm_key(family: str, key: str) -> str:
    """The timm name of a convscale parameter."""
    if key.startswith("classifier."):
        return ("head.fc." if family == "nfnet" else "head.") + key.removeprefix("classifier.")
    if family == "vit":
        return "patch_embed.proj." + key.removeprefix("patch_embed.") if key.startswith("patch_embed.") else key
    if m := re.fullmatch(r"stem\.conv(\d)\.(\w+)", key):
        return f"stem.conv{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"(stages\.\d+\.\d+)\.(.+?)(\.weight|\.bias|\.gain|)", key):
        return f"{m[1]}.{_NFNET_BLOCK_KEYS.get(m[2], m[2])}{m[3]}"
    return key


def _our_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in cfg.build().state_dict().items()}


def _gain_factor(weight: Tensor) -> Tensor:
    """Per output channel: convscale's gain / timm's gain for the same standardised weight, i.e.
    sqrt(max(k var, eps)) / sqrt(k (var + timm eps)), k the fan-in (in float64)."""
    rows = weight.double().reshape(weight.shape[0], -1)
    k = rows.shape[1]
    var = rows.var(dim=1, correction=0)
    return (torch.clamp(k * var, min=STD_CONV_EPS) / (k * (var + TIMM_STD_CONV_EPS))).sqrt()


def _convert(cfg: ModelConfig, sd: Mapping[str, Tensor], to_timm: bool) -> dict[str, Tensor]:
    """Rename and reshape every tensor of ``cfg``'s model between the two layouts; NFNet gains get
    the standardisation-eps factor. Keys and shapes are checked against ``cfg``, except a ViT's
    position grid (resampled when loaded) and the classifier (may be absent, or of other classes)."""
    ours = _our_shapes(cfg)
    names = {k: timm_key(cfg.family, k) for k in ours}  # convscale -> timm
    src_of = {k: (k if to_timm else t) for k, t in names.items()}
    optional = {src_of["classifier.weight"], src_of["classifier.bias"]}
    missing = [src for src in src_of.values() if src not in sd and src not in optional]
    unexpected = sorted(set(sd) - set(src_of.values()))
    side = "convscale" if to_timm else "timm"
    if missing or unexpected:
        raise UserError(f"the {side} weights do not fit {cfg.name} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); pick the model they were trained as")
    out: dict[str, Tensor] = {}
    for key, shape in ours.items():
        src = src_of[key]
        if src not in sd:
            continue
        t = sd[src]
        if cfg.family == "nfnet" and key.endswith(".gain"):
            factor = _gain_factor(sd[src.removesuffix("gain") + "weight"])
            g = t.double().reshape(-1)
            t = (g / factor).reshape(-1, 1, 1, 1) if to_timm else g * factor
            t = t.to(sd[src].dtype)
        elif cfg.family == "nfnet" and ".se.fc" in key and key.endswith(".weight"):  # 1x1 conv <-> linear
            t = t.reshape(*t.shape[:2], 1, 1) if to_timm else t.reshape(t.shape[:2])
        mine = sd[src] if to_timm else t  # the tensor in convscale's layout
        if key == "pos_embed":  # another grid is resampled when loaded; the width must match
            fits = mine.ndim == 3 and mine.shape[-1] == shape[-1]
        else:  # a classifier of other classes is replaced by a fine-tune
            fits = mine.shape == shape or (key.startswith("classifier.") and mine.shape[1:] == shape[1:])
        if not fits:
            raise UserError(f"the {side} weights do not fit {cfg.name}: {src} has shape {tuple(sd[src].shape)} "
                            f"({tuple(mine.shape)} as convscale's) where {cfg.name} has {tuple(shape)}; "
                            "pick the model they were trained as")
        out[names[key] if to_timm else key] = t.contiguous()
    return out


# ----------------------------------------------------------------------------- timm -> convscale

def config_from_timm(sd: Mapping[str, Tensor]) -> ModelConfig:
    """The convscale model a timm state dict is, read from its shapes (UserError if none is)."""
    family = timm_family(sd)
    head = sd.get("head.fc.weight" if family == "nfnet" else "head.weight")
    num_classes = int(head.shape[0]) if head is not None else 1000
    if family == "vit":
        width, patch = int(sd["cls_token"].shape[-1]), int(sd["patch_embed.proj.weight"].shape[-1])
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        named = {w: h for (w, _, _, h) in vit.SIZES.values()}
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        cfg: ModelConfig = vit.ViTConfig(
            width=width, depth=depth, mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
            num_heads=named.get(width, vit.default_num_heads(width)), patch_size=patch, image_size=grid * patch,
            num_classes=num_classes, qkv_bias="blocks.0.attn.qkv.bias" in sd)
    else:
        depths = tuple(1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"stages.{s}."))
                       for s in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))))
        first = int(sd["stages.0.0.conv3.weight"].shape[0])
        cfg = None
        for plus in (False, True):
            base = (nfnet.PLUS_BASE_WIDTHS if plus else nfnet.BASE_WIDTHS)[0]
            candidate = nfnet.NFNetConfig(depths=depths, width_mult=first / base, plus=plus,
                                          activation=TIMM_NFNET_ACTIVATION, num_classes=num_classes)
            ours = _our_shapes(candidate)
            if all(sd[timm_key("nfnet", k)].numel() == v.numel() for k, v in ours.items()
                   if timm_key("nfnet", k) in sd and not k.startswith("classifier.")):
                cfg = candidate
                break
        if cfg is None:
            raise UserError(f"this timm NFNet (depths {list(depths)}, first width {first}) has no convscale "
                            "equivalent (its stem, group or SE widths differ from every NFNetConfig)")
    _convert(cfg, sd, to_timm=False)  # every key and shape fits, or a UserError says which not
    return cfg


def model_spec(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(model name, model_overrides) that rebuild ``cfg`` with ``get_config`` (TrainConfig's
    ``model`` and ``model_overrides``): the name's shape plus the fields that differ from it."""
    from convscale.models import get_config

    base = get_config(cfg.name, num_classes=cfg.num_classes)
    weights_free = {"num_classes", "image_size", "drop_rate", "drop_path_rate", "dropout"}
    overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                 if f.name not in weights_free and getattr(cfg, f.name) != getattr(base, f.name)}
    return cfg.name, {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def from_timm(sd: Mapping[str, Tensor], cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, convscale state dict) of a timm state dict; ``cfg`` the model to load it into
    (default: ``config_from_timm``). UserError when the two compute different functions."""
    family = timm_family(sd)
    if cfg is None:
        cfg = config_from_timm(sd)
    if cfg.family != family:
        raise UserError(f"the file holds a timm {family}, the model {cfg.name} is a {cfg.family}; "
                        f"pick a {family} model")
    if family == "nfnet" and cfg.activation != TIMM_NFNET_ACTIVATION:
        raise UserError(f"timm NFNets compute exact (erf) GELU, {cfg.name} here computes {cfg.activation!r} "
                        f"(convscale's default is DeepMind's tanh GELU); add "
                        f"--set model_overrides.activation={TIMM_NFNET_ACTIVATION} to load timm weights")
    if family == "vit":
        _check_vit_config(cfg)
    return cfg, _convert(cfg, sd, to_timm=False)


def _check_vit_config(cfg: ModelConfig) -> None:
    if cfg.pool != "token" or cfg.posemb != "learn" or cfg.layernorm_eps != TIMM_VIT_LAYERNORM_EPS:
        raise UserError(f"{cfg.name} has pool {cfg.pool!r}, posemb {cfg.posemb!r}, LayerNorm eps "
                        f"{cfg.layernorm_eps:g}; timm's class-token vit_* needs 'token', 'learn', 1e-06")


# ----------------------------------------------------------------------------- convscale -> timm

@dataclass(frozen=True)
class TimmExport:
    """What ``timm.create_model`` needs to rebuild a convscale model and load ``state_dict``."""

    model_name: str  # a timm entry point
    kwargs: dict[str, Any]  # model kwargs beyond the entry point's own (empty for a named size)
    num_classes: int
    state_dict: dict[str, Tensor]

    def create_model_call(self, file: str | Path) -> str:
        """The Python line that loads the exported file in timm."""
        kw = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return (f"timm.create_model({self.model_name!r}, pretrained=True, num_classes={self.num_classes}{kw}, "
                f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes={self.num_classes}))")

    def metadata(self) -> dict[str, str]:
        """safetensors metadata (strings only) naming the timm model."""
        return {"format": "pt", "timm_model": self.model_name, "timm_kwargs": json.dumps(self.kwargs),
                "num_classes": str(self.num_classes)}


def _make_divisible(v: float, divisor: int = TIMM_CH_DIV, round_limit: float = 0.9) -> int:
    """timm.layers.make_divisible."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def _timm_nfnet_kwargs(cfg: nfnet.NFNetConfig, allow_gelu_mismatch: bool) -> tuple[str, dict[str, Any]]:
    """(timm entry point, kwargs) of timm's NormFreeNet equal to ``cfg``; UserError naming what differs."""
    if cfg.activation != TIMM_NFNET_ACTIVATION and not (allow_gelu_mismatch and cfg.activation == "gelu"):
        raise UserError(f"{cfg.name} computes {cfg.activation!r}, timm's dm_nfnet exact (erf) GELU; train with "
                        f"--set model_overrides.activation={TIMM_NFNET_ACTIVATION} to export exactly"
                        + (" (or pass --allow-gelu-mismatch to export the tanh-GELU weights anyway)"
                           if cfg.activation == "gelu" else ""))
    if cfg.stem_strides != (2, 1, 1, 2) or cfg.se_ratio != 0.5:
        raise UserError(f"{cfg.name} has stem strides {list(cfg.stem_strides)} and se_ratio {cfg.se_ratio}; "
                        "timm's NFNet has (2, 1, 1, 2) and 0.5")
    stem = cfg.stem_widths[-1]
    if cfg.stem_widths != (stem // 8, stem // 4, stem // 2, stem) or _make_divisible(stem) != stem:
        raise UserError(f"{cfg.name}'s stem widths {list(cfg.stem_widths)} are not timm's (s/8, s/4, s/2, s) "
                        "with s a multiple of 8; pick a width_mult that gives them (e.g. 0.125, 0.25, 1, not '+')")
    blocks = cfg.blocks()
    group = blocks[0].mid_ch // blocks[0].groups
    for b in blocks:
        mid = _make_divisible(b.out_ch * nfnet.BOTTLENECK_RATIO)
        mid = group * (mid // group) if group % TIMM_CH_DIV == 0 else mid
        if (_make_divisible(b.out_ch) != b.out_ch or mid != b.mid_ch or mid // group != b.groups
                or _make_divisible(b.out_ch * 0.5, round_limit=0.0) != max(1, int(b.out_ch * cfg.se_ratio))):
            raise UserError(f"{cfg.name}'s block widths ({b.out_ch} out, {b.mid_ch} in {b.groups} groups) are not "
                            "timm's (multiples of 8); pick a width_mult that gives them (e.g. 0.125, 0.25, 1)")
    if _make_divisible(cfg.final_width) != cfg.final_width:
        raise UserError(f"{cfg.name}'s final width {cfg.final_width} is not a multiple of 8 as timm's")
    mine = dict(depths=cfg.depths, channels=cfg.widths, stem_chs=stem, group_size=group,
                num_features=cfg.final_width, alpha=cfg.alpha)
    for k in DM_NFNET_VARIANTS:
        if cfg.shape_key() == nfnet.VARIANTS[f"nfnet-{k}"].shape_key() and cfg.group_width == 128 and cfg.alpha == 0.2:
            return f"dm_nfnet_{k}", {}
    return "dm_nfnet_f0", {k: v for k, v in mine.items() if _F0[k] != v}


def _timm_vit_kwargs(cfg: vit.ViTConfig) -> tuple[str, dict[str, Any]]:
    _check_vit_config(cfg)
    shape = (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads)
    name, patch, px = TIMM_VIT_ENTRIES.get(shape, ("vit_base", 16, 224))
    kw: dict[str, Any] = {}
    if shape not in TIMM_VIT_ENTRIES:
        ratio = cfg.mlp_dim / cfg.width
        if int(cfg.width * ratio) != cfg.mlp_dim:
            raise UserError(f"{cfg.name}'s mlp_dim {cfg.mlp_dim} is not int(width x mlp_ratio) for any float ratio")
        kw.update(embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=ratio)
    if cfg.patch_size != patch:
        kw["patch_size"] = cfg.patch_size
    if cfg.image_size != px:
        kw["img_size"] = cfg.image_size
    if not cfg.qkv_bias:
        kw["qkv_bias"] = False
    return f"{name}_patch{patch}_{px}", kw


def to_timm(cfg: ModelConfig, sd: Mapping[str, Tensor], allow_gelu_mismatch: bool = False) -> TimmExport:
    """A convscale model's state dict as the timm model that computes the same function.

    ``allow_gelu_mismatch``: export a (default, tanh-GELU) NFNet although timm computes exact GELU."""
    if cfg.family == "nfnet":
        name, kw = _timm_nfnet_kwargs(cfg, allow_gelu_mismatch)
    elif cfg.family == "vit":
        name, kw = _timm_vit_kwargs(cfg)
    else:
        raise UserError(f"{cfg.name} is a {cfg.family}; timm export covers NFNets and ViTs")
    return TimmExport(name, kw, cfg.num_classes, _convert(cfg, sd, to_timm=True))
