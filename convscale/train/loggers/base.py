"""What every tracker shares: the context it starts in, its stored ids, the scalars of a row."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from convscale.errors import UserError

#: ids of the tracked runs (W&B run id, MLflow run id, TensorBoard folder), so a resume continues them
STATE_FILE = "trackers.json"


@dataclass
class LoggerContext:
    """Where and how a tracker starts."""

    run_dir: Path
    run_name: str  # the run directory's name: a sweep cell's id
    resolved: dict[str, Any]  # the run's full resolved config (its config.json)
    start_step: int  # 0, or the checkpoint step a resumed run continues from
    #: (kind, step) of the rows an interrupted attempt logged past ``start_step``: the resumed run
    #: writes them again (metrics.jsonl drops and rewrites them; a tracker may skip them instead)
    replayed: frozenset = frozenset()
    state: dict[str, Any] = field(default_factory=dict)  # this tracker's entry of trackers.json, if any


def require(module: str, extra: str) -> ModuleType:
    """Import a tracker's library; UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logging to {extra} needs the {module} package: pip install 'convscale[{extra}]'") from None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tracker scalars: ``{kind}/{field}`` (``train/loss``, ``eval/heldout_top1``);
    ``step`` is the x-axis and not a scalar; missing (None) and non-finite values are left out, as
    metrics.jsonl writes them as null."""
    kind = row.get("kind", "train")
    out = {}
    for key, value in row.items():
        if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        d = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    from convscale.train.checkpoint import atomic_write_json

    atomic_write_json(run_dir / STATE_FILE, state)
