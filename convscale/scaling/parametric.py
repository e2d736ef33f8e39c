"""The parametric loss surface L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. approach 3).

Fitted as in Hoffmann et al. 2022 and the Epoch AI replication (Besiroglu et al. 2024): with
e = log E, a = log A, b = log B the model is
    log L = logsumexp(a - alpha log N, b - beta log D, e),
minimised under the Huber loss (delta 1e-3) on log-loss residuals by L-BFGS from a grid of
initialisations (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25});
intervals come from refits on resampled runs. N is ``params``, D is ``images_seen``; for each
distinct (N, D) only the best run over learning rates enters, since the law describes tuned runs.

Compute-optimal allocation. With C = k*N*D, minimise L over N at fixed C/k (D = (C/k)/N):
    dL/dN = -alpha A N^-(alpha+1) + beta B (C/k)^-beta N^(beta-1) = 0
    => N^(alpha+beta) = (alpha A / (beta B)) (C/k)^beta, hence
    N_opt(C) = G (C/k)^(beta/(alpha+beta)),   D_opt(C) = G^-1 (C/k)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from convscale.errors import UserError
from convscale.scaling.batch import huber_lm, multistart_lm
from convscale.scaling.robust import (
    single_threaded_blas,
    DEFAULT_LEVEL,
    HUBER_DELTA,
    Estimate,
    estimate,
    huber,
    r2_log,
)
from convscale.serde import Serde

MIN_POINTS = 8
MIN_DISTINCT = 3
_GRID = np.array(
    list(
        itertools.product(
            np.arange(-1.0, 1.01, 0.5),  # e
            np.arange(0.0, 25.1, 5.0),  # a
            np.arange(0.0, 25.1, 5.0),  # b
            np.arange(0.0, 2.01, 0.5),  # alpha
            np.arange(0.0, 2.01, 0.5),  # beta
        )
    )
)
# exponents are kept positive and below 5 (a decreasing law); e, a, b are free
_BOUNDS = [(None, None), (None, None), (None, None), (1e-4, 5.0), (1e-4, 5.0)]


@dataclasses.dataclass
class ParametricFit(Serde):
    """L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal allocation (see module doc).

    ``flops_per_param_sample`` is k in C = k*N*D, the median of train_flops/(params*images_seen).
    N_opt(C) = n_opt_coef * C^n_opt_exponent and D_opt(C) = d_opt_coef * C^d_opt_exponent, C in FLOPs.
    """

    E: Estimate
    A: Estimate
    B: Estimate
    alpha: Estimate
    beta: Estimate
    G: Estimate
    n_opt_coef: Estimate
    n_opt_exponent: Estimate  # beta / (alpha + beta)
    d_opt_coef: Estimate
    d_opt_exponent: Estimate  # alpha / (alpha + beta)
    flops_per_param_sample: float
    huber_delta: float
    r2_log: float
    n_points: int
    n_bootstrap: int
    #: how N_opt(C) and D_opt(C) were derived: the closed form (one k) or IsoFLOP slices of the
    #: surface with each model's own FLOPs per parameter per image
    allocation_method: str = "closed form, one k"

    def predict(self, params: Any, images_seen: Any) -> np.ndarray:
        n, d = np.asarray(params, dtype=float), np.asarray(images_seen, dtype=float)
        return self.E.value + self.A.value / n**self.alpha.value + self.B.value / d**self.beta.value

    def optimal_params(self, compute_flops: Any) -> np.ndarray:
        return self.n_opt_coef.value * np.asarray(compute_flops, dtype=float) ** self.n_opt_exponent.value

    def optimal_images(self, compute_flops: Any) -> np.ndarray:
        return self.d_opt_coef.value * np.asarray(compute_flops, dtype=float) ** self.d_opt_exponent.value

    def equation(self, digits: int = 3) -> str:
        g = f".{digits}g"
        return (
            f"L = {self.E.value:{g}} + {self.A.value:{g}}/N^{self.alpha.value:{g}}"
            f" + {self.B.value:{g}}/D^{self.beta.value:{g}}"
        )


def _objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """The Huber objective and its gradient for scipy (one fit at a time; benchmarks/fit_speed.py's reference)."""

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        e, a, b, alpha, beta = theta
        t_n, t_d = a - alpha * log_n, b - beta * log_d
        # logsumexp by hand: scipy's costs ~4x more, and this runs ~10^5 times per bootstrap
        m = np.maximum(np.maximum(t_n, t_d), e)
        w_n, w_d, w_e = np.exp(t_n - m), np.exp(t_d - m), np.exp(e - m)
        total = w_n + w_d + w_e
        pred = m + np.log(total)
        val, g = huber(pred - log_l, delta)
        g = g / total  # softmax weights times the Huber derivative
        grad = np.array([w_e @ g, w_n @ g, w_d @ g, -(w_n * log_n) @ g, -(w_d * log_d) @ g])
        return float(val.sum()), grad

    return fun


def _screen_grid(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float, top: int) -> np.ndarray:
    """The ``top`` grid points by objective value (vectorised, so the whole grid costs one pass)."""
    e, a, b, alpha, beta = (_GRID[:, i : i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    val, _ = huber(pred - log_l, delta)
    order = np.argsort(val.sum(axis=1), kind="stable")[:top]
    inits = _GRID[order].copy()
    inits[:, 3:] = np.clip(inits[:, 3:], 1e-3, None)  # inside the bounds
    return inits


def batch_model(log_n: np.ndarray, log_d: np.ndarray):
    """log L = logsumexp(a - alpha log N, b - beta log D, e) for ``batch.huber_lm`` (theta e, a, b, alpha, beta)."""

    def model(t: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, a, b, alpha, beta = (t[:, i : i + 1] for i in range(5))
        t_n, t_d = a - alpha * log_n, b - beta * log_d
        m = np.maximum(np.maximum(t_n, t_d), e)
        w_n, w_d, w_e = np.exp(t_n - m), np.exp(t_d - m), np.exp(e - m)
        total = w_n + w_d + w_e
        pred = m + np.log(total)
        w_n, w_d, w_e = w_n / total, w_d / total, w_e / total
        jac = np.stack([w_e, w_n, w_d, -w_n * log_n, -w_d * log_d], axis=2)
        return pred, jac

    return model


def best_per_nd(runs: pd.DataFrame) -> pd.DataFrame:
    """The lowest-loss run for each distinct (params, images_seen)."""
    idx = runs.groupby(["params", "images_seen"])["loss"].idxmin()
    return runs.loc[idx.to_numpy()].reset_index(drop=True)


def point_fit(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """The multi-start fit on all points: theta (e, a, b, alpha, beta), from the 16 best points of the
    Hoffmann-style grid, all starts refined at once."""
    inits = _screen_grid(log_n, log_d, log_l, delta, 16)
    return multistart_lm(batch_model(log_n, log_d), log_l, inits, delta=delta, bounds=_BOUNDS)


def replicate_fits(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, weights: np.ndarray,
                   theta_hat: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Refits of every replicate (weights (B, n), log-losses (n,) or (B, n)) warm-started at
    ``theta_hat``; NaN where a replicate has < 3 distinct sizes or data sizes."""
    w = np.asarray(weights, dtype=float)
    y = np.broadcast_to(np.asarray(log_l, dtype=float), w.shape)
    theta, _ = huber_lm(batch_model(log_n, log_d), y, w, theta_hat, delta=delta, bounds=_BOUNDS)
    present = w > 0
    n_n = np.array([len(np.unique(log_n[p])) for p in present])
    n_d = np.array([len(np.unique(log_d[p])) for p in present])
    theta[(n_n < MIN_DISTINCT) | (n_d < MIN_DISTINCT)] = np.nan
    return theta


def closed_form_allocation(t: np.ndarray, k: float) -> np.ndarray:
    """(log G, n exponent, log n coef, d exponent, log d coef) from rows (e, a, b, alpha, beta) with
    one k in C = k N D (see the module docstring)."""
    e, a, b, alpha, beta = (t[..., i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
        n_exp, d_exp = beta / (alpha + beta), alpha / (alpha + beta)
    # N_opt = G (C/k)^n_exp = (G k^-n_exp) C^n_exp ; D_opt = G^-1 (C/k)^d_exp
    return np.stack([log_g, n_exp, log_g - n_exp * np.log(k), d_exp, -log_g - d_exp * np.log(k)], axis=-1)


ISO_SLICES = 9  # compute values at which the surface is sliced
ISO_GRID = 401  # model sizes per slice
ISO_SPAN = 3.0  # slices search N within the family's sizes widened by this many e-folds each way


def iso_slice_allocation(t: np.ndarray, k_of_n, log_c: np.ndarray, log_n_range: tuple[float, float]) -> np.ndarray:
    """IsoFLOP slices of the surface with each model's own k(N): at each compute in ``log_c`` the N that
    minimises L(N, C / (k(N) N)); rows (log N_opt coef, N exponent, log D_opt coef, D exponent) of the
    log-log lines through the slices. NaN where a slice's minimum lies at the edge of the search."""
    t = np.atleast_2d(t)
    u = np.linspace(log_n_range[0] - ISO_SPAN, log_n_range[1] + ISO_SPAN, ISO_GRID)
    log_k = np.log(k_of_n(np.exp(u)))
    e, a, b, alpha, beta = (t[:, i, None, None] for i in range(5))
    log_dd = log_c[:, None] - log_k[None, :] - u[None, :]  # (n_c, n_grid)
    with np.errstate(over="ignore", invalid="ignore"):
        loss = np.exp(e) + np.exp(a - alpha * u[None, None, :]) + np.exp(b - beta * log_dd[None, :, :])
    loss = np.where(np.isfinite(loss), loss, np.inf)
    i = np.argmin(loss, axis=2)  # (B, n_c)
    edge = (i == 0) | (i == ISO_GRID - 1)
    ii = np.clip(i, 1, ISO_GRID - 2)
    take = lambda off: np.take_along_axis(loss, (ii + off)[..., None], axis=2)[..., 0]
    y0, y1, y2 = take(-1), take(0), take(1)
    h = u[1] - u[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = 0.5 * h * (y0 - y2) / (y0 - 2 * y1 + y2)
    u_opt = u[ii] + np.where(np.isfinite(shift), np.clip(shift, -h, h), 0.0)
    u_opt = np.where(edge, np.nan, u_opt)
    log_d_opt = log_c[None, :] - np.log(k_of_n(np.exp(np.where(edge, 0.0, u_opt)))) - u_opt
    x = log_c - log_c.mean()
    out = np.full((t.shape[0], 4), np.nan)
    ok = ~edge.any(axis=1)
    for col, yv in ((0, u_opt), (2, log_d_opt)):
        slope = ((yv - yv.mean(axis=1, keepdims=True)) @ x) / (x @ x)
        out[:, col + 1] = np.where(ok, slope, np.nan)
        out[:, col] = np.where(ok, yv.mean(axis=1) - slope * log_c.mean(), np.nan)
    return out


@single_threaded_blas
def parametric_from_replicates(
    points,
    reps,
    *,
    level: float = DEFAULT_LEVEL,
    delta: float = HUBER_DELTA,
    k_constant: float | None = None,
) -> tuple[ParametricFit, np.ndarray]:
    """L(N, D) on all points of a family (``design.Points``) and its replicate samples (rows e, a, b,
    alpha, beta). The compute-optimal allocation uses each model's own k(N) unless ``k_constant``."""
    from convscale.scaling.design import k_of_params

    n_pts = points.n
    n_n, n_d = len(np.unique(points.params)), len(np.unique(points.images))
    if n_pts < MIN_POINTS or n_n < MIN_DISTINCT or n_d < MIN_DISTINCT:
        raise UserError(
            f"need >= {MIN_POINTS} distinct (params, data) runs with >= {MIN_DISTINCT} model sizes and "
            f">= {MIN_DISTINCT} data sizes for L(N, D); got {n_pts} runs, {n_n} sizes, {n_d} data sizes"
        )
    log_n, log_d, log_l = np.log(points.params), np.log(points.images), np.log(points.loss)
    hat = point_fit(log_n, log_d, log_l, delta)
    if reps is not None and reps.weights.shape[0]:
        s = reps.recentre(replicate_fits(log_n, log_d, np.log(reps.loss), reps.weights, hat, delta), None)
    else:
        s = np.empty((0, 5))
    ks = points.flops_per_param_image
    k_med = float(np.median(ks)) if k_constant is None else float(k_constant)
    constant = k_constant is not None or float(ks.max() / ks.min()) < 1.01
    dh, ds = closed_form_allocation(hat, k_med), closed_form_allocation(s, k_med)
    alloc_method = "closed form, one k"
    if not constant:
        k_of_n = k_of_params(points)
        log_c = np.linspace(np.log(points.compute.min()), np.log(points.compute.max()), ISO_SLICES)
        rng_n = (float(log_n.min()), float(log_n.max()))
        ah, as_ = iso_slice_allocation(hat, k_of_n, log_c, rng_n)[0], iso_slice_allocation(s, k_of_n, log_c, rng_n)
        dh = np.array([dh[0], ah[1], ah[0], ah[3], ah[2]])
        ds = np.stack([ds[:, 0], as_[:, 1], as_[:, 0], as_[:, 3], as_[:, 2]], axis=1) if len(s) else ds
        alloc_method = "IsoFLOP slices with each model's k"
    terms = np.stack([hat[1] - hat[3] * log_n, hat[2] - hat[4] * log_d, np.full_like(log_n, hat[0])])
    with np.errstate(over="ignore"):
        fit = ParametricFit(
            E=estimate(np.exp(hat[0]), np.exp(s[:, 0]), level),
            A=estimate(np.exp(hat[1]), np.exp(s[:, 1]), level),
            B=estimate(np.exp(hat[2]), np.exp(s[:, 2]), level),
            alpha=estimate(hat[3], s[:, 3], level),
            beta=estimate(hat[4], s[:, 4], level),
            G=estimate(np.exp(dh[0]), np.exp(ds[:, 0]), level),
            n_opt_coef=estimate(np.exp(dh[2]), np.exp(ds[:, 2]), level),
            n_opt_exponent=estimate(dh[1], ds[:, 1], level),
            d_opt_coef=estimate(np.exp(dh[4]), np.exp(ds[:, 4]), level),
            d_opt_exponent=estimate(dh[3], ds[:, 3], level),
            flops_per_param_sample=k_med,
            huber_delta=float(delta),
            r2_log=r2_log(log_l, logsumexp(terms, axis=0)),
            n_points=int(n_pts),
            n_bootstrap=int(np.isfinite(s[:, 3]).sum()) if len(s) else 0,
            allocation_method=alloc_method,
        )
    return fit, s


def fit_parametric(
    runs: pd.DataFrame,
    *,
    flops_per_param_sample: float | None = None,
    bootstrap_count: int = 200,
    rng: np.random.Generator | None = None,
    level: float = DEFAULT_LEVEL,
    delta: float = HUBER_DELTA,
    design: str | None = None,
) -> ParametricFit:
    """Fit L(N, D) to one family's done runs (columns params, images_seen, loss; optional lr,
    train_flops, budget_flops). ``flops_per_param_sample``: one k for C = k N D (default: each
    model's own, from train_flops)."""
    from convscale.scaling.design import build_points, detect_design, with_optional_columns

    r = with_optional_columns(runs, flops_per_param_sample or 6.0)
    points = build_points(r, detect_design(r, design))
    rng = rng if rng is not None else np.random.default_rng(0)
    reps = points.replicates(bootstrap_count, rng) if bootstrap_count > 0 else None
    return parametric_from_replicates(points, reps, level=level, delta=delta, k_constant=flops_per_param_sample)[0]
