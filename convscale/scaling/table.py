"""Load and validate a results table (one row per training run) for fitting.

Two inputs are accepted:
- the sweep's table: ``family, model, params, flops_per_image, images_seen, epochs, lr,
  train_flops, wall_hours, device_hours, loss, top1, status`` and optionally ``budget_flops``;
- any CSV with ``params``, ``data`` (samples or tokens seen) and ``loss``, optionally ``flops``,
  ``family``, ``lr``, ``epochs``, ``seed``, ``budget_flops`` (runs from anywhere; with
  ``budget_flops`` the runs form an IsoFLOP design, grouped by it).

``prepare_table`` maps both onto one canonical frame whose ``train_flops`` is the compute C of a run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from convscale.errors import UserError

DEFAULT_FAMILY = "all"
RESULTS_FILES = ("results.parquet", "results.csv")


@dataclasses.dataclass
class PreparedTable:
    """A validated table: ``done`` holds the runs that enter fits, in canonical columns
    ``family, model, params, images_seen, train_flops, loss, lr, epochs, budget_flops, top1`` and
    ``budget_kind, budget, seed, chance_loss, params_without_head`` (empty / NaN when not given).
    """

    done: pd.DataFrame
    n_runs: int
    status_counts: dict[str, int]
    runs_per_family: dict[str, int]
    compute_source: str  # "train_flops" | "flops" | "3*flops_per_image*images_seen" | "6*N*D"
    notes: list[str]
    #: runs that diverged (same columns; loss NaN): they bound a learning-rate grid from above
    diverged: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)


def load_results(path: str | Path) -> pd.DataFrame:
    """Read a results .parquet/.csv file, or ``results.parquet``/``results.csv`` in a sweep dir."""
    p = Path(path)
    if p.is_dir():
        for name in RESULTS_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"{p} holds no results.parquet or results.csv; pass a results file or a sweep directory")
    if not p.exists():
        raise UserError(f"results file {p} does not exist; pass a results .parquet/.csv or a sweep directory")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(p)
        if suffix == ".csv":
            return pd.read_csv(p)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        first_line = (str(e).splitlines() or [""])[0]
        raise UserError(f"cannot read {p} ({type(e).__name__}: {first_line}); pass a valid .parquet or .csv") from e
    raise UserError(f"{p} is neither .parquet nor .csv; pass a results .parquet/.csv file or a sweep directory")


def without_trunks(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are runs of a budget: the trunks of cooldown branches (``role == "trunk"``:
    constant-lr prefixes that several budgets' branches start from) are none."""
    if "role" not in df.columns:
        return df
    return df[df["role"].fillna("").astype(str) != "trunk"]


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def prepare_table(df: pd.DataFrame) -> PreparedTable:
    """Validate ``df`` and return its fit-ready ``done`` runs (UserError naming the fix otherwise)."""
    if df is None or len(df) == 0:
        raise UserError("the results table is empty; run a sweep first or pass a CSV with params, data and loss rows")
    notes: list[str] = []
    runs = without_trunks(df)
    if len(runs) < len(df):
        notes.append(f"left out {len(df) - len(runs)} trunk(s) of cooldown branches (each budget is its branch)")
        df = runs
    cols = set(df.columns)
    data_col = "images_seen" if "images_seen" in cols else ("data" if "data" in cols else None)
    missing = [c for c in ("params", "loss") if c not in cols]
    if data_col is None:
        missing.insert(1, "images_seen (or data)")
    if missing:
        raise UserError(
            f"results table is missing column(s) {', '.join(missing)}; need params, images_seen (or data) and loss"
        )

    out = pd.DataFrame(index=df.index)
    out["family"] = df["family"].astype(str) if "family" in cols else DEFAULT_FAMILY
    out["params"] = _numeric(df, "params")
    out["images_seen"] = _numeric(df, data_col)
    out["loss"] = _numeric(df, "loss")
    if "model" in cols:
        out["model"] = df["model"].astype(str)
    else:
        out["model"] = [f"N={p:.4g}" for p in out["params"]]
    for col in ("lr", "epochs", "budget_flops", "top1", "budget", "seed", "chance_loss", "params_without_head"):
        out[col] = _numeric(df, col) if col in cols else np.nan
    out["budget_kind"] = df["budget_kind"].fillna("").astype(str) if "budget_kind" in cols else ""
    # "branch": a cooldown branch of a trunk that the same model's other budgets share (design.py)
    out["role"] = df["role"].fillna("").astype(str) if "role" in cols else ""

    if "train_flops" in cols:
        out["train_flops"], source = _numeric(df, "train_flops"), "train_flops"
    elif "flops" in cols:
        out["train_flops"], source = _numeric(df, "flops"), "flops"
    elif "flops_per_image" in cols:
        out["train_flops"] = 3.0 * _numeric(df, "flops_per_image") * out["images_seen"]
        source = "3*flops_per_image*images_seen"
    else:
        out["train_flops"], source = 6.0 * out["params"] * out["images_seen"], "6*N*D"
        notes.append("no flops column: compute C = 6*N*D (params x data)")

    status = df["status"].astype(str).str.strip().str.lower() if "status" in cols else pd.Series("done", index=df.index)
    status_counts = {str(k): int(v) for k, v in status.value_counts().sort_index().items()}
    runs_per_family = {str(k): int(v) for k, v in out["family"].value_counts().sort_index().items()}
    excluded = sorted(s for s in status_counts if s != "done")
    if excluded:
        notes.append("excluded from fits: " + ", ".join(f"{status_counts[s]} {s}" for s in excluded))

    done = out[status == "done"]
    if len(done) == 0:
        raise UserError("no runs with status 'done' in the results table; nothing to fit (finish or rerun the sweep)")
    positive = ["params", "images_seen", "loss", "train_flops"]
    ok = np.all(np.isfinite(done[positive].to_numpy()) & (done[positive].to_numpy() > 0), axis=1)
    if not ok.all():
        notes.append(f"excluded {int((~ok).sum())} 'done' run(s) with missing or non-positive params/data/loss/flops")
        done = done[ok]
    if len(done) == 0:
        raise UserError("no 'done' run has positive params, data, loss and flops; check the table's values")
    if done["budget_flops"].notna().any() and done["budget_flops"].isna().any():
        notes.append("budget_flops is missing for some runs: treating the study as a grid (Pareto frontier)")
        done = done.assign(budget_flops=np.nan)
    return PreparedTable(
        done=done.reset_index(drop=True),
        diverged=out[status == "diverged"].reset_index(drop=True),
        n_runs=int(len(df)),
        status_counts=status_counts,
        runs_per_family=runs_per_family,
        compute_source=source,
        notes=notes,
    )


def flops_per_param_sample(done: pd.DataFrame) -> float:
    """k in C = k*N*D: median of train_flops / (params * images_seen) over the given runs.

    k is exactly 6 for dense transformers on tokens; for ConvNets the forward FLOPs per parameter
    depend on the resolution and the stage layout, so a single k is an approximation.
    """
    k = done["train_flops"] / (done["params"] * done["images_seen"])
    return float(np.median(k.to_numpy()))
