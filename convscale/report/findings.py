"""The paper's findings, each set against what this study measured, with a verdict.

Smith et al. 2023 (paper.md A.5, A.8) report three scaling findings and one comparison:
(1) held-out loss falls as a power law of compute along the frontier;
(2) the compute-optimal model size and epoch budget both grow with compute, at about the same rate;
(3) the optimal learning rate falls as the epoch budget grows, and with model size;
(4) at equal pre-training compute, NFNets match ViTs (after fine-tuning).

A verdict is ``agrees``, ``disagrees`` or ``cannot tell``, decided by fixed rules on the fitted
estimates and their bootstrap intervals (stated in each finding's ``why``), never by how the
result looks. The rules:

- an effect is *measured* only when its whole interval lies on one side of 0; an interval across 0
  is ``cannot tell``;
- an optimum at the edge of the grid it was searched on (the smallest or largest model at a
  budget, the smallest or largest learning rate) is a bound, not a measurement: when most optima
  sit there, the trend is ``cannot tell`` and the fix (widen the grid) is said;
- "a power law" needs the log-log fit to explain >= 95% of the variance of log-loss;
- "at the same rate" holds when the intervals of the size and images exponents overlap, or the two
  exponents differ by at most 0.1 (Hoffmann et al.'s 0.49 vs 0.51 pass, Kaplan et al.'s 0.73 vs 0.27 do not);
- "match" holds when the two families' intervals (compute to reach a loss, fine-tuned top-1) overlap.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import pandas as pd

from convscale.report.compare import Comparison
from convscale.report.inputs import SweepInputs
from convscale.scaling import Estimate

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"
MIN_R2_LOG = 0.95  # a "power law" explains at least this share of the variance of log-loss
SAME_RATE_TOLERANCE = 0.1  # |exponent of N_opt - exponent of D_opt| still "the same rate"
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
class Finding:
    key: str  # one of PAPER's keys
    family: str  # a family, or "nfnet vs vit"
    paper: str
    measured: str
    verdict: str  # AGREES | DISAGREES | CANNOT_TELL
    why: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


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


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) <= min(a[1], b[1])


def wilson_interval(p: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0 or not math.isfinite(p):
        return math.nan, math.nan
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# --- (1) power law -------------------------------------------------------------------------------

def power_law_finding(family: str, fit: Any) -> Finding:
    p, pe = fit.power_law, fit.power_law_irreducible
    if p is None:
        return Finding("power_law", family, PAPER["power_law"], "no power law fitted",
                       CANNOT_TELL, fit.skipped.get("power_law", "not fitted"))
    measured = f"L = A·C^-a with a = {_iv(p.a)}, R² (log) {p.r2_log:.3f} over {p.n_points} budgets"
    best_r2 = p.r2_log
    if pe is not None:
        measured += f"; with an irreducible term E = {_iv(pe.E)}, a = {_iv(pe.a)}, R² {pe.r2_log:.3f}"
        best_r2 = max(best_r2, pe.r2_log)
    x = fit.extrapolation
    extra = ""
    if x is not None:
        inside = x.predicted.low <= x.actual_loss <= x.predicted.high if _has_interval(x.predicted) else None
        extra = (f"; fitted without the largest budget it predicts {_g(x.predicted.value, 4)} there, "
                 f"measured {_g(x.actual_loss, 4)} ({100 * x.relative_error:+.1f}%"
                 + ("" if inside is None else ", inside the interval" if inside else ", outside the interval") + ")")
    measured += extra
    bend = local_exponents(fit.frontier)
    if bend is not None:
        (c0, c1, a_low), (c2, c3, a_high) = bend
        measured += (f"; local exponent a = {a_low:.3g} over {c0:.2g}-{c1:.2g} FLOPs, "
                     f"{a_high:.3g} over {c2:.2g}-{c3:.2g}")
    side = _side(p.a)
    span = math.log10(p.compute_max_flops / p.compute_min_flops) if p.compute_min_flops > 0 else 0.0
    scope = f" ({p.n_points} budgets over {span:.2g} decade{'' if round(span, 2) == 1 else 's'})"
    if side is None:
        return Finding("power_law", family, PAPER["power_law"], measured, CANNOT_TELL,
                       "no bootstrap interval for a (run the fit with --bootstrap > 0)")
    if side == 0:
        return Finding("power_law", family, PAPER["power_law"], measured, CANNOT_TELL,
                       "the interval of the exponent a includes 0: the loss is not shown to fall" + scope)
    if side < 0:
        return Finding("power_law", family, PAPER["power_law"], measured, DISAGREES,
                       "the loss rises with compute along the frontier (a < 0 with its whole interval)" + scope)
    if best_r2 < MIN_R2_LOG:
        shape = ""
        if bend is not None and bend[1][2] > bend[0][2]:
            shape = (f"; it steepens (local a {bend[0][2]:.2g} -> {bend[1][2]:.2g}): the smallest budgets lie "
                     "above the line, before a power-law regime")
        elif bend is not None:
            shape = (f"; it flattens (local a {bend[0][2]:.2g} -> {bend[1][2]:.2g}), as when the loss nears "
                     "an irreducible floor")
        return Finding("power_law", family, PAPER["power_law"], measured, DISAGREES,
                       f"the loss falls, but the law explains only {100 * best_r2:.0f}% of the variance of "
                       f"log-loss (< {100 * MIN_R2_LOG:.0f}%): not a straight line in log-log" + scope + shape)
    caveat = "; with 3 budgets the straight line is weakly tested" if p.n_points <= 3 else ""
    return Finding("power_law", family, PAPER["power_law"], measured, AGREES,
                   f"a > 0 with its whole interval and R² (log) >= {MIN_R2_LOG:g}" + scope + caveat)


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


def allocation_finding(family: str, fit: Any, results: pd.DataFrame) -> Finding:
    method, n_fit, d_fit = fit.allocation()
    if n_fit is None or d_fit is None:
        reason = fit.skipped.get("optimal_params_best_run") or fit.skipped.get("optimal_images_best_run", "not fitted")
        return Finding("allocation", family, PAPER["allocation"], "no allocation fitted", CANNOT_TELL, reason)
    how = ("IsoFLOP parabola vertices" if method == "parabola" else "the best run of each budget")
    measured = (f"N_opt ∝ C^{_iv(n_fit.exponent)}, images (∝ epochs) D_opt ∝ C^{_iv(d_fit.exponent)}, "
                f"from {how} at {n_fit.n_points} budgets")
    if fit.parametric is not None:
        pm = fit.parametric
        measured += (f"; the parametric law L(N, D) gives N_opt ∝ C^{_iv(pm.n_opt_exponent)}, "
                     f"D_opt ∝ C^{_iv(pm.d_opt_exponent)}")
    caveat = ""
    t = fit.lr_trend
    if t is not None and t.n_points and t.n_at_grid_edge / t.n_points > MAX_EDGE_SHARE:
        caveat = (f"; caveat: {t.n_at_grid_edge} of {t.n_points} lr optima lie at the edge of their grid, so "
                  "each size's loss may not be its best, which can bias the size optimum")
    verdict, why = _allocation_verdict(method, n_fit, d_fit, *size_edges(results, family))
    return Finding("allocation", family, PAPER["allocation"], measured, verdict, why + caveat)


def _allocation_verdict(method: str, n_fit: Any, d_fit: Any, n_edge: int, n_budgets: int, where: str) -> tuple[str, str]:
    if method == "best_run" and n_budgets and n_edge / n_budgets > MAX_EDGE_SHARE:
        return CANNOT_TELL, (f"the best model was {where} of {n_budgets} budgets: the optimum lies outside the "
                             f"swept sizes there, so its growth is not measured (sweep "
                             f"{' and '.join(w for w, k in (('smaller', 'smallest'), ('larger', 'largest')) if k in where)} "
                             "models)")
    sn, sd = _side(n_fit.exponent), _side(d_fit.exponent)
    if sn is None or sd is None:
        return CANNOT_TELL, "no bootstrap intervals for the exponents (run the fit with --bootstrap > 0)"
    if sn < 0 or sd < 0:
        which = " and ".join(w for w, s in (("model size", sn), ("images", sd)) if s < 0)
        return DISAGREES, f"the compute-optimal {which} shrinks with compute (whole interval below 0)"
    if sn == 0 or sd == 0:
        which = " and ".join(w for w, s in (("model size", sn), ("images", sd)) if s == 0)
        return CANNOT_TELL, f"the interval of the {which} exponent includes 0: its growth is not resolved"
    gap = abs(n_fit.exponent.value - d_fit.exponent.value)
    overlap = _overlap((n_fit.exponent.low, n_fit.exponent.high), (d_fit.exponent.low, d_fit.exponent.high))
    if not overlap and gap > SAME_RATE_TOLERANCE:
        faster = "model size" if n_fit.exponent.value > d_fit.exponent.value else "images"
        return DISAGREES, (f"both grow, but not at the same rate: the intervals do not overlap and the exponents "
                           f"differ by {gap:.2g} (> {SAME_RATE_TOLERANCE:g}; {faster} grows faster)")
    how_same = "the intervals overlap" if overlap else f"the exponents differ by only {gap:.2g}"
    return AGREES, f"both exponents > 0 with their whole intervals, and {how_same}"


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

def family_findings(cmp: Comparison, finetunes: pd.DataFrame) -> list[Finding]:
    a, b = cmp.families
    pair = f"{a} vs {b}"
    out = []
    ra, rb = cmp.reach_loss[a], cmp.reach_loss[b]
    measured = (f"compute to reach loss {_g(cmp.target_loss, 4)}: {a} {_g(ra.law_flops)} "
                f"[{_g(ra.law_low_flops)}, {_g(ra.law_high_flops)}], {b} {_g(rb.law_flops)} "
                f"[{_g(rb.law_low_flops)}, {_g(rb.law_high_flops)}] FLOPs (ratio {a}/{b} {_g(cmp.ratio_law)}); "
                f"lower loss at {sum(r['winner'] == a for r in cmp.budgets)} of "
                f"{sum(r['winner'] is not None for r in cmp.budgets)} matched budgets for {a}")
    ivs = [(r.law_low_flops, r.law_high_flops) for r in (ra, rb)]
    if not all(math.isfinite(x) for iv in ivs for x in iv):
        verdict, why = CANNOT_TELL, "a family has no fitted law with an interval at the target loss"
    elif _overlap(*ivs):
        verdict, why = AGREES, "the two compute intervals overlap: neither family is shown to need less"
    else:
        cheaper = a if ra.law_flops < rb.law_flops else b
        verdict, why = DISAGREES, (f"the intervals do not overlap: {cheaper} reaches the loss with "
                                   f"{_g(max(cmp.ratio_law, 1 / cmp.ratio_law))}x less pre-training compute")
    out.append(Finding("families", f"{pair} (pre-training loss)", PAPER["families"], measured, verdict, why))
    ft = _finetune_pair(cmp, finetunes)
    if ft is not None:
        out.append(ft)
    return out


def _finetune_pair(cmp: Comparison, finetunes: pd.DataFrame) -> Optional[Finding]:
    """Each family's fine-tune from the most pre-training compute, with Wilson intervals of top-1."""
    a, b = cmp.families
    best: dict[str, dict[str, Any]] = {}
    for f in (a, b):
        recs = cmp.finetune.get(f) or []
        if recs:
            best[f] = max(recs, key=lambda r: (r["pretrain_flops"], r["heldout_top1"]))
    if len(best) < 2:
        return None
    n_images = {}
    for f, r in best.items():
        rows = finetunes[finetunes["name"] == r["name"]] if len(finetunes) else finetunes
        n = rows["heldout_images"].iloc[0] if len(rows) and "heldout_images" in rows else math.nan
        n_images[f] = int(n) if n == n else 0
    ivs = {f: wilson_interval(float(r["heldout_top1"]), n_images[f]) for f, r in best.items()}
    parts = [f"{f} {best[f]['model']} (pre-trained {_g(best[f]['pretrain_flops'])} FLOPs): top-1 "
             f"{100 * best[f]['heldout_top1']:.1f}% [{100 * ivs[f][0]:.1f}, {100 * ivs[f][1]:.1f}] "
             f"on {n_images[f]} images" for f in (a, b)]
    measured = "after fine-tuning, " + "; ".join(parts)
    ratio = best[a]["pretrain_flops"] / best[b]["pretrain_flops"]
    if not all(math.isfinite(x) for iv in ivs.values() for x in iv):
        verdict, why = CANNOT_TELL, "the held-out size of a fine-tune is unknown, so its accuracy has no interval"
    elif not 0.5 <= ratio <= 2.0:
        verdict, why = CANNOT_TELL, f"the fine-tuned models had unequal pre-training compute (ratio {_g(ratio)})"
    elif _overlap(ivs[a], ivs[b]):
        verdict, why = AGREES, "the 95% (Wilson) intervals of fine-tuned top-1 overlap"
    else:
        better = a if best[a]["heldout_top1"] > best[b]["heldout_top1"] else b
        verdict, why = DISAGREES, f"the 95% (Wilson) intervals do not overlap: {better} is more accurate"
    return Finding("families", f"{a} vs {b} (fine-tuned)", PAPER["families"], measured, verdict, why)


def study_findings(inputs: SweepInputs, cmp: Optional[Comparison]) -> list[Finding]:
    """Every finding of the paper for every family of the sweep, then the two-family comparison."""
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
    if cmp is not None:
        out += family_findings(cmp, inputs.finetunes)
    return out


def verdict_counts(findings: list[Finding]) -> dict[str, int]:
    return {v: sum(f.verdict == v for f in findings) for v in (AGREES, DISAGREES, CANNOT_TELL)}

