"""The paper's findings, each set against what this study measured, with a verdict.

Smith et al. 2023 (Smith et al. 2023, §2, Figs 1-3 and the discussion) report three scaling findings and one comparison:
(1) held-out loss falls as a power law of compute along the frontier;
(2) the compute-optimal model size and epoch budget both grow with compute, at about the same rate;
(3) the optimal learning rate falls as the epoch budget grows, and with model size;
(4) at equal pre-training compute, NFNets match ViTs (after fine-tuning).

A verdict is ``agrees``, ``disagrees`` or ``cannot tell``, decided by fixed rules on the fitted
estimates and their bootstrap intervals (stated in each finding's ``why``), never by how the
result looks. The rules:

- an effect is *measured* only when its whole interval lies on one side of 0; an interval across 0
  is ``cannot tell``;
- "the same" and "a match" are equivalence tests (TOST-style, at the fit's interval level): the
  interval of the *difference* must lie inside a margin stated here in advance (``agrees``), wholly
  outside it (``disagrees``), else ``cannot tell``. Overlap of two intervals shows nothing;
- a power law: the change of the frontier's local exponent across the measured compute range (a
  quadratic term in log-log, with its interval) within +-50% of the exponent (the local exponent
  within +-25 % of a across the range); >= 4 frontier points inside the sweep needed;
- "at the same rate": N_opt exponent - D_opt exponent within +-0.2 (Hoffmann et al.'s 0.49 vs 0.51
  pass; Kaplan et al.'s 0.73 vs 0.27, a gap of 0.46, does not);
- "match" before fine-tuning: the ratio of the compute the two families need to reach a loss within
  a factor of 2 (the paper's match: 110k vs 120k TPU-v4 core hours); after fine-tuning, top-1 within
  1 percentage point (90.4 % vs 90.2 %), the Welch t interval of the difference of the families'
  mean top-1 over >= 2 fine-tunes each (replicates.py); one fine-tune per family leaves the
  run-to-run spread unmeasured: ``cannot tell``, whatever its held-out images alone would say;
- an optimum at the edge of the grid it was searched on (the smallest or largest model at a
  budget, the smallest or largest learning rate) is a bound, not a measurement: when most optima
  sit there, the trend is ``cannot tell`` and the fix (widen the grid) is said;
- runs that learned nothing tell nothing: a family whose frontier has fewer than 3 points clearly
  below chance loss (5 % under ln(classes)), or a fine-tune whose top-1 interval reaches chance,
  is ``cannot tell``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import pandas as pd

from convscale.report.compare import PREFERRED_PAIR, Comparison, as_comparisons
from convscale.report.inputs import SweepInputs
from convscale.report.replicates import ReplicateGroup, mean_interval, replicate_group, welch_difference
from convscale.scaling import Estimate
from convscale.scaling.robust import estimate
from convscale.serde import Serde

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"
# |change of the local exponent across the range| / exponent still "a power law": the local exponent
# stays within +-25 % of a over the measured range (the paper judged "a clear linear trend" by eye)
CURVATURE_MARGIN = 0.5
MIN_CURVATURE_BUDGETS = 4  # a quadratic term needs >= 4 frontier points
SAME_RATE_MARGIN = 0.2  # |exponent of N_opt - exponent of D_opt| still "the same rate"
COMPUTE_RATIO_MARGIN = 2.0  # compute to reach a loss within this factor: "a match"
TOP1_MARGIN = 0.01  # fine-tuned top-1 within 1 percentage point: "a match"
CHANCE_GAP = 0.05  # a frontier point "learned" when its loss is >= 5% under chance
MIN_LEARNED_POINTS = 3
MAX_EDGE_SHARE = 0.5  # more optima than this at the edge of their grid: the trend cannot be told
WILSON_Z = 1.959964  # 95% two-sided normal quantile, for intervals of an accuracy

PAPER = {
    "power_law": "Held-out loss falls as a power law of compute along the frontier (a straight line "
                 "in log-log; [A] Fig. 2, no exponent reported).",
    "allocation": "The compute-optimal model size and epoch budget both grow with compute, at about the "
                  "same rate ([A] §2: 'scale the model size and the number of training epochs at the "
                  "same rate'; no exponents reported).",
    "lr_duration": "The optimal learning rate falls as the epoch budget grows ([A] Fig. 3).",
    "lr_size": "The optimal learning rate falls as the model grows ([A] Fig. 3).",
    "families": "At equal compute, NFNets match ViTs ([A] Fig. 1: after ImageNet fine-tuning, NFNet-F7+ "
                "90.4% vs ViT-g/14 90.2% at similar TPU-v4 core hours).",
}

#: one-line names of the findings, for terminal summaries
SHORT = {
    "power_law": "(1) loss is a power law of compute",
    "allocation": "(2) optimal size and epochs grow alike",
    "lr_duration": "(3) optimal lr falls with epochs",
    "lr_size": "(3) optimal lr falls with size",
    "families": "(4) NFNets match ViTs",
}


@dataclasses.dataclass
class Finding(Serde):
    key: str  # one of PAPER's keys
    family: str  # a family, or "nfnet vs vit"
    paper: str
    measured: str
    verdict: str  # AGREES | DISAGREES | CANNOT_TELL
    why: str


def _g(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{0.0 if abs(x) < 1e-10 else x:.{digits}g}"


def _iv(e: Estimate) -> str:
    return f"{_g(e.value)} [{_g(e.low)}, {_g(e.high)}]" if _has_interval(e) else f"{_g(e.value)} (no interval)"


def _has_interval(e: Estimate) -> bool:
    return math.isfinite(e.low) and math.isfinite(e.high)


def _side(e: Estimate) -> Optional[int]:
    """+1 / -1 when the whole interval is above / below 0, 0 when it spans 0, None without one."""
    if not _has_interval(e):
        return None
    return 1 if e.low > 0 else -1 if e.high < 0 else 0


def wilson_interval(p: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0 or not math.isfinite(p):
        return math.nan, math.nan
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# --- (1) power law -------------------------------------------------------------------------------

def equivalence(e: Estimate, margin: float) -> Optional[str]:
    """AGREES when the interval of a difference ``e`` lies inside [-margin, margin], DISAGREES when
    wholly outside it, CANNOT_TELL otherwise; None without an interval."""
    if not _has_interval(e):
        return None
    if -margin <= e.low and e.high <= margin:
        return AGREES
    if e.low > margin or e.high < -margin:
        return DISAGREES
    return CANNOT_TELL


def learned(fit: Any) -> tuple[bool, str]:
    """Whether the family's frontier left chance: >= 3 frontier points 5% under ln(classes)."""
    chance = getattr(fit, "chance_loss", None)
    if chance is None or not math.isfinite(chance):
        return True, ""
    losses = [float(r["loss"]) for r in fit.frontier if r.get("loss") is not None]
    n_ok = sum(v <= (1 - CHANCE_GAP) * chance for v in losses)
    if n_ok >= MIN_LEARNED_POINTS:
        return True, ""
    return False, (f"only {n_ok} of {len(losses)} frontier points are {100 * CHANCE_GAP:.0f}% under chance loss "
                   f"{_g(chance, 4)} (runs that learned nothing tell nothing: train longer or larger)")


