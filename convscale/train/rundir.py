"""The run directory's rules: one process trains it at a time, a finished run is reported, a
different config is refused, and ``--restart`` wipes only a directory that proves it is a run.

Files of a run (nothing else is ever removed):
  config.json  metrics.jsonl  result.json  checkpoints/  run.lock  .tmp-* (a killed write's leftovers)
  and, with trackers (train/loggers): trackers.json  tensorboard/  wandb/  mlruns/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from convscale.errors import UserError
from convscale.fileio import TMP_PREFIX, atomic_write_json
from convscale.fslock import FileLock
from convscale.train.checkpoint import CHECKPOINT_DIR, is_main_process
from convscale.train.config import GROUPS, numbers_part
from convscale.train.metrics import METRICS_FILE

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOCK_FILE = "run.lock"
#: what trackers write into a run dir by default (train/loggers): ids, TensorBoard events, W&B, MLflow
TRACKER_ENTRIES = frozenset({"trackers.json", "tensorboard", "wandb", "mlruns"})
RUN_ENTRIES = frozenset({CONFIG_FILE, METRICS_FILE, RESULT_FILE, CHECKPOINT_DIR, LOCK_FILE}) | TRACKER_ENTRIES


def read_run_json(path: Path) -> dict[str, Any]:
    """A JSON object a run wrote (config.json, result.json); UserError naming the fix if damaged."""
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        d = None
    if not isinstance(d, dict):
        fix = ("delete it and rerun the same command: the run finishes again from its last checkpoint"
               if path.name == RESULT_FILE else
               "restore it, or move the folder away and start with a new --run-dir")
        raise UserError(f"{path} is damaged (not a JSON object as convscale writes it); {fix}")
    return d


def _is_run_config(d: dict[str, Any]) -> bool:
    train = d.get("train")
    return (isinstance(train, dict) and isinstance(train.get("data"), dict) and isinstance(d.get("steps"), int)
            and isinstance(d.get("model"), dict))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json; UserError naming the fix if it is damaged or not a run's."""
    d = read_run_json(Path(run_dir) / CONFIG_FILE)
    if not _is_run_config(d):
        raise UserError(f"{Path(run_dir) / CONFIG_FILE} is not a convscale run's config (no train, model and steps); "
                        f"restore it, or use a new --run-dir")
    return d


def _comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    # a run dir of an older version (flat train table, fields added since) resumes
    return {**resolved, "train": numbers_part(resolved["train"]), "convscale_version": None}


def _differing(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    """Dotted names of the keys whose values differ, into the groups of train (``train.optim.lr``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a != b:
            both_groups = isinstance(a, dict) and isinstance(b, dict) and k in GROUPS and prefix == "train."
            out += _differing(a, b, f"{prefix}{k}.") if both_groups else [f"{prefix}{k}"]
    return out


def wipe_run(run_dir: Path) -> None:
    """Remove a run's files for ``--restart``; UserError (nothing removed) unless ``run_dir``
    holds a run's config.json and nothing but a run's files."""
    config = run_dir / CONFIG_FILE
    if not config.is_file() or not _is_run_config(read_run_json(config)):  # a damaged one proves nothing
        raise UserError(f"--restart wipes only run directories, and {run_dir} holds no run's {CONFIG_FILE}; "
                        f"nothing was removed: use a new --run-dir")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith(TMP_PREFIX))
    if foreign:
        raise UserError(f"{run_dir} holds {', '.join(foreign[:3])}, which no run writes; --restart removed nothing: "
                        f"move {'them' if len(foreign) > 1 else 'it'} out first, or use a new --run-dir")
    for p in run_dir.iterdir():
        if p.name == LOCK_FILE:
            continue  # held by this process right now
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def lock_run_dir(run_dir: Path) -> FileLock:
    """Create ``run_dir`` if needed and take its lock; UserError if another process trains it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a folder; give the path of a (new) folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE)
    if not lock.acquire():
        holder = lock.holder()
        raise UserError(f"{run_dir} is being trained by another process{f' (pid host: {holder})' if holder else ''}; "
                        f"wait for it to end, or use a new --run-dir")
    return lock


def _holds_nothing(run_dir: Path) -> bool:
    return all(p.name == LOCK_FILE or p.name.startswith(TMP_PREFIX) for p in run_dir.iterdir())


def prepare_run_dir(run_dir: Path, resolved: dict[str, Any], restart: bool) -> Optional[dict[str, Any]]:
    """Create or check the (locked: ``lock_run_dir``) run directory; returns the stored result if
    the run already finished."""
    if restart and not _holds_nothing(run_dir):
        wipe_run(run_dir)
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        stored = read_run_config(run_dir)
        old, new = _comparable(stored), _comparable(resolved)
        if old != new:
            diff = _differing(old["train"], new["train"], "train.") + _differing(
                {k: v for k, v in old.items() if k != "train"}, {k: v for k, v in new.items() if k != "train"}, "")
            raise UserError(
                f"{run_dir} holds a run with a different config (differs in {', '.join(diff[:6])}); "
                f"use a new --run-dir, or --restart to wipe it"
            )
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            return read_run_json(result_path)
    elif not _holds_nothing(run_dir):
        raise UserError(f"{run_dir} is not empty and holds no run (no {CONFIG_FILE}); use a new --run-dir")
    if is_main_process():
        atomic_write_json(config_path, resolved)
    return None
