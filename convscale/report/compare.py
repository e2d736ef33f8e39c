"""Families side by side at matched compute (``convscale compare``, and a report section).

Each comparison is of two families; a sweep of more families gives one comparison per other
family against the reference (the first of ``family_order``: the paper's nfnet when present).

- the best run of each family at each budget (its frontier row: loss, model, top-1);
- the compute each family needs to reach a target loss, from its fitted law L = A*C^-a (with a
  bootstrap interval) and measured by log-log interpolation on its frontier where in range, and
  the ratio first/second (nfnet/vit when both exist);
- optionally the compute to reach a target top-1 (pre-training held-out, and fine-tuned);
- after fine-tuning: fine-tuned top-1 vs pre-training compute per family, when results exist.

The default target loss is the higher of the two frontiers' lowest losses: a loss both reach.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.report.inputs import SweepInputs
from convscale.report.curves import LawCurve, compute_samples, interpolate_compute, law_curve
from convscale.scaling import Estimate
from convscale.scaling.robust import estimate
from convscale.serde import Serde

BUDGET_MATCH_RTOL = 0.10  # budgets of two families within 10% are the same budget (step rounding)
#: the paper's headline pair, compared first (first / second) when both are in the sweep
PREFERRED_PAIR = ("nfnet", "vit")


@dataclasses.dataclass
class Reach(Serde):
    """Compute (FLOPs) a family needs to reach a target; NaN where it cannot be said."""

    law_flops: float
    law_low_flops: float
    law_high_flops: float
    measured_flops: float  # interpolated on the frontier; NaN when the target is outside it


@dataclasses.dataclass
class Comparison(Serde):
    families: tuple[str, str]  # ratios are first / second
    budgets: list[dict[str, Any]]  # compute_flops, then per family {loss, model, top1} or None, winner
    target_loss: float
    target_loss_source: str
    reach_loss: dict[str, Reach]
    ratio_law: float
    ratio_measured: float
    #: first/second compute ratio from the two laws' bootstrap samples (independent resamples paired)
    ratio_law_interval: Estimate = dataclasses.field(default_factory=lambda: Estimate(math.nan, math.nan, math.nan))
    target_top1: float | None = None
    reach_top1: dict[str, float] = dataclasses.field(default_factory=dict)  # measured, pre-training
    reach_top1_finetuned: dict[str, float] = dataclasses.field(default_factory=dict)
    finetune: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def pick_pair(families: list[str]) -> tuple[str, str]:
    """nfnet and vit when both are there, else the first two in sorted order."""
    if len(families) < 2:
        have = families[0] if families else "none"
        raise UserError(
            f"compare needs two model families in the sweep; it has only {have}: add the other family to the study "
            "and run `convscale sweep run` again"
        )
    if all(f in families for f in PREFERRED_PAIR):
        return PREFERRED_PAIR
    a, b = sorted(families)[:2]
    return a, b


def family_order(families: list[str]) -> list[str]:
    """The families in comparison order: ``pick_pair``'s two first, then the rest sorted."""
    first = pick_pair(families)
    return [*first, *sorted(set(families) - set(first))]


def comparison_pairs(families: list[str]) -> list[tuple[str, str]]:
    """(reference, other) for every other family: one pair for a two-family sweep."""
    order = family_order(families)
    return [(order[0], f) for f in order[1:]]


def _row(r: pd.Series | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"loss": float(r["loss"]), "model": str(r["model"]), "top1": float(r["top1"]) if pd.notna(r["top1"]) else None}


def matched_budgets(frontiers: dict[str, pd.DataFrame], pair: tuple[str, str]) -> list[dict[str, Any]]:
    """One row per budget of either family (budgets within 10% merged), best run of each."""
    points = sorted({float(c) for f in pair for c in frontiers[f]["compute_flops"]})
    merged: list[float] = []
    for c in points:
        if not merged or c > merged[-1] * (1 + BUDGET_MATCH_RTOL):
            merged.append(c)
    rows = []
    for c in merged:
        rec: dict[str, Any] = {"compute_flops": c}
        for f in pair:
            fr = frontiers[f]
            near = fr[np.abs(fr["compute_flops"] / c - 1.0) <= BUDGET_MATCH_RTOL]
            rec[f] = _row(near.loc[near["loss"].idxmin()]) if len(near) else None
        a, b = rec[pair[0]], rec[pair[1]]
        rec["winner"] = None if a is None or b is None else (pair[0] if a["loss"] < b["loss"] else pair[1])
        rows.append(rec)
    return rows


def _ratio(x: float, y: float) -> float:
    return x / y if math.isfinite(x) and math.isfinite(y) and y > 0 else math.nan


