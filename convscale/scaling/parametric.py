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
from convscale.scaling.robust import (
    single_threaded_blas,
    DEFAULT_LEVEL,
    HUBER_DELTA,
    Estimate,
    bootstrap,
    estimate,
    huber,
    minimize_multistart,
    r2_log,
)

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
class ParametricFit:
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

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (v.to_dict() if isinstance(v := getattr(self, f.name), Estimate) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParametricFit":
        return cls(**{k: (Estimate.from_dict(v) if isinstance(v, dict) else v) for k, v in d.items()})


def _objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
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


def best_per_nd(runs: pd.DataFrame) -> pd.DataFrame:
    """The lowest-loss run for each distinct (params, images_seen)."""
    idx = runs.groupby(["params", "images_seen"])["loss"].idxmin()
    return runs.loc[idx.to_numpy()].reset_index(drop=True)


@single_threaded_blas
def fit_parametric(
    runs: pd.DataFrame,
    *,
    flops_per_param_sample: float,
    bootstrap_count: int = 200,
    rng: np.random.Generator | None = None,
    level: float = DEFAULT_LEVEL,
    delta: float = HUBER_DELTA,
) -> ParametricFit:
    """Fit L(N, D) to one family's done runs (columns params, images_seen, loss)."""
    pts = best_per_nd(runs)
    n_n, n_d = pts["params"].nunique(), pts["images_seen"].nunique()
    if len(pts) < MIN_POINTS or n_n < MIN_DISTINCT or n_d < MIN_DISTINCT:
        raise UserError(
            f"need >= {MIN_POINTS} distinct (params, data) runs with >= {MIN_DISTINCT} model sizes and "
            f">= {MIN_DISTINCT} data sizes for L(N, D); got {len(pts)} runs, {n_n} sizes, {n_d} data sizes"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    log_n = np.log(pts["params"].to_numpy(dtype=float))
    log_d = np.log(pts["images_seen"].to_numpy(dtype=float))
    log_l = np.log(pts["loss"].to_numpy(dtype=float))

    def solve(idx: np.ndarray, extra: np.ndarray | None, top: int) -> np.ndarray:
        inits = _screen_grid(log_n[idx], log_d[idx], log_l[idx], delta, top)
        if extra is not None:
            inits = np.vstack([extra, inits])
        theta, _ = minimize_multistart(
            _objective(log_n[idx], log_d[idx], log_l[idx], delta), inits, bounds=_BOUNDS, top_k=len(inits)
        )
        return theta

    hat = solve(np.arange(len(pts)), None, top=16)

    def refit(idx: np.ndarray) -> np.ndarray | None:
        if len(np.unique(log_n[idx])) < MIN_DISTINCT or len(np.unique(log_d[idx])) < MIN_DISTINCT:
            return None
        return solve(idx, hat, top=1)

    s = bootstrap(refit, len(pts), bootstrap_count, rng) if bootstrap_count > 0 else np.empty((0, 5))
    s = s if s.size else np.empty((0, 5))
    k = float(flops_per_param_sample)

    def derived(t: np.ndarray) -> np.ndarray:
        """(log G, n exponent, log n coef, d exponent, log d coef) from rows (e, a, b, alpha, beta)."""
        e, a, b, alpha, beta = (t[..., i] for i in range(5))
        log_g = (np.log(alpha) + a - np.log(beta) - b) / (alpha + beta)
        n_exp, d_exp = beta / (alpha + beta), alpha / (alpha + beta)
        # N_opt = G (C/k)^n_exp = (G k^-n_exp) C^n_exp ; D_opt = G^-1 (C/k)^d_exp
        return np.stack([log_g, n_exp, log_g - n_exp * np.log(k), d_exp, -log_g - d_exp * np.log(k)], axis=-1)

    dh, ds = derived(hat), derived(s)
    terms = np.stack([hat[1] - hat[3] * log_n, hat[2] - hat[4] * log_d, np.full_like(log_n, hat[0])])
    # A bootstrap refit at a parameter bound can put a coefficient past float range; exp then gives
    # inf, an "unbounded" interval end, which is the right answer and needs no warning.
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
            flops_per_param_sample=k,
            huber_delta=float(delta),
            r2_log=r2_log(log_l, logsumexp(terms, axis=0)),
            n_points=int(len(pts)),
            n_bootstrap=int(s.shape[0]),
        )
    return fit
