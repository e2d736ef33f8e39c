"""Compute-optimal model size N_opt(C), images D_opt(C) and the optimal learning-rate trend.

- ``frontier_runs`` (Hoffmann et al. 2022, approach 1): N and D of the frontier's runs, valid for
  every design (each frontier run is a compute-efficient allocation that was actually trained).
- ``parabola`` (approach 2, IsoFLOP designs only): per budget, a parabola of loss (best over lr)
  vs log N through >= 3 sizes; its vertex is N_opt, and D_opt = C / (k(N_opt) N_opt) with each
  model's own FLOPs per parameter per image k (interpolated between models).
- ``parametric`` (approach 3, every design): IsoFLOP slices of the fitted surface L(N, D), in
  ``parametric.py``.
Each is fitted as y = coef * C^exponent by least squares in log space. Intervals: every step (the
frontier, each budget's parabola, the lr optima) is recomputed on each replicate of resampled runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.scaling.batch import iid_weights, wls
from convscale.scaling.design import Points, Replicates, build_points, detect_design, lr_optimum_batch
from convscale.scaling.robust import DEFAULT_LEVEL, Estimate, estimate, single_threaded_blas, slope_sign, studentized_estimate
from convscale.serde import Serde

MIN_BUDGETS = 3
MIN_SIZES_PER_PARABOLA = 3
#: an IsoFLOP budget's parabola is a local one: a weighted least-squares parabola in log N whose
#: weights fall off with distance from its own vertex, (1 - |x|^3)^3 with x the distance in units of
#: VERTEX_HALF_WIDTH times the budget's median log-size spacing (tricube weights, as in loess), so a
#: size 1, 2 and 3 steps from the vertex weighs 0.93, 0.54 and 0.05. The centre starts at the budget's
#: best size and moves to the weighted parabola's vertex VERTEX_ITERATIONS times. A budget of <= 5
#: sizes keeps every size at weight 1. Why local: the loss along an IsoFLOP is not a parabola in log
#: N (A/N^a + B/D^b is skewed), so a parabola through sizes far from the optimum pulls the vertex
#: towards the middle of the ladder: with 7 sizes over 1.8 decades at every budget of a planted law,
#: the noise-free vertices gave an N_opt exponent of 0.489 for a true 0.5, and the 95 % interval
#: missed the truth 10-11 % of the time, all on one side (benchmarks/calibration.py --sizes 7); a
#: precise cooldown-branch study (trunk sd 0.01, run sd 0.002, 7 sizes) covered N_opt ~ C^0.75 58 %
#: of the time. Why smooth weights, not the best size +-2 used before: the hard window jumps with the
#: best size between replicates, and in cooldown-branch studies, where each model's curve is shifted
#: by its trunk's luck, that made the intervals 1.3-1.5x wider than these (RESULTS.md) at the same
#: coverage; at trunk sd 0.02 the equal-rate studies' "same rate" verdict went from "agrees" 1 of 20
#: with the window to 16 of 20.
VERTEX_HALF_WIDTH = 3.5
VERTEX_ITERATIONS = 4
ALL_SIZES_AT_MOST = 5


@dataclasses.dataclass
class AllocationFit(Serde):
    """quantity_opt(C) = coef * C^exponent; C in training FLOPs, quantity ``params`` or ``images_seen``."""

    quantity: str
    method: str  # "frontier_runs" | "parabola" | "parametric"
    coef: Estimate
    exponent: Estimate
    n_points: int
    points: list[dict[str, float]]  # {"compute_flops", "value"} the fit was made on

    def predict(self, compute_flops: Any) -> np.ndarray:
        return self.coef.value * np.asarray(compute_flops, dtype=float) ** self.exponent.value


def _loglog_line(log_c: np.ndarray, log_v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, 2) rows (log coef, exponent) of log v = log coef + exponent log C, weighted least squares
    (``log_v`` (n,) or (B, n)); NaN where a row has < 2 distinct C."""
    x_ref = float(np.mean(log_c))
    coef = wls(np.stack([np.ones_like(log_c), log_c - x_ref], axis=1), log_v, w)
    return np.stack([coef[:, 0] - coef[:, 1] * x_ref, coef[:, 1]], axis=1)