def _ratio_interval(la: LawCurve | None, lb: LawCurve | None, loss: float) -> Estimate:
    """The first/second compute ratio at ``loss`` with the interval of the ratios of the two families'
    bootstrap laws (independent resamples, paired by index)."""
    if la is None or lb is None:
        return Estimate(math.nan, math.nan, math.nan)
    value = _ratio(la.compute_for_loss(loss), lb.compute_for_loss(loss))
    ca, cb = compute_samples(la, loss), compute_samples(lb, loss)
    n = min(len(ca), len(cb))
    if n == 0:
        return Estimate(value, math.nan, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ca[:n] / cb[:n]
    return estimate(value, np.where(np.isfinite(r) & (r > 0), r, np.nan), la.level)


def _best_so_far(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows sorted by x with y replaced by its running maximum (the best reached with <= x)."""
    d = df.dropna(subset=[x, y]).sort_values(x, kind="stable")
    return d.assign(**{y: d[y].cummax()})


def compare(
    inputs: SweepInputs,
    *,
    target_loss: float | None = None,
    target_top1: float | None = None,
    laws: dict[str, LawCurve | None] | None = None,
    pair: tuple[str, str] | None = None,
) -> Comparison:
    """Compare two of the sweep's families (default ``pick_pair``; see module docstring). ``laws``
    reuses curves already drawn."""
    notes = []
    if pair is None:
        pair = pick_pair(sorted(inputs.frontiers))
    else:
        missing = [f for f in pair if f not in inputs.frontiers]
        if missing:
            raise UserError(f"compare: family {missing[0]!r} is not in the sweep; it has {sorted(inputs.frontiers)}")
        pair = (pair[0], pair[1])
    if len(inputs.frontiers) > 2:
        notes.append(f"compared {pair[0]} and {pair[1]}; other families: {sorted(set(inputs.frontiers) - set(pair))}")
    fits = inputs.fit.families if inputs.fit is not None else {}
    if laws is None:
        level = inputs.fit.level if inputs.fit is not None else 0.95
        laws = {f: (law_curve(fits[f], level) if f in fits else None) for f in pair}
    fr = inputs.frontiers
    if target_loss is None:
        target_loss = max(float(fr[f]["loss"].min()) for f in pair)
        source = "default: the higher of the two frontiers' lowest losses (a loss both reach)"
    else:
        if not target_loss > 0:
            raise UserError(f"--target-loss must be a positive loss; got {target_loss}")
        source = "--target-loss"
    reach = {}
    for f in pair:
        lc = laws.get(f)
        law_c = lc.compute_for_loss(target_loss) if lc else math.nan
        lo, hi = lc.compute_for_loss_interval(target_loss) if lc else (math.nan, math.nan)
        if lc is None:
            reason = (inputs.fit.families[f].skipped.get("power_law") if f in fits else inputs.fit_error) or "not fitted"
            notes.append(f"{f}: no fitted power law ({reason})")
        measured = interpolate_compute(fr[f]["compute_flops"].to_numpy(), fr[f]["loss"].to_numpy(), target_loss)
        reach[f] = Reach(law_c, lo, hi, measured)
    cmp = Comparison(
        families=pair,
        budgets=matched_budgets(fr, pair),
        target_loss=float(target_loss),
        target_loss_source=source,
        reach_loss=reach,
        ratio_law=_ratio(reach[pair[0]].law_flops, reach[pair[1]].law_flops),
        ratio_measured=_ratio(reach[pair[0]].measured_flops, reach[pair[1]].measured_flops),
        ratio_law_interval=_ratio_interval(laws.get(pair[0]), laws.get(pair[1]), float(target_loss)),
        notes=notes,
    )
    ft = inputs.finetunes
    ft_ok = ft[(ft["status"] == "done") & ft["family"].isin(pair) & ft["heldout_top1"].notna()] if len(ft) else ft
    for f in pair:
        rows = ft_ok[ft_ok["family"] == f].sort_values("pretrain_flops", kind="stable") if len(ft_ok) else ft_ok
        cmp.finetune[f] = [
            {k: r[k] for k in ("name", "model", "pretrain_flops", "pretrain_loss", "heldout_top1", "finetune_flops",
                               "heldout_images", "pretrain_run_dir", "seed", "data_seed", "split_seed", "pretrain_seed")}
            for _, r in rows.iterrows()
        ]
    if len(ft) and not len(ft_ok):
        notes.append(f"{len(ft)} fine-tune result(s) found, none done with a known pre-training cell of {pair}")
    if target_top1 is not None:
        if not 0 < target_top1 <= 1:
            raise UserError(f"--target-top1 is a fraction in (0, 1] (e.g. 0.55 for 55%); got {target_top1}")
        cmp.target_top1 = float(target_top1)
        for f in pair:
            best = _best_so_far(fr[f], "compute_flops", "top1")
            cmp.reach_top1[f] = interpolate_compute(
                best["compute_flops"].to_numpy(), best["top1"].to_numpy(), target_top1, decreasing=False
            )
            if cmp.finetune.get(f):
                # replicates (fine-tunes of one model at one compute) count as their mean, not their best
                recs = pd.DataFrame(cmp.finetune[f])
                means = recs.groupby(["model", "pretrain_flops"], as_index=False)["heldout_top1"].mean()
                best = _best_so_far(means, "pretrain_flops", "heldout_top1")
                cmp.reach_top1_finetuned[f] = interpolate_compute(
                    best["pretrain_flops"].to_numpy(), best["heldout_top1"].to_numpy(), target_top1, decreasing=False
                )
    return cmp


def compare_all(
    inputs: SweepInputs,
    *,
    target_loss: float | None = None,
    target_top1: float | None = None,
    laws: dict[str, LawCurve | None] | None = None,
) -> list[Comparison]:
    """One ``compare`` per ``comparison_pairs`` pair: every family against the reference."""
    return [compare(inputs, target_loss=target_loss, target_top1=target_top1, laws=laws, pair=pair)
            for pair in comparison_pairs(sorted(inputs.frontiers))]


def as_comparisons(cmp: Comparison | list[Comparison] | None) -> list[Comparison]:
    """A list of comparisons from one, a list, or None."""
    return [] if cmp is None else [cmp] if isinstance(cmp, Comparison) else list(cmp)


def merged_finetunes(cmps: list[Comparison]) -> dict[str, list[dict[str, Any]]]:
    """Every family's fine-tune rows across comparisons (the reference's appear in each)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in cmps:
        for f, recs in c.finetune.items():
            out.setdefault(f, recs)
    return out


def comparisons_json(cmps: list[Comparison]) -> Any:
    """JSON-ready comparisons: one dict for one pair (as before), a list for more."""
    return cmps[0].to_dict() if len(cmps) == 1 else [c.to_dict() for c in cmps]


def _e(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def format_comparison(cmp: Comparison) -> str:
    """Plain-text tables of a comparison."""
    a, b = cmp.families
    lines = [f"{a} vs {b} at matched compute (best run of each family per budget)"]
    lines.append(f"{'budget FLOPs':>12}  {a + ' loss':>10} {'model':>14} {'top-1':>6}  {b + ' loss':>10} "
                 f"{'model':>14} {'top-1':>6}  winner")
    for r in cmp.budgets:
        cells = []
        for f in (a, b):
            x = r[f]
            cells.append(f"{'-':>10} {'-':>14} {'-':>6}" if x is None
                         else f"{x['loss']:>10.4g} {x['model'][:14]:>14} {_pct(x['top1']):>6}")
        lines.append(f"{r['compute_flops']:>12.3g}  {cells[0]}  {cells[1]}  {r['winner'] or '-'}")
    lines.append("")
    lines.append(f"compute to reach loss {cmp.target_loss:.4g} ({cmp.target_loss_source}):")
    for f in (a, b):
        x = cmp.reach_loss[f]
        lines.append(f"  {f}: law {_e(x.law_flops)} FLOPs [{_e(x.law_low_flops)}, {_e(x.law_high_flops)}], "
                     f"measured {_e(x.measured_flops)} FLOPs")
    iv = cmp.ratio_law_interval
    lines.append(f"  ratio {a}/{b}: law {_e(cmp.ratio_law)} [{_e(iv.low)}, {_e(iv.high)}], "
                 f"measured {_e(cmp.ratio_measured)}")
    if cmp.target_top1 is not None:
        lines.append(f"compute to reach top-1 {_pct(cmp.target_top1)} (measured on the frontier):")
        for f in (a, b):
            s = f"  {f}: pre-training {_e(cmp.reach_top1.get(f))} FLOPs"
            if f in cmp.reach_top1_finetuned:
                s += f", fine-tuned {_e(cmp.reach_top1_finetuned[f])} FLOPs of pre-training"
            lines.append(s)
    if any(cmp.finetune.values()):
        lines.append("")
        lines.append("after fine-tuning (held-out top-1 vs pre-training compute):")
        for f in (a, b):
            for r in cmp.finetune.get(f, []):
                lines.append(f"  {f} {r['model']}: pre-training {_e(r['pretrain_flops'])} FLOPs -> "
                             f"fine-tuned top-1 {_pct(r['heldout_top1'])}")
    lines += [f"note: {n}" for n in cmp.notes]
    return "\n".join(lines)


def format_comparisons(cmps: list[Comparison]) -> str:
    """Plain-text tables of every comparison, separated by a blank line."""
    return "\n\n".join(format_comparison(c) for c in cmps)