def _scope(p: Any) -> str:
    span = math.log10(p.compute_max_flops / p.compute_min_flops) if p.compute_min_flops > 0 else 0.0
    return f" ({p.n_points} frontier points over {span:.2g} decade{'' if round(span, 2) == 1 else 's'})"


def power_law_verdict(fit: Any) -> tuple[str, str]:
    """Finding (1)'s verdict and its reason, from the frontier law's exponent and curvature."""
    p = fit.power_law
    if p is None:
        return CANNOT_TELL, fit.skipped.get("power_law", "not fitted")
    ok, why = learned(fit)
    if not ok:
        return CANNOT_TELL, why
    side = _side(p.a)
    if side is None:
        return CANNOT_TELL, ("no bootstrap interval for a (run the fit with --bootstrap > 0)" if not p.n_bootstrap else
                             "the exponent a is not identified in enough bootstrap resamples (resampled frontiers "
                             "with too few distinct budgets): add budgets" + _scope(p))
    if side == 0:
        return CANNOT_TELL, "the interval of the exponent a includes 0: the loss is not shown to fall" + _scope(p)
    if side < 0:
        return DISAGREES, "the loss rises with compute along the frontier (a < 0 with its whole interval)" + _scope(p)
    curv = p.curvature
    interior = getattr(fit, "frontier_interior_points", None)
    if interior is not None and getattr(fit, "frontier_law_points", "interior") == "all":
        return CANNOT_TELL, (f"the loss falls (a > 0 with its whole interval), but only {interior} of "
                             f"{len(fit.frontier)} frontier runs lie inside the swept sizes"
                             + (" and data sizes" if fit.frontier_method == "pareto" else "")
                             + f" (need >= {MIN_CURVATURE_BUDGETS}): runs at the edge only bound the "
                             "compute-optimal envelope, so its shape is not measured (widen the ladder)")
    if p.n_points < MIN_CURVATURE_BUDGETS or curv is None:
        return CANNOT_TELL, (f"the loss falls (a > 0 with its whole interval), but a straight line is not testable "
                             f"on {p.n_points} frontier points (need >= {MIN_CURVATURE_BUDGETS})")
    margin = CURVATURE_MARGIN * abs(p.a.value)
    v = equivalence(curv, margin)
    where = (f"the local exponent changes by {_iv(curv)} across the range (margin ±{_g(margin)}, "
             f"{100 * CURVATURE_MARGIN:.0f}% of a)")
    if v is None and not p.n_bootstrap:
        return CANNOT_TELL, "no bootstrap interval for the curvature (run the fit with --bootstrap > 0)"
    if v is None:
        return CANNOT_TELL, (f"the loss falls (a > 0 with its whole interval), but the curvature is not identified in "
                             f"enough bootstrap resamples: with {p.n_points} frontier points, resampled frontiers "
                             f"often keep fewer than {MIN_CURVATURE_BUDGETS} distinct budgets, too few for a quadratic "
                             f"term (add budgets, or sizes that put more frontier runs inside the ladder)" + _scope(p))
    if v == AGREES:
        return AGREES, f"a > 0 with its whole interval, and {where}" + _scope(p)
    if v == DISAGREES:
        shape = "steepens" if curv.value > 0 else "flattens (as when the loss nears an irreducible floor)"
        return DISAGREES, f"the loss falls, but it is not a straight line in log-log: it {shape}; {where}" + _scope(p)
    return CANNOT_TELL, f"the loss falls, but the data cannot tell a straight line from a bent one: {where}" + _scope(p)