def allocation_fit(quantity: str, method: str, compute_flops: np.ndarray, values: np.ndarray,
                   samples: np.ndarray, level: float, recentre=None) -> tuple[AllocationFit, np.ndarray]:
    """An AllocationFit from the points of all data and replicate rows (log coef, exponent), and its
    bootstrap samples (``recentre(rows, hat)`` applied, see ``Replicates.recentre``)."""
    c, v = np.asarray(compute_flops, dtype=float), np.asarray(values, dtype=float)
    if len(np.unique(c)) < MIN_BUDGETS:
        raise UserError(
            f"need >= {MIN_BUDGETS} distinct compute budgets per family to fit optimal {quantity}; "
            f"got {len(np.unique(c))}"
        )
    hat = _loglog_line(np.log(c), np.log(v), np.ones((1, len(c))))[0]
    if recentre is not None and len(samples):
        samples = recentre(samples, hat)
    return AllocationFit(
        quantity=quantity,
        method=method,
        coef=estimate(np.exp(hat[0]), np.exp(samples[:, 0]) if samples.size else samples, level),
        exponent=estimate(hat[1], samples[:, 1] if samples.size else samples, level),
        n_points=int(len(c)),
        points=[{"compute_flops": float(a), "value": float(b)} for a, b in zip(c, v)],
    ), samples


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
    """quantity_opt = coef * C^exponent through given (C, value) points, each resampled as one run."""
    c, v = np.asarray(compute_flops, dtype=float), np.asarray(values, dtype=float)
    w = iid_weights(len(c), bootstrap_count, rng)
    s = _loglog_line(np.log(c), np.log(v), w) if len(w) else np.empty((0, 2))
    return allocation_fit(quantity, method, c, v, s, level)[0]


def frontier_run_samples(points: Points, frontier_rep: np.ndarray, log_values: np.ndarray) -> np.ndarray:
    """Replicate rows (log coef, exponent) of a quantity of the frontier runs against their compute."""
    return _loglog_line(np.log(points.compute), log_values, frontier_rep.astype(float))


