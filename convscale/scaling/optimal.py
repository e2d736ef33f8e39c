"""Compute-optimal model size N_opt(C), images D_opt(C) and the optimal learning-rate trend.

- ``best_run`` (Hoffmann et al. 2022, approach 1): N and D of the frontier's best run per budget.
- ``parabola`` (approach 2): per budget with >= 3 model sizes, a parabola of loss (best over lr)
  vs log N; its vertex is N_opt, and D_opt = C / (k * N_opt) with k from the table.
Both are then fitted as y = coef * C^exponent by least squares in log space, with bootstrap
intervals from resampled budgets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.scaling.robust import (
    DEFAULT_LEVEL,
    Estimate,
    bootstrap,
    estimate,
    ols,
    single_threaded_blas,
    slope_sign,
)

MIN_BUDGETS = 3
MIN_SIZES_PER_PARABOLA = 3


@dataclasses.dataclass
class AllocationFit:
    """quantity_opt(C) = coef * C^exponent; C in training FLOPs, quantity ``params`` or ``images_seen``."""

    quantity: str
    method: str  # "best_run" | "parabola"
    coef: Estimate
    exponent: Estimate
    n_points: int
    points: list[dict[str, float]]  # {"compute_flops", "value"} the fit was made on

    def predict(self, compute_flops: Any) -> np.ndarray:
        return self.coef.value * np.asarray(compute_flops, dtype=float) ** self.exponent.value

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["coef"], d["exponent"] = self.coef.to_dict(), self.exponent.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AllocationFit":
        return cls(**{**d, "coef": Estimate.from_dict(d["coef"]), "exponent": Estimate.from_dict(d["exponent"])})


@single_threaded_blas
def fit_allocation(
    compute_flops: np.ndarray,
    values: np.ndarray,
    *,
    quantity: str,
    method: str,
    bootstrap_count: int,
    rng: np.random.Generator,
    level: float = DEFAULT_LEVEL,
) -> AllocationFit:
    """Least-squares fit of log value = log coef + exponent * log C, bootstrap over points."""
    c = np.asarray(compute_flops, dtype=float)
    v = np.asarray(values, dtype=float)
    n_distinct = len(np.unique(c))
    if n_distinct < MIN_BUDGETS:
        raise UserError(
            f"need >= {MIN_BUDGETS} distinct compute budgets per family to fit optimal {quantity}; got {n_distinct}"
        )
    x_ref = float(np.mean(np.log(c)))
    design = np.column_stack([np.ones_like(c), np.log(c) - x_ref])
    y = np.log(v)

    def solve(idx: np.ndarray) -> np.ndarray | None:
        # a resample needs only 2 distinct budgets to define a line (ols returns None below that)
        coef = ols(design[idx], y[idx])
        if coef is None:
            return None
        return np.array([coef[0] - coef[1] * x_ref, coef[1]])  # raw log coef, exponent

    hat = solve(np.arange(len(c)))
    assert hat is not None  # >= 3 distinct C make the design full-rank
    s = bootstrap(solve, len(c), bootstrap_count, rng) if bootstrap_count > 0 else np.empty((0, 2))
    s = s if s.size else np.empty((0, 2))
    return AllocationFit(
        quantity=quantity,
        method=method,
        coef=estimate(np.exp(hat[0]), np.exp(s[:, 0]), level),
        exponent=estimate(hat[1], s[:, 1], level),
        n_points=int(len(c)),
        points=[{"compute_flops": float(a), "value": float(b)} for a, b in zip(c, v)],
    )


def isoflop_optima(runs: pd.DataFrame, budgets: pd.Series, k_flops_per_param_sample: float) -> pd.DataFrame:
    """Approach 2: per budget, the vertex of a parabola of loss vs log N (best loss per N).

    Budgets with < 3 sizes, a non-convex parabola or a vertex outside the sampled sizes (the
    optimum was not bracketed) are dropped. Columns: compute_flops, params_opt, images_opt, n_sizes.
    """
    rows = []
    r = runs.assign(_budget=budgets.to_numpy())
    for budget, g in r.dropna(subset=["_budget"]).groupby("_budget"):
        best = g.groupby("params")["loss"].min()
        if len(best) < MIN_SIZES_PER_PARABOLA:
            continue
        u = np.log(best.index.to_numpy(dtype=float))
        c2, c1, _ = np.polyfit(u, best.to_numpy(), 2)
        if c2 <= 0:
            continue
        u_opt = -c1 / (2 * c2)
        if not (u.min() <= u_opt <= u.max()):
            continue
        n_opt = float(np.exp(u_opt))
        rows.append(
            {
                "compute_flops": float(budget),
                "params_opt": n_opt,
                "images_opt": float(budget) / (k_flops_per_param_sample * n_opt),
                "n_sizes": int(len(best)),
            }
        )
    return pd.DataFrame(rows, columns=["compute_flops", "params_opt", "images_opt", "n_sizes"])


@dataclasses.dataclass
class LrTrendFit:
    """log lr_opt = intercept + slope_duration * log duration (+ slope_params * log N).

    ``duration_column`` is ``epochs`` when the table has it, else ``images_seen``. Signs are
    'decreasing' / 'increasing' when the whole interval lies on one side of 0, else 'unclear'.
    """

    duration_column: str
    intercept: Estimate
    slope_duration: Estimate
    slope_params: Estimate | None
    sign_duration: str
    sign_params: str | None
    n_points: int
    n_at_grid_edge: int  # optima at the edge of their lr grid (the true optimum may lie beyond)
    points: list[dict[str, Any]]  # model, params, duration, lr_opt, lr_best_grid, loss, at_edge

    def predict(self, duration: Any, params: Any = None) -> np.ndarray:
        log_lr = self.intercept.value + self.slope_duration.value * np.log(np.asarray(duration, dtype=float))
        if self.slope_params is not None:
            log_lr = log_lr + self.slope_params.value * np.log(np.asarray(params, dtype=float))
        return np.exp(log_lr)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("intercept", "slope_duration", "slope_params"):
            d[k] = None if getattr(self, k) is None else getattr(self, k).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LrTrendFit":
        kw = dict(d)
        for k in ("intercept", "slope_duration", "slope_params"):
            kw[k] = None if d.get(k) is None else Estimate.from_dict(d[k])
        return cls(**kw)


def _diverged_lrs(diverged: pd.DataFrame | None, model: Any, group: pd.DataFrame) -> set[float]:
    """Learning rates of ``model`` that diverged in the same budget as ``group`` (a diverged run
    stops early, so its own duration is not its planned one: match by budget_flops)."""
    if diverged is None or len(diverged) == 0 or "budget_flops" not in diverged:
        return set()
    budgets = set(group["budget_flops"].dropna().tolist())
    d = diverged[(diverged["model"] == model) & diverged["budget_flops"].isin(budgets)]
    return {float(x) for x in d["lr"].dropna() if x > 0}


def lr_optima(runs: pd.DataFrame, duration_column: str, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Best lr per (model, duration) among groups with >= 2 distinct lrs.

    When the best grid lr is interior, ``lr_opt`` is the vertex of the parabola of loss vs log lr
    through it and its two neighbours (grids are coarse, factors of 2); at an edge it is the grid lr.
    A larger lr of the same cell grid that diverged bounds the optimum from above: the best done lr
    below it is then not at the edge (``diverged``: the family's diverged runs, matched by model
    and budget_flops).
    """
    rows = []
    r = runs.dropna(subset=["lr", duration_column])
    r = r[r["lr"] > 0]
    for (model, dur), g in r.groupby(["model", duration_column]):
        per_lr = g.groupby("lr")["loss"].min().sort_index()
        if len(per_lr) < 2:
            continue
        u, loss = np.log(per_lr.index.to_numpy(dtype=float)), per_lr.to_numpy()
        i = int(np.argmin(loss))
        bounded_above = any(lr > per_lr.index[-1] for lr in _diverged_lrs(diverged, model, g))
        at_edge = i == 0 or (i == len(u) - 1 and not bounded_above)
        u_opt = u[i]
        if 0 < i < len(u) - 1:  # interior: refine with the parabola through the neighbours
            c2, c1, _ = np.polyfit(u[i - 1 : i + 2], loss[i - 1 : i + 2], 2)
            if c2 > 0:
                u_opt = float(np.clip(-c1 / (2 * c2), u[i - 1], u[i + 1]))
        rows.append(
            {
                "model": str(model),
                "params": float(g["params"].iloc[0]),
                "duration": float(dur),
                "lr_opt": float(np.exp(u_opt)),
                "lr_best_grid": float(np.exp(u[i])),
                "loss": float(loss[i]),
                "at_edge": bool(at_edge),
            }
        )
    return pd.DataFrame(rows, columns=["model", "params", "duration", "lr_opt", "lr_best_grid", "loss", "at_edge"])


