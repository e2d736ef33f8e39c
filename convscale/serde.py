"""Dataclasses to and from JSON-ready dicts, read by their type hints. No torch, no numpy import.

    @dataclasses.dataclass
    class Fit(Serde):
        slope: Estimate               # a nested dataclass: a nested dict
        r2: float                     # NaN/inf written as null, null read back as NaN
        label: str | None = None      # Optional: null stays None
        points: tuple[float, ...] = ()  # tuples are JSON lists, read back as tuples

    Fit.from_dict(fit.to_dict()) == fit   # (up to NaN != NaN)

Writing (``to_dict``): every field in order; nested dataclasses, dicts, lists and tuples recursively;
numpy scalars and arrays as Python numbers and lists; non-finite floats as None (strict JSON).

Reading (``from_dict``): each value is converted to its field's annotated type (nested dataclasses,
``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``; None in a plain ``float`` field, or in a
list of floats, reads as NaN); a missing field takes its default. A key the class has no field for,
or a missing field without a default, is a ``UserError`` naming it. Values are not otherwise checked.

Hooks a class may define (each applies at every level of nesting):
  * ``serde_read(cls, data) -> dict`` (a classmethod): called on the raw dict before it is read, to
    accept what older versions wrote: rename or regroup legacy keys, fill removed ones, refuse a
    layout version it cannot read (raise ``ValueError``);
  * ``serde_write(self, data) -> dict``: called on the written dict, to drop or reshape keys.

For example a config whose flat fields moved into groups still reads its old files with::

    @classmethod
    def serde_read(cls, data):
        for key in OPTIM_FIELDS & data.keys():      # {"lr": 0.1} -> {"optim": {"lr": 0.1}}
            data.setdefault("optim", {})[key] = data.pop(key)
        return data
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, TypeVar

from convscale.errors import UserError
from convscale.fileio import json_clean

T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass instance ``obj`` as a JSON-ready dict (see the module docstring)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(obj).__name__}")
    d = {f.name: _write(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    hook = getattr(obj, "serde_write", None)
    return hook(d) if hook is not None else d


def _write(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, dict):
        return {str(k): _write(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_write(x) for x in v]
    return json_clean(v)


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """An instance of the dataclass ``cls`` from ``data`` (``to_dict`` output, or a file written by an
    earlier version that ``cls.serde_read`` accepts); ``where`` names the place in error messages."""
    at = f" in {where}" if where else ""
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object for {cls.__name__}{at}, got {type(data).__name__}")
    hook = getattr(cls, "serde_read", None)
    if hook is not None:
        data = hook(dict(data))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown {cls.__name__} field {unknown[0]!r}{at}{hint}; valid fields: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing {cls.__name__} field {missing[0]!r}{at}")
    hints = _hints(cls)
    prefix = f"{where}." if where else ""
    return cls(**{k: _read(hints.get(k, Any), v, prefix + k) for k, v in data.items()})


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _read(tp: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _read(options[0], v, where)
        for a in options:  # e.g. ``Estimate | float``: the dataclass when a dict came
            if dataclasses.is_dataclass(a) and isinstance(v, dict):
                return from_dict(a, v, where)
        return v
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where) if isinstance(v, dict) else v
    if tp is float:
        return math.nan if v is None else v
    if origin is list and isinstance(v, list):
        return [_read(args[0] if args else Any, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is tuple and isinstance(v, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if args and len(args) == len(v):
            return tuple(_read(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        return tuple(v)
    if tp is tuple and isinstance(v, list):
        return tuple(v)
    if origin is dict and isinstance(v, dict):
        value_type = args[1] if len(args) == 2 else Any
        return {k: _read(value_type, x, f"{where}.{k}") for k, x in v.items()}
    return v


class Serde:
    """Mixin for a dataclass: ``to_dict()`` and ``from_dict(data)`` by this module's rules (a class
    adapts them with the ``serde_read`` / ``serde_write`` hooks, not by overriding these)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return from_dict(cls, data)