def power_law_finding(family: str, fit: Any) -> Finding:
    p, pe = fit.power_law, fit.power_law_irreducible
    if p is None:
        return Finding("power_law", family, PAPER["power_law"], "no power law fitted",
                       CANNOT_TELL, fit.skipped.get("power_law", "not fitted"))
    measured = (f"L = A·C^-a with a = {_iv(p.a)} on {p.n_points} frontier points "
                f"({'best run per budget' if fit.frontier_method == 'budget' else 'Pareto set of all runs'}"
                + ("; runs at the edge of the swept sizes or data left out: they only bound the envelope"
                   if getattr(fit, "frontier_law_points", "all") == "interior" else "") + ")")
    if p.curvature is not None:
        measured += f"; change of the local exponent across the range {_iv(p.curvature)}"
    measured += f"; R² (log) {p.r2_log:.3f}"
    if pe is not None:
        measured += f"; with an irreducible term E = {_iv(pe.E)}, a = {_iv(pe.a)}"
    x = fit.extrapolation
    if x is not None:
        inside = x.predicted.low <= x.actual_loss <= x.predicted.high if _has_interval(x.predicted) else None
        measured += (f"; fitted without the largest budget it predicts {_g(x.predicted.value, 4)} there, "
                     f"measured {_g(x.actual_loss, 4)} ({100 * x.relative_error:+.1f}%"
                     + ("" if inside is None else ", inside the interval" if inside else ", outside the interval") + ")")
    bend = local_exponents(fit.frontier)
    if bend is not None:
        (c0, c1, a_low), (c2, c3, a_high) = bend
        measured += (f"; local exponent a = {a_low:.3g} over {c0:.2g}-{c1:.2g} FLOPs, "
                     f"{a_high:.3g} over {c2:.2g}-{c3:.2g}")
    verdict, why = power_law_verdict(fit)
    return Finding("power_law", family, PAPER["power_law"], measured, verdict, why)


