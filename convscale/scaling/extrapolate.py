"""Extrapolation check: refit the frontier power law without the largest budget and predict it."""

from __future__ import annotations

import dataclasses

import numpy as np

from convscale.errors import UserError
from convscale.scaling.batch import iid_weights
from convscale.scaling.powerlaw import FORM_IRREDUCIBLE, FORM_PURE, MIN_POINTS, power_law_from_replicates, predict_samples
from convscale.scaling.robust import DEFAULT_LEVEL, Estimate, estimate, single_threaded_blas
from convscale.serde import Serde


@dataclasses.dataclass
class ExtrapolationCheck(Serde):
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


def extrapolation_from_replicates(
    compute_flops: np.ndarray,
    log_loss_hat: np.ndarray,
    frontier_hat: np.ndarray,
    log_loss_rep: np.ndarray,
    frontier_rep: np.ndarray,
    *,
    irreducible: bool = False,
    level: float = DEFAULT_LEVEL,
    recentre=None,
) -> ExtrapolationCheck:
    """Hold out the frontier's largest compute, refit the law on the rest of the frontier (in every
    replicate too) and compare its prediction there with the measured frontier loss."""
    c = np.asarray(compute_flops, dtype=float)
    sel = np.asarray(frontier_hat, dtype=bool)
    form = FORM_IRREDUCIBLE if irreducible else FORM_PURE
    need = MIN_POINTS[form] + 1
    n_distinct = len(np.unique(c[sel]))
    if n_distinct < need:
        raise UserError(
            f"need >= {need} distinct compute budgets per family to check an {form} extrapolation; got {n_distinct}"
        )
    c_out = float(c[sel].max())
    top = c >= c_out
    fit, samples = power_law_from_replicates(
        c, log_loss_hat, sel & ~top, log_loss_rep, frontier_rep * ~top[None, :],
        irreducible=irreducible, level=level, recentre=recentre,
    )
    actual = float(np.exp(np.min(log_loss_hat[sel & top])))
    pred = float(fit.predict(c_out))
    return ExtrapolationCheck(
        form=form,
        held_out_compute_flops=c_out,
        predicted=estimate(pred, predict_samples(samples, c_out), level),
        actual_loss=actual,
        relative_error=(pred - actual) / actual,
        n_fit_points=int((sel & ~top).sum()),
        fit_compute_max_flops=float(c[sel & ~top].max()),
    )


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
    """The check on given frontier points (each one run, resampled with replacement)."""
    c = np.asarray(compute_flops, dtype=float)
    log_l = np.log(np.asarray(loss, dtype=float))
    rng = rng if rng is not None else np.random.default_rng(0)
    w = iid_weights(len(c), bootstrap_count, rng)
    return extrapolation_from_replicates(c, log_l, np.ones(len(c), dtype=bool), log_l, w,
                                         irreducible=irreducible, level=level)
