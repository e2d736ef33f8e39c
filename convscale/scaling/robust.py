"""Robust fitting machinery shared by every fit: Huber loss, multi-start L-BFGS-B, bootstrap.

The recipe follows Hoffmann et al. 2022 (approach 3) as re-done by Besiroglu et al. 2024
("Chinchilla scaling: a replication attempt"): Huber loss with delta = 1e-3 on log-loss residuals,
L-BFGS from a grid of initialisations, and percentile bootstrap intervals from refits on resampled
points. The objective is divided by delta so that its scale is O(number of points): the replication
found the original fit stopped before converging because the loss scale made L-BFGS's tolerances
trivially met.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, TypeVar

import numpy as np
from scipy import optimize

from convscale.serde import Serde

HUBER_DELTA = 1e-3
DEFAULT_LEVEL = 0.95

# fun(theta) -> (value, gradient)
Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]
F = TypeVar("F", bound=Callable[..., Any])


def _blas_one_thread() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits  # ships with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def single_threaded_blas(fn: F) -> F:
    """Run ``fn`` with BLAS limited to one thread.

    L-BFGS-B calls BLAS on vectors of 2-5 numbers; a multi-threaded OpenBLAS spends 4x (idle
    machine) to 40x (machine busy with training runs) more CPU synchronising its threads than computing.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _blas_one_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Estimate(Serde):
    """A fitted parameter: point estimate on all data and its bootstrap (low, high) interval.

    The interval is NaN when no bootstrap was run (``bootstrap=0``) or every resample failed
    (written to JSON as null, read back as NaN).
    """

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return bool(self.low <= x <= self.high)


def estimate(value: float, samples: np.ndarray, level: float = DEFAULT_LEVEL) -> Estimate:
    """Point estimate plus the percentile interval of its bootstrap samples.

    A non-finite sample is a replicate that could not identify the quantity (too few distinct
    points, an optimum outside the sampled range). Such replicates are not dropped, which would
    narrow the interval to the well-behaved ones: half count as -inf and half as +inf, so a bound
    that they reach is unbounded (stored as NaN: no interval).
    """
    s = np.asarray(samples, dtype=float).ravel()
    if s.size == 0:
        return Estimate(float(value), float("nan"), float("nan"))
    bad = ~np.isfinite(s)
    if bad.any():
        s = s.copy()
        n_bad = int(bad.sum())
        s[np.flatnonzero(bad)] = np.where(np.arange(n_bad) % 2 == 0, -np.inf, np.inf)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(s, [tail, 100.0 - tail], method="linear") if not bad.any() else (
        np.quantile(s, tail / 100.0, method="inverted_cdf"), np.quantile(s, 1.0 - tail / 100.0, method="inverted_cdf"))
    lo = float(lo) if np.isfinite(lo) else float("nan")
    hi = float(hi) if np.isfinite(hi) else float("nan")
    return Estimate(float(value), lo, hi)


def studentized_estimate(value: float, samples: np.ndarray, n: int, p: int, per_stratum: float,
                         level: float = DEFAULT_LEVEL) -> Estimate:
    """value +- t(n - p) x the bootstrap standard error, corrected for the small-sample shrinkage of a
    pairs bootstrap: x sqrt(n / (n - p)) (as HC1 over HC0) and, when points were redrawn within strata
    of ``per_stratum`` points on average, x sqrt(m / (m - 1)).

    For regression coefficients fitted to a few dozen points the percentile interval of a pairs
    bootstrap is too narrow: on planted lr trends (36 lr optima, 3 coefficients) its 95 % interval
    covered the truth 85 % of the time; this one 93-95 % (benchmarks/calibration.py).
    """
    from scipy import stats

    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if s.size < 2 or n <= p:
        return Estimate(float(value), float("nan"), float("nan"))
    se = float(np.std(s, ddof=1)) * math.sqrt(n / (n - p))
    if per_stratum > 1:
        se *= math.sqrt(per_stratum / (per_stratum - 1))
    q = float(stats.t.ppf(0.5 + level / 2, n - p))
    return Estimate(float(value), float(value) - q * se, float(value) + q * se)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals ``r`` divided by ``delta`` (see module docstring), and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r / delta, a - 0.5 * delta)
    grad = np.clip(r / delta, -1.0, 1.0)
    return value, grad


def minimize_multistart(
    fun: Objective,
    inits: np.ndarray,
    *,
    bounds: list[tuple[float | None, float | None]] | None = None,
    top_k: int = 8,
) -> tuple[np.ndarray, float]:
    """L-BFGS-B from the ``top_k`` best of ``inits`` (rows) by objective value; best optimum wins.

    Screening the whole grid by value first keeps a 4500-point Hoffmann-style grid affordable
    while still starting the optimiser in every basin that looks promising.
    """
    inits = np.atleast_2d(np.asarray(inits, dtype=float))
    values = np.array([fun(x)[0] for x in inits])
    values = np.where(np.isfinite(values), values, np.inf)
    order = np.argsort(values, kind="stable")[: max(1, top_k)]
    best_x, best_f = inits[order[0]].copy(), float(values[order[0]])
    for i in order:
        res = optimize.minimize(
            fun,
            inits[i],
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-9},
        )
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = np.asarray(res.x, dtype=float), float(res.fun)
    return best_x, best_f


def bootstrap(
    refit: Callable[[np.ndarray], np.ndarray | None],
    n_points: int,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Refit on ``n_boot`` resamples (indices drawn with replacement); rows of successful refits.

    ``refit(idx)`` returns a parameter vector, or None when the resample cannot identify the model
    (e.g. too few distinct points); such draws are replaced, up to 3 x n_boot draws in all.
    """
    out: list[np.ndarray] = []
    draws = 0
    while len(out) < n_boot and draws < 3 * n_boot:
        draws += 1
        idx = rng.integers(0, n_points, size=n_points)
        theta = refit(idx)
        if theta is not None and np.all(np.isfinite(theta)):
            out.append(np.asarray(theta, dtype=float))
    if not out:
        return np.empty((0, 0))
    return np.vstack(out)


def r2_log(log_y: np.ndarray, log_pred: np.ndarray) -> float:
    """Coefficient of determination in log space (1 - SS_res / SS_tot)."""
    ss_tot = float(np.sum((log_y - log_y.mean()) ** 2))
    ss_res = float(np.sum((log_y - log_pred) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def ols(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients of y on the columns of x, or None if x is rank-deficient."""
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


def slope_sign(e: Estimate) -> str:
    """'decreasing' / 'increasing' when the whole interval is on one side of 0, else 'unclear'."""
    if math.isfinite(e.high) and e.high < 0:
        return "decreasing"
    if math.isfinite(e.low) and e.low > 0:
        return "increasing"
    return "unclear"