def local_exponents(frontier: list[dict[str, Any]]) -> Optional[tuple[tuple[float, float, float], ...]]:
    """The frontier's power-law exponent a (of L = A·C^-a) fitted by least squares in log-log on its
    lower and its upper half of budgets, as ((C_min, C_max, a), (C_min, C_max, a)); the halves share
    the middle budget when their number is odd. None below 4 budgets (a half needs >= 2 points)."""
    pts = sorted((float(r["compute_flops"]), float(r["loss"])) for r in frontier
                 if r.get("loss") is not None and float(r["loss"]) > 0 and float(r["compute_flops"]) > 0)
    if len(pts) < 4:
        return None
    half = (len(pts) + 1) // 2

    def exponent(part: list[tuple[float, float]]) -> tuple[float, float, float]:
        x = [math.log(c) for c, _ in part]
        y = [math.log(v) for _, v in part]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        return part[0][0], part[-1][0], -slope

    return exponent(pts[:half]), exponent(pts[-half:])


# --- (2) compute-optimal allocation ----------------------------------------------------------------

def size_edges(results: pd.DataFrame, family: str) -> tuple[int, int, str]:
    """(budgets whose best done run is the smallest or largest model that ran there, budgets with
    >= 2 sizes, a note naming where the edges were). Budgets come from ``budget_flops``."""
    done = results[(results["family"] == family) & (results["status"] == "done")].dropna(subset=["loss"])
    if "budget_flops" not in done or done["budget_flops"].isna().all():
        return 0, 0, ""
    n_edge, n_budgets, small, large = 0, 0, 0, 0
    for _, g in done.groupby("budget_flops"):
        best = g.groupby("params")["loss"].min()
        if len(best) < 2:
            continue
        n_budgets += 1
        n_best = best.idxmin()
        if n_best == best.index.min():
            n_edge, small = n_edge + 1, small + 1
        elif n_best == best.index.max():
            n_edge, large = n_edge + 1, large + 1
    parts = [f"the smallest size at {small}"] * bool(small) + [f"the largest size at {large}"] * bool(large)
    return n_edge, n_budgets, " and ".join(parts)


def difference_samples(fit: Any, method: str) -> Optional[Estimate]:
    """The interval of (N_opt exponent - D_opt exponent) from the same resamples of runs."""
    _, n_fit, d_fit = fit.allocation()
    if n_fit is None or d_fit is None:
        return None
    n_s, d_s = fit.sample_array(f"optimal_params_{method}"), fit.sample_array(f"optimal_images_{method}")
    diff = n_fit.exponent.value - d_fit.exponent.value
    if len(n_s) == 0 or len(n_s) != len(d_s):
        return Estimate(diff, math.nan, math.nan)
    return estimate(diff, n_s[:, 1] - d_s[:, 1], getattr(fit, "level", 0.95))


