"""Make timm importable on a CPU-only torch, for reference benchmarks only.

timm imports torchvision at load time. The torchvision wheel that matches torch 2.13 (0.28.0) is a
CUDA build: its compiled ops fail to load against the CPU torch, and its ``_meta_registrations``
then registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``, which raises
"operator torchvision::nms does not exist". Declaring those operator schemas with
``torch.library`` before the import lets torchvision (and so timm) load; the ops themselves stay
unimplemented, which is fine because no classification model calls them.

timm is an optional reference, never a dependency of convscale. Install (never torch, never an
unpinned torchvision):

    pip install --no-deps timm==1.0.31 huggingface_hub pyyaml
    pip install --no-deps torchvision==0.28.0
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Schemas as torchvision's csrc/ops declares them; only the two that get fake kernels
# unconditionally need to exist (the others are registered only when the compiled ops load).
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would undefine the ops
_ERROR: str | None = None


def _declare_torchvision_schemas() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    missing = {}
    for name, schema in _SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            missing[name] = schema
    if not missing:  # a working torchvision already defined them
        return
    # FRAGMENT, not DEF: a later real torchvision load may DEF the namespace itself.
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in missing.items():
        _LIBRARY.define(f"{name}{schema}")


def import_timm() -> ModuleType | None:
    """The ``timm`` module, or None when it (or torchvision) is not installed or fails to load;
    ``unavailable_reason()`` then says why."""
    global _ERROR
    try:
        importlib.import_module("torchvision")
    except ModuleNotFoundError:
        pass  # timm may still import if a future version drops the dependency
    except RuntimeError:
        _declare_torchvision_schemas()
    try:
        return importlib.import_module("timm")
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference available"
        _ERROR = f"{type(e).__name__}: {e}".splitlines()[0]
        return None


def unavailable_reason() -> str:
    return _ERROR or "timm not imported yet"
