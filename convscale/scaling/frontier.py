"""The compute-efficient frontier of a family's runs, for each study design.

- ``budget``: the study planned IsoFLOP budgets; the frontier is the best point (run tuned over
  lr) of each budget, at the budget's compute.
- ``pareto``: every other design (epoch or image budgets, N x D grids, tables from anywhere): the
  Pareto set of all points, a point being on the frontier when no point with at most its compute
  reached a lower loss; each at its own training compute.

``frontier_mask`` computes the frontier of every bootstrap replicate at once (weights 0 = absent).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from convscale.scaling.design import ISOFLOP, Points

METHOD_BUDGET, METHOD_PARETO = "budget", "pareto"
METHOD_TEXT = {
    METHOD_BUDGET: "the best run of each planned IsoFLOP budget",
    METHOD_PARETO: "the Pareto set of all runs (no run with at most its compute reached a lower loss)",
}

FRONTIER_COLUMNS = (
    "compute_flops", "loss", "params", "images_seen", "train_flops", "lr", "epochs", "model", "top1", "runs_in_budget",
    "seeds", "seed_loss_min", "seed_loss_max",
)


def frontier_method(design: str) -> str:
    return METHOD_BUDGET if design == ISOFLOP else METHOD_PARETO


COMPUTE_RTOL = 0.01  # runs whose compute differs by less than this are at the same compute


def compute_groups(compute: np.ndarray) -> np.ndarray:
    """Group labels, in increasing compute, of values within COMPUTE_RTOL of their group's first."""
    order = np.argsort(compute, kind="stable")
    labels = np.empty(len(compute), dtype=int)
    label, start = -1, None
    for i in order:
        if start is None or compute[i] > start * (1 + COMPUTE_RTOL):
            label, start = label + 1, compute[i]
        labels[i] = label
    return labels