def allocation_verdict(fit: Any, results: Optional[pd.DataFrame] = None) -> tuple[str, str]:
    """Finding (2)'s verdict: both exponents > 0 and their difference within ±SAME_RATE_MARGIN."""
    method, n_fit, d_fit = fit.allocation()
    if n_fit is None or d_fit is None:
        reason = next((fit.skipped[k] for k in (f"optimal_params_{method}", "optimal_params_frontier_runs")
                       if k in fit.skipped), "not fitted")
        return CANNOT_TELL, reason
    ok, why = learned(fit)
    if not ok:
        return CANNOT_TELL, why
    if results is not None:  # whatever the method: an optimum beyond the swept sizes is extrapolated
        n_edge, n_budgets, where = size_edges(results, fit.family)
        if n_budgets and n_edge / n_budgets > MAX_EDGE_SHARE:
            return CANNOT_TELL, (f"the best model was {where} of {n_budgets} budgets: the optimum lies outside the "
                                 "swept sizes there, so its growth is not measured (sweep "
                                 f"{' and '.join(w for w, k in (('smaller', 'smallest'), ('larger', 'largest')) if k in where)} "
                                 "models)")
    sn, sd = _side(n_fit.exponent), _side(d_fit.exponent)
    if sn is None or sd is None:
        return CANNOT_TELL, ("no bootstrap interval for the exponents (run the fit with --bootstrap > 0, or the "
                             "optimum was not identified in too many resamples)")
    if sn < 0 or sd < 0:
        which = " and ".join(w for w, s in (("model size", sn), ("images", sd)) if s < 0)
        return DISAGREES, f"the compute-optimal {which} shrinks with compute (whole interval below 0)"
    if sn == 0 or sd == 0:
        which = " and ".join(w for w, s in (("model size", sn), ("images", sd)) if s == 0)
        return CANNOT_TELL, f"the interval of the {which} exponent includes 0: its growth is not resolved"
    diff = difference_samples(fit, method)
    v = equivalence(diff, SAME_RATE_MARGIN) if diff is not None else None
    text = f"N_opt exponent - D_opt exponent = {_iv(diff)} (margin ±{SAME_RATE_MARGIN:g})" if diff is not None else ""
    if v is None:
        return CANNOT_TELL, "no interval for the difference of the exponents"
    if v == AGREES:
        return AGREES, f"both grow (whole intervals > 0) and {text}: the same rate"
    if v == DISAGREES:
        faster = "model size" if diff.value > 0 else "images"
        return DISAGREES, f"both grow, but {text} lies outside the margin: {faster} grows faster"
    return CANNOT_TELL, f"both grow, but {text} reaches past the margin: the data cannot tell equal rates from unequal"


def allocation_finding(family: str, fit: Any, results: pd.DataFrame) -> Finding:
    from convscale.scaling.fit import ALLOCATION_TEXT

    method, n_fit, d_fit = fit.allocation()
    if n_fit is None or d_fit is None:
        return Finding("allocation", family, PAPER["allocation"], "no allocation fitted", *allocation_verdict(fit, results))
    measured = (f"N_opt ∝ C^{_iv(n_fit.exponent)}, images (∝ epochs) D_opt ∝ C^{_iv(d_fit.exponent)}, "
                f"from {ALLOCATION_TEXT[method]} ({fit.design} design)")
    for other in ("parabola", "parametric", "frontier_runs"):
        on, od = getattr(fit, f"optimal_params_{other}"), getattr(fit, f"optimal_images_{other}")
        if other != method and on is not None and od is not None:
            measured += f"; {ALLOCATION_TEXT[other]}: N_opt ∝ C^{_iv(on.exponent)}, D_opt ∝ C^{_iv(od.exponent)}"
    caveat = ""
    t = fit.lr_trend
    if t is not None and t.n_points and t.n_at_grid_edge / t.n_points > MAX_EDGE_SHARE:
        caveat = (f"; caveat: {t.n_at_grid_edge} of {t.n_points} lr optima lie at the edge of their grid, so "
                  "each size's loss may not be its best, which can bias the size optimum")
    elif t is None and _single_lr(results, family):
        caveat = ("; caveat: every size trained at one learning rate, so a size whose best lr differs is "
                  "handicapped, which can bias the size optimum (sweep lr per size to remove it)")
    verdict, why = allocation_verdict(fit, results)
    return Finding("allocation", family, PAPER["allocation"], measured, verdict, why + caveat)


def _single_lr(results: pd.DataFrame, family: str) -> bool:
    """Whether every done run of the family used one and the same learning rate."""
    if "lr" not in results:
        return False
    done = results[(results["family"] == family) & (results["status"] == "done")]
    return len(done) > 0 and done["lr"].nunique() == 1


# --- (3) learning rate --------------------------------------------------------------------------------

