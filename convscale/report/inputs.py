"""Everything a report reads from a sweep directory: results, fits, training curves, fine-tunes.

Nothing here trains or imports torch: metrics.jsonl and result.json files are read as plain JSON.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.fileio import read_json, read_jsonl
from convscale.scaling import StudyFit, frontiers_by_family, load_results, sweep_fit
from convscale.scaling.table import without_trunks

FINETUNE_DIR = "finetune"


@dataclasses.dataclass
class Curve:
    """One cell's training curve: train rows (images_seen, train_flops, loss) and eval rows."""

    cell_id: str
    family: str
    model: str
    params: float
    status: str
    train: pd.DataFrame  # columns step, images_seen, train_flops, loss
    heldout: pd.DataFrame  # columns step, images_seen, train_flops, heldout_loss


@dataclasses.dataclass
class SweepInputs:
    """A sweep directory read for reporting. ``fit`` is None when nothing could be fitted
    (``fit_error`` says why); frontiers are then computed directly from the done runs."""

    root: Path
    study_name: str
    results: pd.DataFrame
    fit: StudyFit | None
    fit_error: str | None
    fit_source: str  # "fit.json" | "fitted"
    frontiers: dict[str, pd.DataFrame]
    curves: list[Curve]
    finetunes: pd.DataFrame  # one row per fine-tune result (empty when there are none)

    @property
    def families(self) -> list[str]:
        return sorted(self.results["family"].astype(str).unique())


def cell_run_dir(root: Path, row: pd.Series) -> Path:
    """The cell's run dir: the recorded path, or runs/<cell_id> when the sweep dir was moved."""
    recorded = Path(str(row.get("run_dir", "")))
    if recorded.is_dir():
        return recorded
    cell_id = row.get("cell_id")
    name = str(cell_id) if isinstance(cell_id, str) and cell_id else recorded.name
    return root / "runs" / name


def _cell_id(row: pd.Series) -> str:
    cid = row.get("cell_id")
    return str(cid) if isinstance(cid, str) and cid else Path(str(row.get("run_dir", ""))).name


def read_curves(root: Path, results: pd.DataFrame) -> list[Curve]:
    """Training curves of every cell that has a metrics.jsonl (finished or not)."""
    curves = []
    for _, row in results.iterrows():
        rows = read_jsonl(cell_run_dir(root, row) / "metrics.jsonl")
        if not rows:
            continue
        train = [r for r in rows if r.get("kind", "train") == "train" and r.get("loss") is not None]
        ev = [r for r in rows if r.get("kind") == "eval" and r.get("heldout_loss") is not None]
        curves.append(
            Curve(
                cell_id=_cell_id(row),
                family=str(row["family"]),
                model=str(row["model"]),
                params=float(row["params"]),
                status=str(row["status"]),
                train=pd.DataFrame(train, columns=["step", "images_seen", "train_flops", "loss"]).astype(float),
                heldout=pd.DataFrame(ev, columns=["step", "images_seen", "train_flops", "heldout_loss"]).astype(float),
            )
        )
    return curves


FINETUNE_COLUMNS = (
    "name", "status", "heldout_top1", "heldout_top5", "heldout_loss", "finetune_flops", "pretrain_run_dir",
    "heldout_images", "chance_loss", "family", "model", "params", "pretrain_flops", "pretrain_loss", "pretrain_top1",
    "epochs", "lr", "seed", "data_seed", "split_seed", "pretrain_seed",
)


#: data kinds whose held-out set, without a ``heldout_path``, is a fraction split off by the data seed
SEEDED_SPLIT_KINDS = ("digits", "arrays", "folder")


def _finetune_seeds(config_path: Path) -> tuple[float, float, float]:
    """A fine-tune's training seed, data seed and split seed (its data seed when that also chose its
    held-out images, see ``SEEDED_SPLIT_KINDS``) from its run config; nan where unknown."""
    cfg = read_json(config_path) if config_path.is_file() else None
    train = cfg.get("train", cfg) if isinstance(cfg, dict) else None
    if not isinstance(train, dict):
        return math.nan, math.nan, math.nan
    data = train.get("data") if isinstance(train.get("data"), dict) else {}
    seed = float(train["seed"]) if isinstance(train.get("seed"), (int, float)) else math.nan
    data_seed = float(data["seed"]) if isinstance(data.get("seed"), (int, float)) else math.nan
    fraction = data.get("heldout_fraction", 0.0)
    splits = (data.get("kind") in SEEDED_SPLIT_KINDS and not data.get("heldout_path")
              and isinstance(fraction, (int, float)) and fraction > 0)
    return seed, data_seed, data_seed if splits else math.nan


