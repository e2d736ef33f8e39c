"""Many small robust fits at once: one per bootstrap replicate, solved together in numpy.

A scaling study's intervals need hundreds to thousands of refits of the same model to resampled
runs. Each refit here is a row of a batch: replicate ``b`` weights the study's points by ``w[b]``
(how often the resample drew each point; 0 = absent) and may carry its own responses ``y[b]``.

- ``huber_lm``: Levenberg-Marquardt on the Huber objective (iteratively reweighted: a residual
  beyond delta gets weight delta/|r|), every replicate with its own damping, warm-started (from the
  fit on all data). The objective of each row never increases.
- ``wls``: weighted least squares of every row at once (normal equations; rows that cannot
  identify the coefficients return NaN).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from convscale.scaling.robust import HUBER_DELTA

# model(theta (b, p), rows (b,)) -> (prediction (b, n), jacobian (b, n, p)); ``rows`` names the
# replicates that theta belongs to, for models whose inputs differ per replicate
BatchModel = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def huber_values(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta)


def huber_lm(
    model: BatchModel,
    y: np.ndarray,
    w: np.ndarray,
    theta0: np.ndarray,
    *,
    delta: float = HUBER_DELTA,
    bounds: Optional[Sequence[tuple[Optional[float], Optional[float]]]] = None,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum_i w[b, i] * huber(pred[b, i] - y[b, i]) for every row b; (theta, objective).

    ``y``: (n,) shared or (B, n); ``w``: (B, n) non-negative weights; ``theta0``: (p,) or (B, p).
    """
    w = np.asarray(w, dtype=float)
    n_rep = w.shape[0]
    y = np.broadcast_to(np.asarray(y, dtype=float), w.shape)
    theta = np.array(np.broadcast_to(np.asarray(theta0, dtype=float), (n_rep, np.shape(theta0)[-1])))
    p = theta.shape[1]
    lo = np.array([-np.inf if b is None or b[0] is None else b[0] for b in (bounds or [(None, None)] * p)])
    hi = np.array([np.inf if b is None or b[1] is None else b[1] for b in (bounds or [(None, None)] * p)])
    theta = np.clip(theta, lo, hi)

    f = _objective(model, theta, np.arange(n_rep), y, w, delta)
    lam = np.full(n_rep, 1e-3)
    active = np.isfinite(f)
    eye = np.eye(p)
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        t = theta[rows]
        pred, jac = model(t, rows)
        r = pred - y[rows]
        a = np.abs(r)
        h = w[rows] * np.where(a <= delta, 1.0, delta / np.maximum(a, 1e-300)) / delta
        jtj = np.einsum("bnp,bn,bnq->bpq", jac, h, jac)
        g = np.einsum("bnp,bn,bn->bp", jac, h, r)
        diag = np.einsum("bpp->bp", jtj)
        damp = jtj + (lam[rows, None, None] * (diag[:, :, None] + 1e-12)) * eye
        try:
            step = np.linalg.solve(damp, -g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.stack([_solve_or_zero(damp[i], -g[i]) for i in range(len(rows))])
        t_new = np.clip(t + step, lo, hi)
        f_new = _objective(model, t_new, rows, y, w, delta)
        better = f_new < f[rows]
        gain = np.where(better, f[rows] - f_new, 0.0)
        theta[rows[better]] = t_new[better]
        f[rows[better]] = f_new[better]
        lam[rows] = np.where(better, np.maximum(lam[rows] / 3.0, 1e-9), np.minimum(lam[rows] * 4.0, 1e12))
        small_step = np.max(np.abs(t_new - t), axis=1) < 1e-9
        converged = (better & (gain <= tol * (1.0 + f[rows]))) | (~better & (lam[rows] >= 1e12)) | small_step
        active[rows[converged]] = False
    return theta, f


def _objective(model: BatchModel, t: np.ndarray, rows: np.ndarray, y: np.ndarray, w: np.ndarray,
               delta: float) -> np.ndarray:
    pred, _ = model(t, rows)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.sum(w[rows] * huber_values(pred - y[rows], delta), axis=1)
    return np.where(np.isfinite(v), v, np.inf)


def _solve_or_zero(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.zeros_like(b)


def wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares of every row: coefficients (B, p) of y[b] ~ x[b] @ coef, weights w[b].

    ``x``: (n, p) shared or (B, n, p); ``y``: (n,) or (B, n). A row whose weighted design is
    rank-deficient (e.g. fewer distinct x than coefficients) gives NaN.
    """
    w = np.asarray(w, dtype=float)
    x = np.broadcast_to(np.asarray(x, dtype=float), (*w.shape, np.shape(x)[-1]))
    y = np.broadcast_to(np.asarray(y, dtype=float), w.shape)
    wz = np.where(w > 0, w, 0.0)
    xz = np.where(wz[..., None] > 0, x, 0.0)
    yz = np.where(wz > 0, y, 0.0)
    xtx = np.einsum("bnp,bn,bnq->bpq", xz, wz, xz)
    xty = np.einsum("bnp,bn,bn->bp", xz, wz, yz)
    p = xtx.shape[-1]
    # scale-free rank test: condition number of the normalised normal matrix
    d = np.sqrt(np.maximum(np.einsum("bpp->bp", xtx), 1e-300))
    norm = xtx / (d[:, :, None] * d[:, None, :])
    ok = np.linalg.cond(norm) < 1e10
    out = np.full((w.shape[0], p), np.nan)
    if ok.any():
        out[ok] = np.linalg.solve(xtx[ok], xty[ok][:, :, None])[:, :, 0]
    return out


def iid_weights(n_points: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_points) draw counts of a plain bootstrap of ``n_points`` points (each one run)."""
    w = np.zeros((max(n_boot, 0), n_points))
    if n_boot > 0:
        np.add.at(w, (np.arange(n_boot)[:, None], rng.integers(0, n_points, (n_boot, n_points))), 1.0)
    return w


def multistart_lm(model: BatchModel, y: np.ndarray, inits: np.ndarray, *, delta: float = HUBER_DELTA,
                  bounds: Optional[Sequence[tuple[Optional[float], Optional[float]]]] = None,
                  weights: Optional[np.ndarray] = None) -> np.ndarray:
    """The best of ``huber_lm`` runs from every row of ``inits`` on one data set (all starts at once)."""
    inits = np.atleast_2d(np.asarray(inits, dtype=float))
    n = np.shape(y)[-1]
    w = np.broadcast_to(np.ones(n) if weights is None else np.asarray(weights, dtype=float), (len(inits), n))
    theta, f = huber_lm(model, y, w, inits, delta=delta, bounds=bounds, max_iter=500, tol=1e-13)
    return theta[int(np.argmin(np.where(np.isfinite(f), f, np.inf)))]