def lr_findings(family: str, fit: Any) -> list[Finding]:
    t = fit.lr_trend
    if t is None:
        reason = fit.skipped.get("lr_trend", "not fitted")
        return [Finding(k, family, PAPER[k], "no lr trend fitted", CANNOT_TELL, reason) for k in ("lr_duration", "lr_size")]
    edge = t.n_at_grid_edge / max(t.n_points, 1)
    context = f"{t.n_points} (model, {t.duration_column}) optima, {t.n_at_grid_edge} at the edge of their lr grid"
    out = []
    for key, est, what in (("lr_duration", t.slope_duration, f"log {t.duration_column}"),
                           ("lr_size", t.slope_params, "log N")):
        if est is None:
            out.append(Finding(key, family, PAPER[key], "one model size only", CANNOT_TELL,
                               "the lr trend with size needs optima of >= 2 model sizes"))
            continue
        measured = f"slope of log lr_opt on {what}: {_iv(est)} ({context})"
        side = _side(est)
        if edge > MAX_EDGE_SHARE:
            verdict, why = CANNOT_TELL, (f"{100 * edge:.0f}% of the optima lie at the edge of the lr grid: the true "
                                         "optima may lie beyond it (widen the grid)")
        elif side is None:
            verdict, why = CANNOT_TELL, "no bootstrap interval for the slope (run the fit with --bootstrap > 0)"
        elif side == 0:
            verdict, why = CANNOT_TELL, "the interval of the slope includes 0"
        elif side < 0:
            verdict, why = AGREES, "the slope is < 0 with its whole interval"
        else:
            verdict, why = DISAGREES, "the slope is > 0 with its whole interval: the optimal lr rises"
        out.append(Finding(key, family, PAPER[key], measured, verdict, why))
    return out


# --- (4) the two families at equal compute --------------------------------------------------------------

def _families_claim(a: str, b: str) -> str:
    """The paper's claim of a match; for a pair other than its nfnet and vit, said to be extended."""
    if (a, b) == PREFERRED_PAIR:
        return PAPER["families"]
    return (PAPER["families"] + f" Its claim is about {' and '.join(PREFERRED_PAIR)}; "
            f"here the same test of a match on {a} and {b}.")


def family_findings(cmp: Comparison, finetunes: pd.DataFrame, fits: Optional[dict[str, Any]] = None) -> list[Finding]:
    a, b = cmp.families
    pair = f"{a} vs {b}"
    out = []
    ra, rb = cmp.reach_loss[a], cmp.reach_loss[b]
    ratio = cmp.ratio_law_interval
    measured = (f"compute to reach loss {_g(cmp.target_loss, 4)}: {a} {_g(ra.law_flops)} "
                f"[{_g(ra.law_low_flops)}, {_g(ra.law_high_flops)}], {b} {_g(rb.law_flops)} "
                f"[{_g(rb.law_low_flops)}, {_g(rb.law_high_flops)}] FLOPs; ratio {a}/{b} {_iv(ratio)}; "
                f"lower loss at {sum(r['winner'] == a for r in cmp.budgets)} of "
                f"{sum(r['winner'] is not None for r in cmp.budgets)} matched budgets for {a}")
    not_learned = [why for f in (a, b) if fits and f in fits for ok, why in [learned(fits[f])] if not ok]
    log_ratio = Estimate(math.log(ratio.value) if ratio.value > 0 else math.nan,
                         math.log(ratio.low) if ratio.low > 0 else math.nan,
                         math.log(ratio.high) if ratio.high > 0 else math.nan)
    v = equivalence(log_ratio, math.log(COMPUTE_RATIO_MARGIN)) if math.isfinite(log_ratio.value) else None
    margin = f"a factor of {COMPUTE_RATIO_MARGIN:g} either way"
    if not_learned:
        verdict, why = CANNOT_TELL, not_learned[0]
    elif v is None:
        verdict, why = CANNOT_TELL, "a family has no fitted law with an interval at the target loss"
    elif v == AGREES:
        verdict, why = AGREES, f"the interval of the compute ratio lies within {margin}: a match"
    elif v == DISAGREES:
        cheaper = a if ratio.value < 1 else b
        verdict, why = DISAGREES, (f"the interval of the compute ratio lies outside {margin}: {cheaper} reaches the "
                                   f"loss with {_g(max(ratio.value, 1 / ratio.value))}x less pre-training compute")
    else:
        verdict, why = CANNOT_TELL, f"the interval of the compute ratio reaches past {margin}"
    out.append(Finding("families", f"{pair} (pre-training loss)", _families_claim(a, b), measured, verdict, why))
    ft = _finetune_pair(cmp, finetunes)
    if ft is not None:
        out.append(ft)
    return out