def frontier_mask(points: Points, weights: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(B, n) bool: which present points are on each replicate's frontier."""
    present = weights > 0
    masked = np.where(present, loss, np.inf)
    out = np.zeros_like(present)
    if points.design == ISOFLOP:
        for s in np.unique(points.stratum):
            idx = np.flatnonzero(points.stratum == s)
            best = idx[np.argmin(masked[:, idx], axis=1)]
            out[np.arange(len(best)), best] = True
        return out & present
    # Pareto: group equal compute (within COMPUTE_RTOL: step rounding, or a grid whose N and D steps
    # cancel), then strictly below every cheaper group's best
    inv = compute_groups(points.compute)
    uc = np.arange(inv.max() + 1)
    group_min = np.full((masked.shape[0], len(uc)), np.inf)
    for gi in range(len(uc)):
        group_min[:, gi] = masked[:, inv == gi].min(axis=1)
    prev = np.concatenate([np.full((masked.shape[0], 1), np.inf),
                           np.minimum.accumulate(group_min, axis=1)[:, :-1]], axis=1)
    out = present & (masked <= group_min[:, inv]) & (masked < prev[:, inv])
    # one point per tied group: the first of the tied minima
    for gi in np.flatnonzero(np.bincount(inv) > 1):
        idx = np.flatnonzero(inv == gi)
        sub = out[:, idx]
        first = np.argmax(sub, axis=1)
        keep = np.zeros_like(sub)
        keep[np.arange(len(first)), first] = sub[np.arange(len(first)), first]
        out[:, idx] = keep
    return out


MIN_INTERIOR_POINTS = 4  # below this many interior frontier points the laws use the whole frontier


def interior_points(points: Points) -> np.ndarray:
    """Points whose run is inside the swept ranges: not the smallest or largest model of their budget
    (IsoFLOP) or of the family, and, on a grid, not the smallest or largest data size. A frontier run
    at an edge only bounds the compute-optimal envelope (the optimum may lie beyond the sweep), so
    the laws of the frontier leave such points out when enough others remain."""
    log_n = np.log(points.params)
    inside = np.ones(points.n, dtype=bool)
    if points.design == ISOFLOP:
        for s in np.unique(points.stratum):
            idx = np.flatnonzero(points.stratum == s)
            inside[idx] = (log_n[idx] > log_n[idx].min()) & (log_n[idx] < log_n[idx].max())
        return inside
    log_d = np.log(points.images)
    tol = 0.005
    inside &= (log_n > log_n.min() + tol) & (log_n < log_n.max() - tol)
    inside &= (log_d > log_d.min() + tol) & (log_d < log_d.max() - tol)
    return inside


def frontier_table(points: Points, runs: pd.DataFrame) -> pd.DataFrame:
    """The frontier of all data as rows (FRONTIER_COLUMNS), sorted by compute; each row names the
    run of its point with the lowest loss (its lr, top-1) and how many runs competed for it. With
    seeds, the point's loss is its best lr's seed mean (design.Points) and the row's run is the
    best seed of that lr; ``seeds``, ``seed_loss_min`` and ``seed_loss_max`` give that lr's spread
    (one seed: min = max = loss)."""
    mask = frontier_mask(points, np.ones((1, points.n)), points.loss[None, :])[0]
    rows = []
    for j in np.flatnonzero(mask):
        sel = (runs["model"].astype(str) == points.model[j]) & np.isclose(runs["images_seen"], points.images[j],
                                                                          rtol=0.006)
        if points.design == ISOFLOP:
            sel &= np.isclose(runs["budget_flops"], points.budget[j], rtol=1e-9)
            competing = int(points.n_runs[points.stratum == points.stratum[j]].sum())
        else:
            competing = int(points.n_runs[points.compute <= points.compute[j]].sum())
        best_cell = int(np.argmin(points.cell_log_losses(j)))
        best_lr, seed_losses = points.cell_lrs[j][best_cell], points.cell_runs[j][best_cell]
        if best_lr > 0:  # -1: runs without an lr
            sel &= np.isclose(runs["lr"].astype(float), best_lr, rtol=1e-9)
        g = runs[sel]
        best = g.loc[g["loss"].idxmin()] if len(g) else None
        rows.append({
            "compute_flops": float(points.compute[j]),
            "loss": float(points.loss[j]),
            "params": float(points.params[j]),
            "images_seen": float(points.images[j]),
            "train_flops": float(best["train_flops"]) if best is not None else float(points.compute[j]),
            "lr": float(best["lr"]) if best is not None else np.nan,
            "epochs": float(best["epochs"]) if best is not None else np.nan,
            "model": points.model[j],
            "top1": float(best["top1"]) if best is not None else np.nan,
            "runs_in_budget": competing,
            "seeds": len(seed_losses),
            "seed_loss_min": float(np.min(seed_losses)),
            "seed_loss_max": float(np.max(seed_losses)),
        })
    df = pd.DataFrame(rows, columns=list(FRONTIER_COLUMNS))
    return df.sort_values("compute_flops", kind="stable").reset_index(drop=True)


def frontier(runs: pd.DataFrame, design: str | None = None) -> tuple[pd.DataFrame, str]:
    """Frontier rows of one family's done runs (canonical columns) and the method used."""
    from convscale.scaling.design import build_points, detect_design, with_optional_columns

    runs = with_optional_columns(runs)
    design = detect_design(runs, design)
    points = build_points(runs, design)
    return frontier_table(points, runs), frontier_method(design)


def frontiers_by_family(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frontier rows of each family of a results table (its done runs; UserError if it has none)."""
    from convscale.scaling.table import prepare_table

    done = prepare_table(results).done
    return {str(name): frontier(g.reset_index(drop=True))[0] for name, g in done.groupby("family", sort=True)}


def frontier_records(rows: pd.DataFrame) -> list[dict]:
    """Frontier rows as JSON-able dicts (NaN -> None)."""
    from convscale.scaling.robust import json_clean

    return json_clean(rows.to_dict(orient="records"))
