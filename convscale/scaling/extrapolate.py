"""Extrapolation check: refit the frontier power law without the largest budget and predict it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from convscale.errors import UserError
from convscale.scaling.powerlaw import MIN_POINTS, FORM_IRREDUCIBLE, FORM_PURE, fit_power_law_samples, predict_samples
from convscale.scaling.robust import DEFAULT_LEVEL, Estimate, estimate, single_threaded_blas


@dataclasses.dataclass
class ExtrapolationCheck:
    """Prediction of the largest budget's frontier loss from a fit on the smaller budgets.

    ``relative_error`` = (predicted - actual) / actual; ``predicted`` carries the bootstrap interval
    of the refit's prediction.
    """

    form: str
    held_out_compute_flops: float
    predicted: Estimate
    actual_loss: float
    relative_error: float
    n_fit_points: int
    fit_compute_max_flops: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["predicted"] = self.predicted.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtrapolationCheck":
        return cls(**{**d, "predicted": Estimate.from_dict(d["predicted"])})


@single_threaded_blas
def extrapolation_check(
    compute_flops: np.ndarray,
    loss: np.ndarray,
    *,
    irreducible: bool = False,
    bootstrap_count: int = 200,
    rng: np.random.Generator | None = None,
    level: float = DEFAULT_LEVEL,
) -> ExtrapolationCheck:
    """Hold out every point at the largest compute, refit on the rest, compare at that compute."""
    c = np.asarray(compute_flops, dtype=float)
    y = np.asarray(loss, dtype=float)
    form = FORM_IRREDUCIBLE if irreducible else FORM_PURE
    need = MIN_POINTS[form] + 1
    n_distinct = len(np.unique(c))
    if n_distinct < need:
        raise UserError(
            f"need >= {need} distinct compute budgets per family to check an {form} extrapolation; got {n_distinct}"
        )
    top = c == c.max()
    fit, samples = fit_power_law_samples(
        c[~top], y[~top], irreducible=irreducible, bootstrap_count=bootstrap_count, rng=rng, level=level
    )
    c_out = float(c.max())
    actual = float(np.min(y[top]))  # the frontier's loss there (one row per budget on a frontier)
    pred = float(fit.predict(c_out))
    return ExtrapolationCheck(
        form=form,
        held_out_compute_flops=c_out,
        predicted=estimate(pred, predict_samples(samples, c_out), level),
        actual_loss=actual,
        relative_error=(pred - actual) / actual,
        n_fit_points=int((~top).sum()),
        fit_compute_max_flops=float(c[~top].max()),
    )
