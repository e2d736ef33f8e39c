"""The frontier power law of a family as the report uses it: curve, bootstrap band, inversion.

The band, the inversion's interval and the comparison's ratios come from the bootstrap samples
that ``convscale fit`` stored in ``fit.json`` (refits of the law on resampled runs): the report's
bands and the fit's intervals are the same draws.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from convscale.scaling import FamilyFit, PowerLawFit
from convscale.scaling.robust import estimate


@dataclasses.dataclass
class LawCurve:
    """A family's pure power law L = A*C^-a and its bootstrap samples (rows log A, a)."""

    family: str
    law: PowerLawFit
    samples: np.ndarray
    level: float

    def band(self, compute_flops: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise (low, high) percentile band of the law at ``compute_flops``; None without samples."""
        if self.samples.size == 0:
            return None
        lc = np.log(np.asarray(compute_flops, dtype=float))
        pred = np.exp(self.samples[:, :1] - self.samples[:, 1:2] * lc[None, :])
        tail = 100.0 * (1.0 - self.level) / 2.0
        lo, hi = np.percentile(pred, [tail, 100.0 - tail], axis=0)
        return lo, hi

    def compute_for_loss(self, loss: float) -> float:
        """C at which the fitted law reaches ``loss`` (C = (A/L)^(1/a))."""
        return compute_for_loss(self.law.A.value, self.law.a.value, loss)

    def compute_for_loss_interval(self, loss: float) -> tuple[float, float]:
        """Percentile interval of C(loss) over the bootstrap samples (NaN without samples)."""
        c = compute_samples(self, loss)
        if c.size == 0:
            return math.nan, math.nan
        e = estimate(math.nan, c, self.level)
        return e.low, e.high


def compute_for_loss(A: float, a: float, loss: float) -> float:
    """Inverse of L = A*C^-a; NaN when the law does not decrease."""
    if a <= 0 or loss <= 0 or A <= 0:
        return math.nan
    return float(math.exp((math.log(A) - math.log(loss)) / a))


def law_curve(fam: FamilyFit, level: float = 0.95) -> LawCurve | None:
    """The family's pure power law with its stored bootstrap samples, or None if it was not fitted."""
    if fam.power_law is None:
        return None
    samples = fam.sample_array("power_law")
    if samples.size:
        samples = samples[np.all(np.isfinite(samples), axis=1)]
    return LawCurve(family=fam.family, law=fam.power_law, samples=samples, level=level)


def compute_samples(lc: LawCurve, loss: float) -> np.ndarray:
    """C at which every bootstrap law reaches ``loss`` (NaN where a law does not decrease)."""
    if lc.samples.size == 0:
        return np.array([])
    a = lc.samples[:, 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(a > 0, np.exp((lc.samples[:, 0] - math.log(loss)) / a), np.nan)


def interpolate_compute(compute_flops: np.ndarray, values: np.ndarray, target: float, decreasing: bool = True) -> float:
    """The first compute where a frontier crosses ``target`` (log-log linear interpolation).

    ``decreasing``: the quantity falls with compute (loss); else it rises (accuracy). NaN when the
    frontier never reaches ``target`` (out of the measured range).
    """
    c = np.asarray(compute_flops, dtype=float)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(c) & np.isfinite(v) & (c > 0)
    c, v = c[ok], v[ok]
    order = np.argsort(c, kind="stable")
    c, v = c[order], v[order]
    s = v if decreasing else -v
    t = target if decreasing else -target
    for i in range(len(c)):
        if s[i] <= t:
            if i == 0:
                return float(c[0]) if s[0] == t else math.nan  # already below at the smallest budget
            # between i-1 (above target) and i (at or below): interpolate log C on the quantity
            if decreasing and v[i - 1] > 0 and v[i] > 0:
                x0, x1, y0, y1 = math.log(c[i - 1]), math.log(c[i]), math.log(v[i - 1]), math.log(v[i])
                frac = (y0 - math.log(target)) / (y0 - y1)
            else:
                x0, x1, y0, y1 = math.log(c[i - 1]), math.log(c[i]), s[i - 1], s[i]
                frac = (y0 - t) / (y0 - y1)
            return float(math.exp(x0 + frac * (x1 - x0)))
    return math.nan