def newcombe_difference(p1: float, n1: int, p2: float, n2: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Newcombe's (hybrid score) interval of p1 - p2 from two Wilson intervals."""
    l1, u1 = wilson_interval(p1, n1, z)
    l2, u2 = wilson_interval(p2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return lo, hi


def _finetune_pair(cmp: Comparison, finetunes: pd.DataFrame) -> Optional[Finding]:
    """Each family's fine-tune replicates from its most pre-training compute (replicates.py): the
    difference of mean top-1 with a Welch t interval over the replicates against the match margin;
    one fine-tune in a family leaves the run-to-run spread unmeasured, so that is "cannot tell"."""
    a, b = cmp.families
    groups: dict[str, ReplicateGroup] = {}
    for f in (a, b):
        recs = [_with_images(r, finetunes) for r in cmp.finetune.get(f) or []]
        g = replicate_group(f, recs)
        if g is not None:
            groups[f] = g
    if len(groups) < 2:
        return None
    ga, gb = groups[a], groups[b]
    title, claim = f"{a} vs {b} (fine-tuned)", _families_claim(a, b)
    ivs = {f: (mean_interval(g) if g.k >= 2 else
               wilson_interval(g.top1[0], g.n_images[0])) for f, g in groups.items()}
    parts = []
    for f, g in groups.items():
        iv = f"[{100 * ivs[f][0]:.1f}, {100 * ivs[f][1]:.1f}]" if all(map(math.isfinite, ivs[f])) else "(no interval)"
        if g.k == 1:
            parts.append(f"{f} {g.model} (pre-trained {_g(g.pretrain_flops)} FLOPs): top-1 {100 * g.mean:.1f}% {iv} "
                         f"on {g.n_images[0]} images, one fine-tune")
        else:
            parts.append(f"{f} {g.model} (pre-trained {_g(g.pretrain_flops)} FLOPs): mean top-1 {100 * g.mean:.1f}% {iv} "
                         f"over {g.k} fine-tunes from {g.pretrain_runs} pre-training run(s) ("
                         + (f"each on its own split of {_images(g)} images" if g.own_splits else
                            f"on one shared test set of {_images(g)} images")
                         + f"; spread {100 * g.spread:.1f} pp sd, "
                         f"{100 * min(g.top1):.1f}-{100 * max(g.top1):.1f}%)")
    measured = "after fine-tuning, " + "; ".join(parts)
    ratio = ga.pretrain_flops / gb.pretrain_flops
    chance = {f: _chance_top1(g, finetunes) for f, g in groups.items()}
    at_chance = [f for f in (a, b) if math.isfinite(chance[f]) and math.isfinite(ivs[f][0]) and ivs[f][0] <= 1.5 * chance[f]]
    margin = f"±{100 * TOP1_MARGIN:g} percentage point"
    single = [f for f, g in groups.items() if g.k < 2]
    if single:
        lo, hi = (newcombe_difference(ga.mean, ga.n_images[0], gb.mean, gb.n_images[0])
                  if ga.k == gb.k == 1 and ga.n_images[0] > 0 and gb.n_images[0] > 0 else (math.nan, math.nan))
        if math.isfinite(lo):
            measured += (f"; difference {a} - {b} {100 * (ga.mean - gb.mean):+.1f} pp, [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                         "from the held-out images' sampling alone (Newcombe)")
        else:
            measured += f"; difference {a} - {b} {100 * (ga.mean - gb.mean):+.1f} pp"
        return Finding("families", title, claim, measured, CANNOT_TELL,
                       f"one fine-tune of {' and of '.join(single)}: its run-to-run spread (seeds, split) is "
                       f"unmeasured, and an interval from its held-out images alone does not cover it; "
                       f"fine-tune >= 3 seeds of each family's model to judge the {margin} margin (`convscale finetune "
                       f"--seed i --set data.seed=i --run-dir SWEEP/finetune/<model>__s<i>`)")
    d, lo, hi, df = welch_difference(ga, gb)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Finding("families", title, claim, measured + f"; difference {a} - {b} {100 * d:+.1f} pp", CANNOT_TELL,
                       "the held-out size of a fine-tune is unknown, so its accuracy has no interval")
    measured += (f"; difference {a} - {b} {100 * d:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}] (Welch t over the "
                 f"fine-tunes, {df:.1f} df; with the held-out images' binomial sampling)")
    v = equivalence(Estimate(d, lo, hi), TOP1_MARGIN)
    if at_chance:
        verdict, why = CANNOT_TELL, (f"{' and '.join(at_chance)} fine-tuned near chance (top-1 interval reaches 1.5x "
                                     "chance): runs that learned little tell nothing")
    elif not 0.5 <= ratio <= 2.0:
        verdict, why = CANNOT_TELL, f"the fine-tuned models had unequal pre-training compute (ratio {_g(ratio)})"
    elif v == AGREES:
        verdict, why = AGREES, f"the interval of the top-1 difference lies within {margin}: a match"
    elif v == DISAGREES:
        better = a if d > 0 else b
        verdict, why = DISAGREES, f"the interval of the top-1 difference lies outside {margin}: {better} is more accurate"
    else:
        verdict, why = CANNOT_TELL, (f"the interval of the top-1 difference reaches past {margin} "
                                     f"(more fine-tune seeds, or more held-out images, would narrow it)")
    return Finding("families", title, claim, measured, verdict, why)


def _rows_named(finetunes: pd.DataFrame, name: str) -> pd.DataFrame:
    return finetunes[finetunes["name"] == name] if len(finetunes) and "name" in finetunes else finetunes.iloc[0:0]


def _with_images(rec: dict[str, Any], finetunes: pd.DataFrame) -> dict[str, Any]:
    """A fine-tune record with its held-out size (comparisons saved before records carried it)."""
    n = rec.get("heldout_images")
    if n is not None and n == n:
        return rec
    rows = _rows_named(finetunes, str(rec.get("name")))
    n = rows["heldout_images"].iloc[0] if len(rows) and "heldout_images" in rows else math.nan
    return {**rec, "heldout_images": n}


def _images(g: ReplicateGroup) -> str:
    lo, hi = min(g.n_images), max(g.n_images)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _chance_top1(g: ReplicateGroup, finetunes: pd.DataFrame) -> float:
    """1 / classes of a group's fine-tuning data, from its chance loss; nan when unknown."""
    for name in g.names:
        rows = _rows_named(finetunes, name)
        cl = rows["chance_loss"].iloc[0] if len(rows) and "chance_loss" in rows else math.nan
        if cl == cl:
            return math.exp(-cl)
    return math.nan


def study_findings(inputs: SweepInputs, cmp: Comparison | list[Comparison] | None) -> list[Finding]:
    """Every finding of the paper for every family of the sweep, then each two-family comparison."""
    out: list[Finding] = []
    fits = inputs.fit.families if inputs.fit is not None else {}
    for fam in inputs.families:
        f = fits.get(fam)
        if f is None:
            reason = inputs.fit_error or "no done runs"
            out += [Finding(k, fam, PAPER[k], "nothing fitted", CANNOT_TELL, reason)
                    for k in ("power_law", "allocation", "lr_duration", "lr_size")]
            continue
        out.append(power_law_finding(fam, f))
        out.append(allocation_finding(fam, f, inputs.results))
        out += lr_findings(fam, f)
    for c in as_comparisons(cmp):
        out += family_findings(c, inputs.finetunes, fits)
    return out


def verdict_counts(findings: list[Finding]) -> dict[str, int]:
    return {v: sum(f.verdict == v for f in findings) for v in (AGREES, DISAGREES, CANNOT_TELL)}

