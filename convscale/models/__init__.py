"""The model zoo: NFNets, ViTs and ConvNeXts by name, their configs, parameter and FLOP counts.

Names: ``nfnet-f0`` … ``nfnet-f7``, ``nfnet-f0+`` … ``nfnet-f7+``, ``vit-ti16`` … ``vit-gg14``,
``vit-so400m14``, ``convnext-t`` … ``convnext-xl``; the paper's spellings (``NFNet-F7+``, ``ViT-B/16``, ``ViT-G/14``) are aliases;
scaled-down models are named by width and depth (``nfnet-w0.0625-d1.1.1``, ``vit-w64-d4-p4``, ``convnext-w32-d1.1.1.1``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable

import torch
from torch import nn

from convscale.errors import UserError
from convscale.models import convnext, nfnet, vit
from convscale.models.base import (
    FamilyTraits,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    train_flops_per_image,
)

#: the registered families: a module each, with ``CONFIG`` (its config class), ``VARIANTS`` and
#: ``parse_name``; adding a family is its module plus one entry here
FAMILIES = {mod.CONFIG.family: mod for mod in (nfnet, vit, convnext)}
CONFIG_CLASSES = {fam: mod.CONFIG for fam, mod in FAMILIES.items()}


def family_traits(family: str) -> FamilyTraits:
    """The traits of a registered family (its config class's ``traits``)."""
    if family not in CONFIG_CLASSES:
        raise UserError(f"unknown model family {family!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[family].traits


BLOCK_TYPES: tuple[type[nn.Module], ...] = tuple(t for c in CONFIG_CLASSES.values() for t in c.traits.block_types)


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` is a residual block of a zoo family: the unit of activation
    checkpointing (train/memory.py) and of FSDP wrapping (train/distributed.py)."""
    return isinstance(module, BLOCK_TYPES)


def model_names(family: str | None = None, include_test: bool = False) -> list[str]:
    """Canonical names of the named variants, in zoo order (smallest first per family)."""
    names: list[str] = []
    for fam, mod in FAMILIES.items():
        if family is not None and fam != family:
            continue
        names += [n for n in mod.VARIANTS if include_test or not n.endswith("-tiny")]
    return names


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), model_names(include_test=True), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown model '{name}'; {hint}run `convscale models` for the zoo"


def get_config(name: str, num_classes: int = 1000, **overrides: Any) -> ModelConfig:
    """The config of a zoo model, with ``num_classes`` and any config field overridden."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("empty model name; run `convscale models` for the zoo")
    cfg = None
    for mod in FAMILIES.values():
        cfg = mod.parse_name(name.strip())
        if cfg is not None:
            break
    if cfg is None:
        raise UserError(_suggest(name))
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown {cfg.family} option(s) {unknown}; valid options: {sorted(fields)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, num_classes=num_classes, **overrides)


def config_at_resolution(name: str, resolution: int, num_classes: int = 1000, **overrides: Any) -> ModelConfig:
    """The config of a zoo model as it is built to train at ``resolution`` px: a ViT's position
    grid (``image_size``) follows the resolution unless overridden, so its parameter count is the
    one of the trained model (a 224-px grid would add ~3k tokens x width parameters at 16 px)."""
    probe = get_config(name, num_classes=num_classes)
    if "image_size" in {f.name for f in dataclasses.fields(probe)} and "image_size" not in overrides:
        overrides = {**overrides, "image_size": resolution}
    return get_config(name, num_classes=num_classes, **overrides)


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a zoo model by name; ``overrides`` replace config fields (timm-style)."""
    return get_config(name, num_classes=num_classes, **overrides).build()


def config_from_json_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a model config saved with ``config_to_dict`` (e.g. from a run's config.json)."""
    fam = d.get("family")
    if fam not in CONFIG_CLASSES:
        raise UserError(f"model config has unknown family {fam!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return config_from_dict(CONFIG_CLASSES[fam], d)


def count_params(cfg: ModelConfig, include_head: bool = True) -> int:
    """Parameter count, built on the meta device (nothing allocated, fine for NFNet-F7+ or ViT-G).

    ``include_head=False``: without the classifier head (``cfg.head_params``), the N of a scaling
    law whose body does not grow with the number of classes (at 30k classes the head is 57 % of
    NFNet-F0's parameters)."""
    with torch.device("meta"):
        model = cfg.build()
    total = sum(p.numel() for p in model.parameters())
    return total if include_head else total - cfg.head_params


def zoo_table(
    names: Iterable[str], resolution: int, num_classes: int = 1000
) -> list[dict[str, Any]]:
    """One row per model: name, family, params (as built at ``resolution``) with and without the
    classifier head, forward and training GFLOPs per image."""
    rows = []
    for name in names:
        get_config(name, num_classes=num_classes).check_resolution(resolution)  # the clear error first
        cfg = config_at_resolution(name, resolution, num_classes=num_classes)
        fwd = cfg.forward_flops(resolution)
        rows.append(
            {
                "name": cfg.name,
                "family": cfg.family,
                "params": count_params(cfg),
                "params_without_head": count_params(cfg, include_head=False),
                "resolution": resolution,
                "gflops": fwd / 1e9,
                "train_gflops": train_flops_per_image(fwd) / 1e9,
            }
        )
    return rows


__all__ = [
    "BLOCK_TYPES",
    "FAMILIES",
    "FamilyTraits",
    "ModelConfig",
    "config_at_resolution",
    "config_from_json_dict",
    "config_to_dict",
    "count_params",
    "create_model",
    "family_traits",
    "get_config",
    "is_residual_block",
    "model_names",
    "train_flops_per_image",
    "zoo_table",
]
