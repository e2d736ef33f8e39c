"""The Pareto frontier of loss vs compute: the best run (over lr and model) at each budget.

Runs are grouped into compute budgets in one of three ways, reported as the frontier ``method``:
- ``budget_flops``: the sweep's planned budget of every cell (all runs of a cell share it);
- ``flops_bins``: runs whose train_flops agree within 10% (an IsoFLOP design without the column),
  used only when every bin holds >= 2 runs;
- ``pareto``: otherwise (e.g. an N x D grid) the Pareto set over all runs: a run is on the
  frontier when no run with <= its compute reached a lower loss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FLOPS_BIN_RTOL = 0.10

FRONTIER_COLUMNS = (
    "compute_flops", "loss", "params", "images_seen", "train_flops", "lr", "epochs", "model", "top1", "runs_in_budget",
)


def budget_groups(runs: pd.DataFrame) -> tuple[pd.Series, str]:
    """Each run's budget (FLOPs; NaN in ``pareto`` mode) and the grouping method used."""
    if runs["budget_flops"].notna().all():
        return runs["budget_flops"].astype(float), "budget_flops"
    flops = runs["train_flops"].to_numpy(dtype=float)
    order = np.argsort(flops, kind="stable")
    labels = np.empty(len(flops), dtype=int)
    start, label = None, -1
    for i in order:
        if start is None or flops[i] > start * (1.0 + FLOPS_BIN_RTOL):
            start, label = flops[i], label + 1
        labels[i] = label
    counts = np.bincount(labels)
    if len(counts) >= 2 and counts.min() >= 2:
        # A bin's compute is the geometric mean of its runs' (they differ only by step rounding).
        log_mean = pd.Series(np.log(flops)).groupby(labels).transform("mean").to_numpy()
        return pd.Series(np.exp(log_mean), index=runs.index), "flops_bins"
    return pd.Series(np.nan, index=runs.index), "pareto"


def frontier(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Frontier rows of one family's done runs, sorted by compute, and the grouping method.

    ``compute_flops`` is the budget in the grouped modes and the run's train_flops in ``pareto``
    mode; ``runs_in_budget`` counts the runs that competed for the row.
    """
    budgets, method = budget_groups(runs)
    if method == "pareto":
        r = runs.assign(compute_flops=runs["train_flops"]).sort_values(["compute_flops", "loss"], kind="stable")
        best = r["loss"].cummin()
        # strictly below every cheaper run's loss (the first row always qualifies)
        keep = r["loss"].to_numpy() < np.concatenate([[np.inf], best.to_numpy()[:-1]])
        rows = r[keep].assign(runs_in_budget=1)
    else:
        r = runs.assign(compute_flops=budgets)
        idx = r.groupby("compute_flops")["loss"].idxmin()
        sizes = r.groupby("compute_flops").size()
        rows = r.loc[idx.to_numpy()].assign(runs_in_budget=sizes.loc[r.loc[idx.to_numpy(), "compute_flops"]].to_numpy())
    rows = rows.sort_values("compute_flops", kind="stable").reset_index(drop=True)
    return rows[list(FRONTIER_COLUMNS)], method


def frontier_records(rows: pd.DataFrame) -> list[dict]:
    """Frontier rows as JSON-able dicts (NaN -> None)."""
    out = []
    for rec in rows.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, (float, np.floating)):
                clean[k] = float(v) if np.isfinite(v) else None
            elif isinstance(v, (np.integer,)):
                clean[k] = int(v)
            else:
                clean[k] = v
        out.append(clean)
    return out
