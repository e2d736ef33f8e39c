"""Power laws of frontier loss vs compute: L = A*C^-a and L = E + A*C^-a.

Both are fitted in log space with the Huber loss (delta 1e-3) on log L residuals; the saturating
form is written log L = logsumexp(log A - a log C, log E) so every term stays positive. Compute is
centred (C / C_ref, C_ref the geometric mean) while fitting, which decorrelates A from a; the
reported A is for C in raw FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

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

FORM_PURE = "A*C^-a"
FORM_IRREDUCIBLE = "E + A*C^-a"
# A fit needs one point more than it has parameters; a bootstrap resample only as many as it has
# parameters, else with 3 budgets every accepted resample is the full set and the interval collapses.
MIN_POINTS = {FORM_PURE: 3, FORM_IRREDUCIBLE: 4}
N_PARAMS = {FORM_PURE: 2, FORM_IRREDUCIBLE: 3}


@dataclasses.dataclass
class PowerLawFit:
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

    def predict(self, compute_flops: Any) -> np.ndarray:
        c = np.asarray(compute_flops, dtype=float)
        e = 0.0 if self.E is None else self.E.value
        return e + self.A.value * c ** (-self.a.value)

    def equation(self, digits: int = 3) -> str:
        g = f".{digits}g"
        s = f"L = {self.A.value:{g}} * C^-{self.a.value:{g}}"
        return s if self.E is None else f"L = {self.E.value:{g}} + {self.A.value:{g}} * C^-{self.a.value:{g}}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("A", "a", "E"):
            d[k] = None if getattr(self, k) is None else getattr(self, k).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PowerLawFit":
        kw = dict(d)
        for k in ("A", "a", "E"):
            kw[k] = None if d.get(k) is None else Estimate.from_dict(d[k])
        return cls(**kw)


def _objective(x: np.ndarray, log_l: np.ndarray, irreducible: bool, delta: float):
    """Huber objective on log-loss residuals; theta = (log A', a[, log E]) with centred x."""

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        u = theta[0] - theta[1] * x
        if irreducible:
            pred = np.logaddexp(u, theta[2])
            w = np.exp(u - pred)  # d pred / d u
            dpred = np.stack([w, -x * w, 1.0 - w])
        else:
            pred = u
            dpred = np.stack([np.ones_like(x), -x])
        val, g = huber(pred - log_l, delta)
        return float(val.sum()), dpred @ g

    return fun


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
    """The fit plus its bootstrap samples, rows (log A, a[, log E]) in raw FLOPs units."""
    c = np.asarray(compute_flops, dtype=float)
    log_l = np.log(np.asarray(loss, dtype=float))
    form = FORM_IRREDUCIBLE if irreducible else FORM_PURE
    need = MIN_POINTS[form]
    n_distinct = len(np.unique(c))
    if n_distinct < need:
        raise UserError(
            f"need >= {need} distinct compute budgets per family for an {form} power-law fit; got {n_distinct}"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    x_ref = float(np.mean(np.log(c)))
    x_all = np.log(c) - x_ref
    bounds = [(None, None), (1e-6, 5.0), (None, None)] if irreducible else None

    def solve(idx: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        x, y = x_all[idx], log_l[idx]
        inits = _inits(x, y, irreducible)
        if extra is not None:
            inits = np.vstack([extra, inits])
        theta, _ = minimize_multistart(_objective(x, y, irreducible, delta), inits, bounds=bounds, top_k=4)
        return theta

    def to_raw(theta: np.ndarray) -> np.ndarray:
        raw = theta.copy()
        raw[0] = theta[0] + theta[1] * x_ref  # A' (C/C_ref)^-a = (A' C_ref^a) C^-a
        return raw

    theta_hat = solve(np.arange(len(c)))

    def refit(idx: np.ndarray) -> np.ndarray | None:
        if len(np.unique(c[idx])) < N_PARAMS[form]:
            return None
        return to_raw(solve(idx, extra=theta_hat))

    samples = bootstrap(refit, len(c), bootstrap_count, rng) if bootstrap_count > 0 else np.empty((0, 0))
    raw_hat = to_raw(theta_hat)
    col = (lambda j: samples[:, j]) if samples.size else (lambda j: np.array([]))
    u = theta_hat[0] - theta_hat[1] * x_all
    log_pred = np.logaddexp(u, theta_hat[2]) if irreducible else u
    fit = PowerLawFit(
        form=form,
        A=estimate(np.exp(raw_hat[0]), np.exp(col(0)), level),
        a=estimate(raw_hat[1], col(1), level),
        E=estimate(np.exp(raw_hat[2]), np.exp(col(2)), level) if irreducible else None,
        r2_log=r2_log(log_l, log_pred),
        n_points=int(len(c)),
        n_bootstrap=int(samples.shape[0]) if samples.size else 0,
        compute_min_flops=float(c.min()),
        compute_max_flops=float(c.max()),
    )
    return fit, samples


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
    out = np.exp(samples[:, 0] - samples[:, 1] * lc)
    if samples.shape[1] == 3:
        out = out + np.exp(samples[:, 2])
    return out
