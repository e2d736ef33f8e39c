"""Power laws of frontier loss vs compute: L = A*C^-a and L = E + A*C^-a.

Both are fitted in log space with the Huber loss (delta 1e-3) on log L residuals; the saturating
form is written log L = logsumexp(log A - a log C, log E) so every term stays positive. Compute is
centred (C / C_ref, C_ref the geometric mean) while fitting, which decorrelates A from a; the
reported A is for C in raw FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from convscale.errors import UserError
from convscale.scaling.batch import huber_lm, iid_weights, multistart_lm, wls
from convscale.scaling.robust import (
    single_threaded_blas,
    DEFAULT_LEVEL,
    HUBER_DELTA,
    Estimate,
    estimate,
    r2_log,
)
from convscale.serde import Serde

FORM_PURE = "A*C^-a"
FORM_IRREDUCIBLE = "E + A*C^-a"
# A fit needs one point more than it has parameters; a bootstrap resample only as many as it has
# parameters, else with 3 budgets every accepted resample is the full set and the interval collapses.
MIN_POINTS = {FORM_PURE: 3, FORM_IRREDUCIBLE: 4}
N_PARAMS = {FORM_PURE: 2, FORM_IRREDUCIBLE: 3}


@dataclasses.dataclass
class PowerLawFit(Serde):
    """L(C) = E + A * C^-a with C in training FLOPs (E is None for the pure form A*C^-a)."""

    form: str
    A: Estimate
    a: Estimate
    E: Estimate | None
    r2_log: float
    n_points: int
    n_bootstrap: int  # successful bootstrap refits
    compute_min_flops: float
    compute_max_flops: float
    #: change of the local exponent a(C) across the frontier's compute range (pure form only):
    #: 0 for a straight line in log-log, > 0 when the frontier steepens, < 0 when it flattens
    curvature: Estimate | None = None

    def predict(self, compute_flops: Any) -> np.ndarray:
        c = np.asarray(compute_flops, dtype=float)
        e = 0.0 if self.E is None else self.E.value
        return e + self.A.value * c ** (-self.a.value)

    def equation(self, digits: int = 3) -> str:
        g = f".{digits}g"
        s = f"L = {self.A.value:{g}} * C^-{self.a.value:{g}}"
        return s if self.E is None else f"L = {self.E.value:{g}} + {self.A.value:{g}} * C^-{self.a.value:{g}}"



def _inits(x: np.ndarray, log_l: np.ndarray, irreducible: bool) -> np.ndarray:
    """Grid of starts; log A' of each start is set so the curve passes through the data's mean."""
    rows = []
    min_l = float(np.exp(log_l.min()))
    for a in (0.01, 0.03, 0.1, 0.3, 1.0):
        if not irreducible:
            rows.append([np.mean(log_l + a * x), a])
            continue
        for frac in (1e-3, 0.25, 0.5, 0.75, 0.9, 0.97):
            e = frac * min_l
            resid = np.log(np.maximum(np.exp(log_l) - e, 1e-12))
            rows.append([np.mean(resid + a * x), a, np.log(e)])
    return np.array(rows)


def batch_model(x: np.ndarray, irreducible: bool):
    """The law in log space for ``batch.huber_lm``: theta (log A', a[, log E]) at centred log C ``x``."""

    def model(t: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = t[:, :1] - t[:, 1:2] * x[None, :]
        if not irreducible:
            return u, np.stack([np.ones_like(u), -np.broadcast_to(x, u.shape)], axis=2)
        pred = np.logaddexp(u, t[:, 2:3])
        wgt = np.exp(u - pred)
        return pred, np.stack([wgt, -x[None, :] * wgt, 1.0 - wgt], axis=2)

    return model


def point_fit(x: np.ndarray, log_l: np.ndarray, irreducible: bool, delta: float = HUBER_DELTA) -> np.ndarray:
    """The multi-start fit on one set of points; theta (log A', a[, log E]) at centred ``x``."""
    bounds = [(None, None), (1e-6, 5.0), (None, None)] if irreducible else None
    return multistart_lm(batch_model(x, irreducible), log_l, _inits(x, log_l, irreducible), delta=delta,
                         bounds=bounds)


def replicate_fits(x: np.ndarray, log_l: np.ndarray, weights: np.ndarray, theta_hat: np.ndarray,
                   irreducible: bool, delta: float = HUBER_DELTA) -> np.ndarray:
    """Refits of every replicate (rows of ``weights``; ``log_l`` (n,) or (B, n)), warm-started at
    ``theta_hat``; a replicate with fewer distinct compute values than parameters is NaN."""
    form = FORM_IRREDUCIBLE if irreducible else FORM_PURE
    w = np.asarray(weights, dtype=float)
    y = np.broadcast_to(np.asarray(log_l, dtype=float), w.shape)
    bounds = [(None, None), (1e-6, 5.0), (None, None)] if irreducible else None
    theta, _ = huber_lm(batch_model(x, irreducible), np.where(w > 0, y, 0.0), w, theta_hat,
                        delta=delta, bounds=bounds)
    distinct = np.array([len(np.unique(x[row > 0])) for row in w])
    theta[distinct < N_PARAMS[form]] = np.nan
    return theta


def curvature_samples(x: np.ndarray, log_l: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Change of the local exponent a(C) = -dlogL/dlogC across the range of ``x``, from a quadratic
    in log-log fitted by least squares to every row (NaN with < 4 distinct compute values)."""
    w = np.asarray(weights, dtype=float)
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    coef = wls(design, log_l, w)
    distinct = np.array([len(np.unique(x[row > 0])) for row in w])
    coef[distinct < 4] = np.nan
    return -2.0 * coef[:, 2] * (x.max() - x.min())


@single_threaded_blas
def power_law_from_replicates(
    compute_flops: np.ndarray,
    log_loss_hat: np.ndarray,
    frontier_hat: np.ndarray,
    log_loss_rep: np.ndarray,
    frontier_rep: np.ndarray,
    *,
    irreducible: bool,
    level: float = DEFAULT_LEVEL,
    delta: float = HUBER_DELTA,
    recentre: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[PowerLawFit, np.ndarray]:
    """The law on the frontier of all data (``frontier_hat``, a mask over the points) and its
    interval from the frontiers of resampled runs (``frontier_rep`` (B, n), losses (B, n) or (n,)).
    ``recentre(samples, hat)`` turns replicate rows into bootstrap samples (``Replicates.recentre``).
    Returns the fit and its samples, rows (log A, a[, log E]) with C in raw FLOPs."""
    c = np.asarray(compute_flops, dtype=float)
    form = FORM_IRREDUCIBLE if irreducible else FORM_PURE
    sel = np.asarray(frontier_hat, dtype=bool)
    n_distinct = len(np.unique(c[sel]))
    if n_distinct < MIN_POINTS[form]:
        raise UserError(
            f"need >= {MIN_POINTS[form]} distinct compute budgets per family for an {form} power-law fit; "
            f"got {n_distinct} on the frontier"
        )
    x_ref = float(np.mean(np.log(c[sel])))
    x_all = np.log(c) - x_ref
    theta_hat = point_fit(x_all[sel], log_loss_hat[sel], irreducible, delta)
    if frontier_rep.shape[0]:
        theta = replicate_fits(x_all, log_loss_rep, frontier_rep, theta_hat, irreducible, delta)
        curv = curvature_samples(x_all, log_loss_rep, frontier_rep)
    else:
        theta, curv = np.empty((0, len(theta_hat))), np.empty(0)
    raw_hat = _to_raw(theta_hat, x_ref)
    samples = _to_raw(theta, x_ref) if theta.size else np.empty((0, len(theta_hat)))
    curv_hat = float(curvature_samples(x_all, log_loss_hat, sel[None, :].astype(float))[0])
    if recentre is not None and len(samples):
        samples = recentre(samples, raw_hat)
        curv = recentre(curv[:, None], np.array([curv_hat]))[:, 0]
    u = theta_hat[0] - theta_hat[1] * x_all[sel]
    log_pred = np.logaddexp(u, theta_hat[2]) if irreducible else u
    with np.errstate(over="ignore"):
        fit = PowerLawFit(
            form=form,
            A=estimate(np.exp(raw_hat[0]), np.exp(samples[:, 0]), level),
            a=estimate(raw_hat[1], samples[:, 1], level),
            E=estimate(np.exp(raw_hat[2]), np.exp(samples[:, 2]), level) if irreducible else None,
            r2_log=r2_log(log_loss_hat[sel], log_pred),
            n_points=int(sel.sum()),
            n_bootstrap=int(np.isfinite(samples[:, 1]).sum()) if samples.size else 0,
            compute_min_flops=float(c[sel].min()),
            compute_max_flops=float(c[sel].max()),
            curvature=estimate(curv_hat, curv, level) if not irreducible else None,
        )
    return fit, samples


def _to_raw(theta: np.ndarray, x_ref: float) -> np.ndarray:
    raw = np.array(theta, dtype=float, copy=True)
    raw[..., 0] = theta[..., 0] + theta[..., 1] * x_ref  # A' (C/C_ref)^-a = (A' C_ref^a) C^-a
    return raw


@single_threaded_blas
def fit_power_law_samples(
    compute_flops: np.ndarray,
    loss: np.ndarray,
    *,
    irreducible: bool = False,
    bootstrap_count: int = 200,
    rng: np.random.Generator | None = None,
    level: float = DEFAULT_LEVEL,
    delta: float = HUBER_DELTA,
) -> tuple[PowerLawFit, np.ndarray]:
    """The law through given points (each one run: they are resampled with replacement), and its
    bootstrap samples, rows (log A, a[, log E]) in raw FLOPs units."""
    c = np.asarray(compute_flops, dtype=float)
    log_l = np.log(np.asarray(loss, dtype=float))
    rng = rng if rng is not None else np.random.default_rng(0)
    weights = iid_weights(len(c), bootstrap_count, rng)
    return power_law_from_replicates(c, log_l, np.ones(len(c), dtype=bool), log_l, weights,
                                     irreducible=irreducible, level=level, delta=delta)


def fit_power_law(compute_flops: np.ndarray, loss: np.ndarray, **kwargs: Any) -> PowerLawFit:
    """Fit L = A*C^-a (``irreducible=False``) or L = E + A*C^-a with bootstrap intervals.

    Keyword arguments: ``irreducible``, ``bootstrap_count``, ``rng``, ``level``, ``delta``.
    Raises UserError when there are too few distinct compute values.
    """
    return fit_power_law_samples(compute_flops, loss, **kwargs)[0]


def predict_samples(samples: np.ndarray, compute_flops: float) -> np.ndarray:
    """Loss at ``compute_flops`` for every bootstrap sample row (log A, a[, log E])."""
    if samples.size == 0:
        return np.array([])
    lc = np.log(compute_flops)
    with np.errstate(over="ignore"):  # a refit at a bound may overflow: an unbounded prediction
        out = np.exp(samples[:, 0] - samples[:, 1] * lc)
        if samples.shape[1] == 3:
            out = out + np.exp(samples[:, 2])
    return out
