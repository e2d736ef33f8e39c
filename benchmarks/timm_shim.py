"""Make timm importable on a CPU-only torch, or without torchvision, for reference benchmarks only.

timm imports torchvision at load time. The torchvision wheel that matches torch 2.13 (0.28.0) is a
CUDA build: its compiled ops fail to load against the CPU torch, and its ``_meta_registrations``
then registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``, which raises
"operator torchvision::nms does not exist". Declaring those operator schemas with
``torch.library`` before the import lets torchvision (and so timm) load; the ops themselves stay
unimplemented, which is fine because no classification model calls them.

Without torchvision at all, timm's import still names it (data transforms, datasets, and
``torchvision.ops.misc.FrozenBatchNorm2d`` in its layers); no model timm builds for these
benchmarks uses it. ``import_timm`` then puts a stand-in ``torchvision`` package on the import
path whose every name is a placeholder that raises if it is ever called or instantiated, so a
benchmark that needed real torchvision fails loudly instead of measuring something else.

timm is an optional reference, never a dependency of convscale. Install (never torch, never an
unpinned torchvision; torchvision is not needed):

    pip install --no-deps timm==1.0.31 huggingface_hub pyyaml
"""

from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.machinery
import sys
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


class InterpolationMode(enum.Enum):
    """torchvision's enum, which timm reads at import time."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Placeholder(type):
    """A class standing for a torchvision name: attribute lookups give further placeholders,
    subclassing works, calling or instantiating raises."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {"__module__": cls.__module__})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is not installed: {cls.__module__}.{cls.__name__} is a stand-in "
                           "(benchmarks/timm_shim.py); install torchvision to use it")


class _StubModule(ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        value = _Placeholder(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a ``_StubModule`` for ``torchvision`` and every ``torchvision.*`` module."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []  # a package: submodules import through this finder too
        module.__convscale_stub__ = True
        return module

    def exec_module(self, module) -> None:
        pass


def _install_torchvision_stub() -> None:
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.append(_StubFinder())  # last: a real torchvision, if any, is found first


def torchvision_is_stub() -> bool:
    return bool(getattr(sys.modules.get("torchvision"), "__convscale_stub__", False))


def import_timm() -> ModuleType | None:
    """The ``timm`` module, or None when it (or torchvision) is not installed or fails to load;
    ``unavailable_reason()`` then says why."""
    global _ERROR
    try:
        importlib.import_module("torchvision")
    except ModuleNotFoundError:
        _install_torchvision_stub()  # timm names torchvision at import; its models do not use it
    except RuntimeError:
        _declare_torchvision_schemas()
    try:
        return importlib.import_module("timm")
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference available"
        _ERROR = f"{type(e).__name__}: {e}".splitlines()[0]
        return None


def unavailable_reason() -> str:
    return _ERROR or "timm not imported yet"
