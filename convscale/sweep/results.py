"""The results table of a sweep: one row per cell, the input of the `scaling` stage.

Columns (units in the names or here): study, family, model, params (all parameters),
params_without_head (without the classifier head's weight and bias: the N whose size does not
follow the number of classes; empty for sweeps planned before it existed), flops_per_image (forward
FLOPs per image at ``resolution``), resolution, batch_size, images_seen, epochs, lr,
budget_flops, train_flops, wall_hours, device_hours (wall hours x devices the run used: GPUs,
or CPU cores), loss / top1 / top5 (final held-out; top-k as fractions), status
(done / diverged / failed / pending), run_dir; then cell_id, optimizer, budget_kind, budget,
steps (planned), device_kind, peak_memory_gb, error (last stderr line of a failed cell), chance_loss
(ln(classes): the held-out loss of a model that learned nothing), precision (bf16 | fp32 as
planned), eval_resolution (px of the
held-out images behind loss / top1 / top5; empty for sweeps planned before it existed), seed
(TrainConfig.seed of the run: a study with ``seeds = N`` has N rows per (model, budget, lr);
empty for sweeps planned before seeds), role (empty for a run of its own; with cooldown branches
"trunk" or "branch": a branch's train_flops is the budget it represents, trunk prefix included,
and the fits leave trunks out), spent_flops (training FLOPs the cell computed itself: a trunk the
steps it trained, a branch its steps past its cooldown start (none when its trunk diverged before
it); a run of its own its train_flops), steps_trained (the optimizer steps the cell's run took, a
branch's counted from step 0 as its trunk's are: ``steps`` less where a run diverged and stopped;
empty until the cell finishes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from convscale.fileio import atomic_write, read_json
from convscale.status import DIVERGED, DONE, FAILED, FINISHED, PENDING
from convscale.sweep.sweepdir import SweepDir

COLUMNS = (
    "study", "family", "model", "params", "params_without_head", "flops_per_image", "resolution", "batch_size",
    "images_seen", "epochs", "lr", "budget_flops", "train_flops", "wall_hours", "device_hours",
    "loss", "top1", "top5", "status", "run_dir",
)
EXTRA_COLUMNS = ("cell_id", "optimizer", "budget_kind", "budget", "steps", "device_kind", "peak_memory_gb", "error",
                 "chance_loss", "eval_resolution", "precision", "seed", "role", "spent_flops", "steps_trained")
STATUSES = (DONE, DIVERGED, FAILED, PENDING)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _whole(v: Any) -> Any:
    """An integer count from a result, or None where it is missing or not a number."""
    n = _num(v)
    return int(n) if math.isfinite(n) else None


def _spent(res: dict[str, Any], cell: Any) -> float:
    """What a finished cell computed itself. A trunk and a run of its own: its result's train_flops
    (what it trained, also when it diverged early). A branch's result counts the trunk prefix in its
    train_flops (the budget it stands for), so its own share is what it trained past its start step:
    its cooldown when done, less when it diverged in it, nothing when its trunk diverged first."""
    trained = _num(res.get("train_flops"))
    if cell.role != "branch":
        return trained
    steps, start = _num(res.get("steps")), float(cell.start_step or 0)
    if steps <= 0:
        return 0.0
    return max(0.0, steps - start) * trained / steps


def collect(root: str | Path):
    """The results table (a pandas DataFrame) of the sweep in ``root``; UserError if it holds no sweep."""
    import pandas as pd

    sweep = SweepDir(root)
    study, cells = sweep.load()
    epoch_images = (read_json(sweep.plan_path) or {}).get("epoch_images") or 0
    rows = []
    for c in cells:
        state = sweep.state(c.cell_id)
        res = sweep.result(c.cell_id) or {}
        launch = read_json(sweep.launch_path(c.cell_id)) or {}
        failure = read_json(sweep.failure_path(c.cell_id)) or {}
        finished = state in FINISHED
        images_seen = res.get("images_seen") if finished else None
        wall_hours = _num(res.get("wall_seconds")) / 3600.0 if finished else math.nan
        devices = launch.get("devices") or 1
        rows.append({
            "study": study.name,
            "family": c.family,
            "model": c.model,
            "params": c.params,
            "params_without_head": c.params_without_head if c.params_without_head is not None else pd.NA,
            "flops_per_image": c.flops_per_image,
            "resolution": c.resolution,
            "batch_size": c.batch_size,
            "images_seen": images_seen if images_seen is not None else pd.NA,
            "epochs": _num(images_seen) / epoch_images if (epoch_images and images_seen is not None) else math.nan,
            "lr": c.lr,
            "budget_flops": c.budget_flops if c.budget_flops is not None else math.nan,
            "train_flops": _num(res.get("train_flops")) if finished else math.nan,
            "wall_hours": wall_hours,
            "device_hours": wall_hours * devices,
            "loss": _num(res.get("heldout_loss")) if finished else math.nan,
            "top1": _num(res.get("heldout_top1")) if finished else math.nan,
            "top5": _num(res.get("heldout_top5")) if finished else math.nan,
            # a running cell has no result yet: for the table it is pending
            "status": state if state in STATUSES else PENDING,
            "run_dir": str(sweep.run_dir(c.cell_id)),
            "cell_id": c.cell_id,
            "optimizer": c.optimizer,
            "budget_kind": c.budget_kind,
            "budget": c.budget,
            "steps": c.steps,
            "device_kind": launch.get("device_kind", ""),
            # GPU: peak allocated; CPU: the run process's peak resident set
            "peak_memory_gb": _num(res.get("peak_memory_bytes")) / 2**30 if finished else math.nan,
            "error": failure.get("last_stderr_line", "") if state == FAILED else "",
            "chance_loss": _num(res.get("chance_loss")) if finished else math.nan,
            "eval_resolution": c.eval_resolution if c.eval_resolution is not None else pd.NA,
            "precision": c.precision or "",
            "seed": c.seed if c.seed is not None else pd.NA,
            "role": c.role or "",
            "spent_flops": _spent(res, c) if finished else math.nan,
            "steps_trained": _whole(res.get("steps")) if finished else None,
        })
    df = pd.DataFrame(rows, columns=[*COLUMNS, *EXTRA_COLUMNS])
    for col in ("images_seen", "params_without_head", "eval_resolution", "seed", "steps_trained"):  # integers that may be missing
        df[col] = df[col].astype("Int64")
    return df


def write_results(root: str | Path, df) -> tuple[Path, Path]:
    """Write ``results.parquet`` and ``results.csv`` atomically (readers never see half a file)."""
    root = Path(root)
    parquet, csv = root / "results.parquet", root / "results.csv"
    atomic_write(parquet, lambda p: df.to_parquet(p, index=False))
    atomic_write(csv, lambda p: df.to_csv(p, index=False))
    return parquet, csv