def read_finetunes(root: Path, results: pd.DataFrame) -> pd.DataFrame:
    """``finetune/<name>/result.json`` files joined to their pre-training cell (by run dir)."""
    out = []
    by_dir: dict[str, pd.Series] = {}
    for _, row in results.iterrows():
        by_dir[str(Path(str(row.get("run_dir", ""))).resolve())] = row
        by_dir.setdefault(_cell_id(row), row)
    base = root / FINETUNE_DIR
    for res_path in sorted(base.glob("*/result.json")) if base.is_dir() else []:
        res = read_json(res_path)
        if not isinstance(res, dict):
            continue
        pre = str(res.get("pretrain_run_dir", ""))
        cell = by_dir.get(str(Path(pre).resolve())) if pre else None
        if cell is None and pre:
            cell = by_dir.get(Path(pre).name)
        rec = {k: res.get(k) for k in FINETUNE_COLUMNS[:9]}
        rec["name"] = res_path.parent.name
        rec["seed"], rec["data_seed"], rec["split_seed"] = _finetune_seeds(res_path.parent / "config.json")
        if cell is not None:
            rec.update(
                family=str(cell["family"]), model=str(cell["model"]), params=float(cell["params"]),
                pretrain_flops=float(cell["train_flops"]) if pd.notna(cell["train_flops"]) else float(cell["budget_flops"]),
                pretrain_loss=float(cell["loss"]), pretrain_top1=float(cell["top1"]),
                epochs=float(cell.get("epochs", math.nan)), lr=float(cell.get("lr", math.nan)),
                pretrain_seed=cell.get("seed", math.nan),
            )
        out.append(rec)
    df = pd.DataFrame(out, columns=list(FINETUNE_COLUMNS))
    for col in ("heldout_top1", "heldout_top5", "heldout_loss", "heldout_images", "chance_loss", "finetune_flops", "params", "pretrain_flops",
                "pretrain_loss", "pretrain_top1", "epochs", "lr", "seed", "data_seed", "split_seed", "pretrain_seed"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _load_or_fit(root: Path, bootstrap: int, seed: int):
    try:
        fit, source = sweep_fit(root, bootstrap=bootstrap, seed=seed)
        return fit, None, source
    except UserError as e:
        return None, str(e), "fitted"


def _frontiers(fit: StudyFit | None, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    if fit is not None:
        return {name: pd.DataFrame(f.frontier) for name, f in fit.families.items()}
    return frontiers_by_family(df)


def load_sweep(sweep_dir: str | Path, *, bootstrap: int = 1000, seed: int = 0) -> SweepInputs:
    """Read a sweep directory; UserError (one line naming the fix) if it is not one or is empty."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the sweep directory written by `convscale sweep run`")
    study = read_json(root / "study.json")
    has_results = any((root / n).is_file() for n in ("results.parquet", "results.csv"))
    if study is None and not has_results:
        raise UserError(
            f"{root} is not a sweep directory (no study.json or results.parquet); "
            "give the --dir of `convscale sweep run`"
        )
    if not has_results:
        raise UserError(
            f"{root} has no results yet; run `convscale sweep run STUDY.toml --dir {root}` first "
            f"(or `convscale sweep collect {root}`)"
        )
    results_path = next(root / n for n in ("results.parquet", "results.csv") if (root / n).is_file())
    df = without_trunks(load_results(results_path))  # a trunk is no budget's run: its branches are
    if len(df) == 0:
        raise UserError(f"{results_path} is empty; run `convscale sweep run STUDY.toml --dir {root}` first")
    for col in ("family", "model", "params", "status"):
        if col not in df.columns:
            raise UserError(f"{results_path} has no {col!r} column; rewrite it with `convscale sweep collect {root}`")
    df = df.copy()
    df["status"] = df["status"].astype(str).str.strip().str.lower()
    for col in ("images_seen", "train_flops", "budget_flops", "loss", "top1", "top5", "lr", "epochs", "params"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        else:
            df[col] = np.nan
    if not (df["status"] == "done").any():
        counts = ", ".join(f"{v} {k}" for k, v in df["status"].value_counts().items())
        raise UserError(f"no cell of {root} is done yet ({counts}); finish the sweep with `convscale sweep run` first")
    fit, fit_error, source = _load_or_fit(root, bootstrap, seed)
    name = (study or {}).get("name") or (str(df["study"].iloc[0]) if "study" in df.columns else root.name)
    return SweepInputs(
        root=root,
        study_name=str(name),
        results=df,
        fit=fit,
        fit_error=fit_error,
        fit_source=source,
        frontiers=_frontiers(fit, df),
        curves=read_curves(root, df),
        finetunes=read_finetunes(root, df),
    )