@single_threaded_blas
def fit_lr_trend(
    runs: pd.DataFrame,
    *,
    diverged: pd.DataFrame | None = None,
    bootstrap_count: int,
    rng: np.random.Generator,
    level: float = DEFAULT_LEVEL,
) -> LrTrendFit:
    """Fit the optimal-lr trend of one family's done runs (UserError if it cannot be identified)."""
    duration_column = "epochs" if runs["epochs"].notna().any() else "images_seen"
    opt = lr_optima(runs, duration_column, diverged)
    if len(opt) == 0:
        raise UserError("no (model, duration) cell has >= 2 learning rates; sweep lr to fit the optimal-lr trend")
    n_durations = opt["duration"].nunique()
    if n_durations < 2:
        raise UserError(
            f"need >= 2 distinct {duration_column} values with an lr sweep to fit the lr trend; got {n_durations}"
        )
    with_params = opt["params"].nunique() >= 2
    cols = [np.ones(len(opt)), np.log(opt["duration"].to_numpy())]
    if with_params:
        cols.append(np.log(opt["params"].to_numpy()))
    design = np.column_stack(cols)
    y = np.log(opt["lr_opt"].to_numpy())
    if len(opt) <= design.shape[1] or ols(design, y) is None:
        raise UserError(
            f"need > {design.shape[1]} lr optima spanning several {duration_column} values to fit the lr trend; "
            f"got {len(opt)}"
        )
    hat = ols(design, y)
    s = bootstrap(lambda idx: ols(design[idx], y[idx]), len(y), bootstrap_count, rng) if bootstrap_count > 0 else None
    s = s if s is not None and s.size else np.empty((0, design.shape[1]))
    slope_d = estimate(hat[1], s[:, 1], level)
    slope_p = estimate(hat[2], s[:, 2], level) if with_params else None
    return LrTrendFit(
        duration_column=duration_column,
        intercept=estimate(hat[0], s[:, 0], level),
        slope_duration=slope_d,
        slope_params=slope_p,
        sign_duration=slope_sign(slope_d),
        sign_params=None if slope_p is None else slope_sign(slope_p),
        n_points=int(len(opt)),
        n_at_grid_edge=int(opt["at_edge"].sum()),
        points=opt.to_dict(orient="records"),
    )