def parabola_vertices(points: Points, weights: np.ndarray, loss: np.ndarray, k_of_n,
                      half_width: Optional[float] = VERTEX_HALF_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate and budget, log N_opt and log D_opt of the local parabola of loss vs log N
    (weighted by the draws, see ``VERTEX_HALF_WIDTH``; ``half_width`` None: through every size at
    weight 1); NaN where fewer than 3 sizes carry weight, the parabola is not convex or its vertex
    lies outside the budget's drawn sizes."""
    n_rep = weights.shape[0]
    budgets = np.unique(points.stratum)
    log_n_opt = np.full((n_rep, len(budgets)), np.nan)
    log_n = np.log(points.params)
    for bi, s in enumerate(budgets):
        idx = np.flatnonzero(points.stratum == s)
        if len(idx) < MIN_SIZES_PER_PARABOLA:
            continue
        idx = idx[np.argsort(log_n[idx], kind="stable")]
        u = log_n[idx]
        drawn = weights[:, idx]
        design = np.stack([np.ones_like(u), u, u * u], axis=1)
        # the vertex must lie inside the sizes swept at this budget (else the optimum is beyond them)
        lo = np.where(drawn > 0, u, np.inf).min(axis=1)
        hi = np.where(drawn > 0, u, -np.inf).max(axis=1)
        sizes = np.unique(u)
        if half_width is None or len(sizes) <= ALL_SIZES_AT_MOST:
            w = drawn
            coef = wls(design, loss[:, idx], w)
        else:
            w, coef = _local_parabola(design, u, drawn, loss[:, idx], lo, hi, half_width * float(np.median(np.diff(sizes))))
        n_sizes = np.array([len(np.unique(u[p])) for p in w > 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = -coef[:, 1] / (2 * coef[:, 2])
        ok = (n_sizes >= MIN_SIZES_PER_PARABOLA) & (coef[:, 2] > 0) & (vertex >= lo) & (vertex <= hi)
        log_n_opt[:, bi] = np.where(ok, vertex, np.nan)
    log_c = np.log(np.array([points.compute[points.stratum == s][0] for s in budgets]))
    with np.errstate(invalid="ignore"):
        log_d_opt = log_c[None, :] - np.log(k_of_n(np.exp(log_n_opt))) - log_n_opt
    return log_n_opt, log_d_opt


def _local_parabola(design: np.ndarray, u: np.ndarray, drawn: np.ndarray, loss: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the tricube weights (times the draws) and coefficients of the parabola re-centred on
    its own vertex (clipped to [lo, hi]; kept where a step's parabola is not convex), starting from
    the row's lowest-loss drawn size."""
    centre = u[np.argmin(np.where(drawn > 0, loss, np.inf), axis=1)]
    for _ in range(VERTEX_ITERATIONS):
        coef = wls(design, loss, drawn * _tricube(u, centre, radius))
        with np.errstate(divide="ignore", invalid="ignore"):
            vertex = -coef[:, 1] / (2 * coef[:, 2])
        move = np.isfinite(vertex) & (coef[:, 2] > 0)
        centre = np.where(move, np.clip(vertex, lo, hi), centre)
    w = drawn * _tricube(u, centre, radius)
    return w, wls(design, loss, w)


def _tricube(u: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    x = np.minimum(np.abs(u[None, :] - centre[:, None]) / radius, 1.0)
    return (1.0 - x ** 3) ** 3


def parabola_samples(log_c: np.ndarray, log_n_opt: np.ndarray, log_d_opt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replicate rows (log coef, exponent) for N_opt and D_opt from the budgets with a vertex; NaN
    where a replicate has vertices at < 3 budgets."""
    ok = np.isfinite(log_n_opt)
    w = ok.astype(float)
    n_s = _loglog_line(log_c, np.where(ok, log_n_opt, 0.0), w)
    d_s = _loglog_line(log_c, np.where(ok, log_d_opt, 0.0), w)
    few = ok.sum(axis=1) < MIN_BUDGETS
    n_s[few], d_s[few] = np.nan, np.nan
    return n_s, d_s


@dataclasses.dataclass
class LrTrendFit(Serde):
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


def lr_point_optima(points: Points) -> pd.DataFrame:
    """Best lr of every point swept at >= 2 learning rates (index ``point`` into ``points``).

    When the best grid lr is interior, ``lr_opt`` is the vertex of the parabola of log-loss vs log lr
    through it and its two neighbours (grids are coarse, factors of 2); at an edge it is the grid lr.
    A larger lr of the same point that diverged bounds the optimum from above: the best lr below it
    is then not at the edge.
    """
    rows = []
    for j in range(points.n):
        lrs = points.cell_lrs[j]
        if len(lrs) < 2 or not np.all(lrs > 0):
            continue
        v = points.cell_log_losses(j)
        order = np.argsort(lrs)
        i = int(np.argmin(v[order]))
        at_edge = i == 0 or (i == len(lrs) - 1 and not points.diverged_above[j])
        rows.append({
            "point": j,
            "model": points.model[j],
            "params": float(points.params[j]),
            "duration": float(points.duration[j]),
            "lr_opt": float(lr_optimum_batch(np.log(lrs), v[None, :])[0]),
            "lr_best_grid": float(lrs[order][i]),
            "loss": float(np.exp(v[order][i])),
            "at_edge": bool(at_edge),
        })
    return pd.DataFrame(rows, columns=["point", "model", "params", "duration", "lr_opt", "lr_best_grid", "loss", "at_edge"])


def lr_optima(runs: pd.DataFrame, duration_column: str | None = None, diverged: pd.DataFrame | None = None,
              design: str | None = None) -> pd.DataFrame:
    """``lr_point_optima`` of one family's done runs (canonical columns of ``prepare_table``)."""
    points = build_points(runs, detect_design(runs, design), diverged)
    return lr_point_optima(points).drop(columns="point")


def trunk_lr_samples(design: np.ndarray, log_lr: np.ndarray, hat: np.ndarray, group: np.ndarray, n_boot: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Replicate lr-trend coefficients (n_boot, p) of a cooldown-branch study: a residual bootstrap
    that redraws each model's mean residual as one value and the rest point by point.

    Every budget of a (model, lr) is a branch of one trunk, so a trunk's luck moves its model's lr
    optimum alike at all budgets: the optima carry as many independent values as there are models.
    Redrawn one point at a time within budgets, the lr slope vs size covered 77 % for a 95 %
    interval on planted IsoFLOP studies (6 models, 3 lrs per cell, trunk sd 0.05, run sd 0.005;
    benchmarks/calibration.py --trunk-noise); redrawing whole models (a pairs cluster bootstrap)
    covered 99 % at 3.4x the width, its few-cluster replicates' slopes heavy-tailed. Read with
    t(G - 2) and the bootstrap sd x sqrt(G / (G - 2)) (``studentized_estimate`` with n = G models)."""
    r = log_lr - design @ hat
    _, g = np.unique(group, return_inverse=True)
    n_groups, n = int(g.max()) + 1, len(r)
    means = np.bincount(g, weights=r, minlength=n_groups) / np.bincount(g, minlength=n_groups)
    rest = r - means[g]
    within = n - n_groups - (design.shape[1] - 2)  # the rest's dof: the duration slope is fitted within models
    rest = rest * np.sqrt(n / within) if within > 0 else np.zeros_like(rest)
    means = means - means.mean()
    y = (design @ hat)[None, :] + means[rng.integers(0, n_groups, size=(n_boot, n_groups))][:, g] \
        + rest[rng.integers(0, n, size=(n_boot, n))]
    return wls(design, y, np.ones((n_boot, n)))


def lr_trend_from_replicates(points: Points, reps: Replicates | None, level: float = DEFAULT_LEVEL
                             ) -> tuple[LrTrendFit, np.ndarray]:
    """The lr trend on all data and its replicate samples, rows (intercept, duration slope[, N slope])."""
    opt = lr_point_optima(points)
    duration_column = points.duration_column
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
    hat = wls(design, y, np.ones((1, len(y))))[0]
    if len(opt) <= design.shape[1] or not np.all(np.isfinite(hat)):
        raise UserError(
            f"need > {design.shape[1]} lr optima spanning several {duration_column} values to fit the lr trend; "
            f"got {len(opt)}"
        )
    idx = opt["point"].to_numpy()
    n, p = design.shape
    strata = points.stratum[idx]
    per_stratum = n / len(np.unique(strata)) if reps is not None and reps.lr_opt is None else 0.0
    # (a grid is one stratum of n points: its correction sqrt(n / (n - 1)) is small and kept)
    if reps is not None and reps.lr_groups is not None and reps.weights.shape[0]:
        n_boot = reps.weights.shape[0] - int(reps.centred)
        s = trunk_lr_samples(design, y, hat, reps.lr_groups[idx], n_boot, np.random.default_rng(reps.lr_seed))
        # the optima are as many independent values as models, fitted by an intercept and an N slope
        n, p, per_stratum = len(np.unique(reps.lr_groups[idx])), (2 if with_params else 1), 0.0
    elif reps is not None and reps.weights.shape[0]:
        w = (reps.lr_weights if reps.lr_weights is not None else reps.weights)[:, idx]
        y_rep = np.log(reps.lr_opt[:, idx]) if reps.lr_opt is not None else y
        s = reps.recentre(wls(design, y_rep, w), hat)
    else:
        s = np.empty((0, design.shape[1]))

    def est(j: int) -> Estimate:
        return studentized_estimate(hat[j], s[:, j], n, p, per_stratum, level)

    slope_d = est(1)
    slope_p = est(2) if with_params else None
    fit = LrTrendFit(
        duration_column=duration_column,
        intercept=est(0),
        slope_duration=slope_d,
        slope_params=slope_p,
        sign_duration=slope_sign(slope_d),
        sign_params=None if slope_p is None else slope_sign(slope_p),
        n_points=int(len(opt)),
        n_at_grid_edge=int(opt["at_edge"].sum()),
        points=opt.drop(columns="point").to_dict(orient="records"),
    )
    return fit, s


@single_threaded_blas
def fit_lr_trend(
    runs: pd.DataFrame,
    *,
    diverged: pd.DataFrame | None = None,
    bootstrap_count: int,
    rng: np.random.Generator,
    level: float = DEFAULT_LEVEL,
    design: str | None = None,
) -> LrTrendFit:
    """Fit the optimal-lr trend of one family's done runs (UserError if it cannot be identified)."""
    points = build_points(runs, detect_design(runs, design), diverged)
    reps = points.replicates(bootstrap_count, rng) if bootstrap_count > 0 else None
    return lr_trend_from_replicates(points, reps, level)[0]
