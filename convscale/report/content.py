"""What a report says, as renderer-neutral sections (Markdown and HTML draw the same content)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pandas as pd

from convscale.report.compare import Comparison, as_comparisons, merged_finetunes
from convscale.report.findings import PAPER, Finding, verdict_counts
from convscale.report.hardware import Hardware
from convscale.report.inputs import SweepInputs
from convscale.scaling import Estimate


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    wrap: bool = False  # long text cells: wrap them (HTML) instead of one line per row


@dataclasses.dataclass
class Figure:
    name: str  # file stem in the report dir
    caption: str


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Any]  # str (paragraph), Table, Figure, or ("eq", text)


def g(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{0.0 if abs(x) < 1e-12 else x:.{digits}g}"
    return str(x)


def _signed(x: float) -> str:
    """'+ 0.3' / '- 0.3', for terms of a sum."""
    return f"{'-' if x < 0 else '+'} {g(abs(x))}"


def pct(x: Any) -> str:
    return "-" if x is None or not math.isfinite(float(x)) else f"{100 * float(x):.1f}%"


def interval(e: Estimate | None) -> str:
    if e is None:
        return "-"
    if math.isfinite(e.low) and math.isfinite(e.high):
        return f"[{g(e.low)}, {g(e.high)}]"
    return "(no bootstrap)"


def _hours(hw: Hardware | None, flops: Any) -> str:
    return g(float(hw.device_hours(flops))) if hw is not None and flops is not None else "-"


def equations(inputs: SweepInputs) -> Table:
    """Every fitted item of every family: the equation or value and its interval."""
    rows = []
    fit = inputs.fit
    for fam, f in (fit.families.items() if fit is not None else []):
        for key in ("power_law", "power_law_irreducible"):
            p = getattr(f, key)
            if p is not None:
                rows.append([fam, key, p.equation(), f"a {interval(p.a)}" + (f", E {interval(p.E)}" if p.E else ""),
                             f"R² (log) {p.r2_log:.3f}, {p.n_points} frontier points"
                             + (f", curvature {interval(p.curvature)}" if p.curvature is not None else "")])
        for method in ("frontier_runs", "parabola", "parametric"):
            for q, sym in (("params", "N_opt"), ("images", "D_opt")):
                a = getattr(f, f"optimal_{q}_{method}")
                if a is not None:
                    rows.append([fam, f"optimal_{q}_{method}", f"{sym} = {g(a.coef.value)} · C^{g(a.exponent.value)}",
                                 f"exponent {interval(a.exponent)}", f"{a.n_points} points"])
        t = f.lr_trend
        if t is not None:
            eq = f"log lr_opt = {g(t.intercept.value)} {_signed(t.slope_duration.value)} log {t.duration_column}"
            iv = f"{t.duration_column} slope {interval(t.slope_duration)} ({t.sign_duration})"
            if t.slope_params is not None:
                eq += f" {_signed(t.slope_params.value)} log N"
                iv += f", N slope {interval(t.slope_params)} ({t.sign_params})"
            rows.append([fam, "lr_trend", eq, iv, f"{t.n_points} optima, {t.n_at_grid_edge} at grid edge"])
        p = f.parametric
        if p is not None:
            rows.append([fam, "parametric", p.equation(), f"alpha {interval(p.alpha)}, beta {interval(p.beta)}",
                         f"N_opt ∝ C^{g(p.n_opt_exponent.value)}, D_opt ∝ C^{g(p.d_opt_exponent.value)}"])
        for key in ("extrapolation", "extrapolation_irreducible"):
            x = getattr(f, key)
            if x is not None:
                rows.append([fam, key, f"predicted {g(x.predicted.value, 4)} at C = {g(x.held_out_compute_flops)}",
                             interval(x.predicted), f"actual {g(x.actual_loss, 4)}, error {100 * x.relative_error:+.1f}%"])
    return Table(["family", "fit", "equation (C in training FLOPs)", f"{_level(inputs)} interval", "notes"], rows)


def _level(inputs: SweepInputs) -> str:
    return f"{100 * inputs.fit.level:g}%" if inputs.fit is not None else "95%"


def _seed_range(r: dict) -> str:
    """``min-max (n)`` of a frontier point's seeds at its best lr; empty for one seed."""
    n = r.get("seeds")
    if n is None or not n == n or int(n) < 2:
        return ""
    return f"{g(r['seed_loss_min'], 4)}-{g(r['seed_loss_max'], 4)} ({int(n)})"


def frontier_table(inputs: SweepInputs, hw: Hardware | None) -> Table:
    rows = []
    seeded = any(_seed_range(r) for fr in inputs.frontiers.values() for r in fr.to_dict(orient="records"))
    for fam, fr in inputs.frontiers.items():
        for r in fr.to_dict(orient="records"):
            rows.append([fam, g(r["compute_flops"]), _hours(hw, r["compute_flops"]), str(r["model"]), g(r["params"]),
                         g(r["images_seen"]), g(r.get("epochs")), g(r.get("lr")), g(r["loss"], 4), pct(r.get("top1")),
                         str(r.get("runs_in_budget", ""))] + ([_seed_range(r)] if seeded else []))
    unit = hw.unit if hw is not None else "device-hours"
    return Table(["family", "compute (FLOPs)", unit, "best model", "params", "images", "epochs", "lr",
                  "loss (seed mean)" if seeded else "loss", "top-1", "runs"] + (["seeds' loss range (n)"] if seeded else []),
                 rows)


def skipped_table(inputs: SweepInputs, skipped_figures: dict[str, str]) -> Table:
    rows = []
    if inputs.fit_error:
        rows.append(["all", "every fit", inputs.fit_error])
    for fam, f in (inputs.fit.families.items() if inputs.fit is not None else []):
        rows += [[fam, item, reason] for item, reason in f.skipped.items()]
    rows += [["-", f"figure {name}", reason] for name, reason in skipped_figures.items()]
    return Table(["family", "item", "reason"], rows)


def cells_table(inputs: SweepInputs) -> Table:
    df = inputs.results.sort_values(["family", "params", "budget_flops", "lr"], kind="stable")
    rows = []
    for _, r in df.iterrows():
        cid = r.get("cell_id") if isinstance(r.get("cell_id"), str) else str(r.get("run_dir", "")).rsplit("/", 1)[-1]
        rows.append([cid, r["family"], str(r["model"]), g(r["params"]), g(r["budget_flops"]), g(r["train_flops"]),
                     g(r["epochs"]), g(r["lr"]), r["status"], g(r["loss"], 4), pct(r["top1"]),
                     g(r.get("device_hours", float("nan")))])
    return Table(["cell", "family", "model", "params", "budget FLOPs", "train FLOPs", "epochs", "lr", "status",
                  "loss", "top-1", "device-hours (measured)"], rows)


def comparison_blocks(cmp: Comparison, hw: Hardware | None) -> list[Any]:
    a, b = cmp.families
    rows = []
    for r in cmp.budgets:
        row = [g(r["compute_flops"]), _hours(hw, r["compute_flops"])]
        for f in (a, b):
            x = r[f]
            row += ["-", "-", "-"] if x is None else [g(x["loss"], 4), x["model"], pct(x["top1"])]
        rows.append(row + [r["winner"] or "-"])
    unit = hw.unit if hw is not None else "device-hours"
    blocks: list[Any] = [
        "The best run of each family at each compute budget:",
        Table(["compute (FLOPs)", unit, f"{a} loss", f"{a} model", f"{a} top-1", f"{b} loss", f"{b} model",
               f"{b} top-1", "lower loss"], rows),
        f"Compute to reach loss {g(cmp.target_loss, 4)} ({cmp.target_loss_source}):",
    ]
    reach = []
    for f in (a, b):
        x = cmp.reach_loss[f]
        reach.append([f, g(x.law_flops), f"[{g(x.law_low_flops)}, {g(x.law_high_flops)}]", g(x.measured_flops),
                      _hours(hw, x.law_flops if math.isfinite(x.law_flops) else None)])
    reach.append([f"ratio {a}/{b}", g(cmp.ratio_law), "", g(cmp.ratio_measured), ""])
    blocks.append(Table(["family", "from fitted law (FLOPs)", "bootstrap interval", "measured on frontier (FLOPs)",
                         unit + " (law)"], reach))
    if cmp.target_top1 is not None:
        rows = [[f, g(cmp.reach_top1.get(f)), g(cmp.reach_top1_finetuned.get(f))] for f in (a, b)]
        blocks += [f"Pre-training compute to reach top-1 {pct(cmp.target_top1)} (measured):",
                   Table(["family", "held-out top-1 (FLOPs)", "after fine-tuning (FLOPs)"], rows)]
    return blocks + [f"Note: {n}" for n in cmp.notes]


def finetune_table(cmp: Comparison) -> Table:
    rows = []
    for f, recs in cmp.finetune.items():
        for r in recs:
            rows.append([f, str(r["name"]), str(r["model"]), g(r["pretrain_flops"]), g(r["pretrain_loss"], 4),
                         pct(r["heldout_top1"]), g(r["finetune_flops"])])
    return Table(["family", "fine-tune", "model", "pre-training FLOPs", "pre-training loss", "fine-tuned top-1",
                  "fine-tuning FLOPs"], rows)


def findings_blocks(findings: list[Finding]) -> list[Any]:
    """Per finding of the paper: its statement, then one row per family: measured, verdict, why."""
    counts = verdict_counts(findings)
    blocks: list[Any] = [
        "Each finding of the paper (Smith et al. 2023), what this study measured (95% bootstrap intervals) and "
        "whether it agrees. Verdicts follow fixed rules (an effect counts only when its whole interval is on one "
        "side of 0; optima at the edge of their grid are bounds, not measurements), not the look of the plots. "
        f"Here: {counts['agrees']} agree, {counts['disagrees']} disagree, {counts['cannot tell']} cannot tell "
        "at this scale."
    ]
    for key, statement in PAPER.items():
        rows = [[f.family, f.measured, f"**{f.verdict}**", f.why] for f in findings if f.key == key]
        if rows:
            blocks += [f"**Paper:** {statement}", Table(["family", "measured here", "verdict", "why"], rows, wrap=True)]
    return blocks


AT_CHANCE_NATS = 0.01  # a held-out loss this close to ln(classes) (or above it): the model learned nothing


def at_chance_note(results: pd.DataFrame) -> str | None:
    """A sentence counting the finished cells whose held-out loss ended at chance, per family (None
    when there are none, or the table has no ``chance_loss``: sweeps collected before it existed)."""
    if "chance_loss" not in results:
        return None
    done = results[(results["status"] == "done") & results["chance_loss"].notna() & results["loss"].notna()]
    hit = done[done["loss"] >= done["chance_loss"] - AT_CHANCE_NATS]
    if hit.empty:
        return None
    chance = ", ".join(sorted({f"{c:.4g}" for c in hit["chance_loss"]}))
    per_family = ", ".join(f"{fam} {n}" for fam, n in hit["family"].value_counts().sort_index().items())
    steps = ""
    if "steps_trained" in results:  # how long they trained, against the cells that learned
        trained = pd.to_numeric(hit["steps_trained"], errors="coerce").dropna()
        rest = pd.to_numeric(done.drop(hit.index)["steps_trained"], errors="coerce").dropna()
        if len(trained):
            steps = f"; they trained {_span(trained)} steps" + (f", the cells that learned {_span(rest)}"
                                                              if len(rest) else "")
    return (f"{len(hit)} of {len(done)} finished cells ended at chance loss (within {AT_CHANCE_NATS:g} of "
            f"ln(classes) = {chance}; {per_family}{steps}): they learned nothing, from too few steps for their "
            f"size or an lr too high for them to learn at, and count in the fits as the bad results they are.")


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def diverged_note(results: pd.DataFrame) -> str | None:
    """A sentence counting the diverged cells per family and naming each (model, lr) that diverged
    (None when none did)."""
    if "status" not in results:
        return None
    hit = results[results["status"] == "diverged"]
    if hit.empty:
        return None
    per_family = ", ".join(f"{fam} {n}" for fam, n in hit["family"].value_counts().sort_index().items())
    keys = [c for c in ("model", "lr") if c in hit.columns]
    which = sorted({tuple(r) for r in hit[keys].itertuples(index=False)}, key=str) if keys else []
    named = "; ".join(" at lr ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in k) for k in which)
    return (f"{len(hit)} of {len(results)} cells diverged ({per_family}"
            + (f": {named}" if named else "") + "): a loss that blew up, or learned and collapsed back to its "
            "start; they are left out of the loss fits (in an lr grid a diverged lr bounds the optimum), so "
            "rerun those models at a lower lr to measure them.")


def build_sections(inputs: SweepInputs, cmp: Comparison | list[Comparison] | None, cmp_error: str | None, hw: Hardware | None,
                   figures: dict[str, str], skipped_figures: dict[str, str],
                   findings: list[Finding] | None = None) -> list[Section]:
    """The report's sections; ``figures`` maps each drawn figure's file stem to its caption."""
    fit = inputs.fit
    counts = ", ".join(f"{v} {k}" for k, v in inputs.results["status"].value_counts().items())
    overview = [f"Study **{inputs.study_name}**: {len(inputs.results)} cells ({counts}), "
                f"families {', '.join(inputs.families)}."]
    for note in (at_chance_note(inputs.results), diverged_note(inputs.results)):
        if note:
            overview.append(note)
    if fit is not None:
        overview.append(f"Fits: {'read from fit.json' if inputs.fit_source == 'fit.json' else 'fitted now'}; "
                        f"compute from {fit.compute_source}; {_level(inputs)} bootstrap intervals "
                        f"({fit.bootstrap} resamples, seed {fit.seed}).")
        overview += [f"Note: {n}" for n in fit.notes]
    if hw is not None:
        overview.append(f"Device-hours: {hw.caption()}.")

    def fig(name: str) -> list[Figure]:
        return [Figure(name, figures[name])] if name in figures else []

    sections = [Section("Overview", overview + fig("loss_vs_compute"))]
    if findings:
        sections.append(Section("Findings", findings_blocks(findings)))
    sections.append(Section("Fitted laws", [equations(inputs)] + fig("optimal_allocation") + fig("lr_vs_epochs")))
    sections.append(Section("Frontier", [frontier_table(inputs, hw)]))
    cmps = as_comparisons(cmp)
    for i, c in enumerate(cmps):  # the families figure shows them all: once, after the first
        sections.append(Section(f"{c.families[0]} vs {c.families[1]} at matched compute",
                                comparison_blocks(c, hw) + (fig("families") if i == 0 else [])))
    finetunes = merged_finetunes(cmps)
    if any(finetunes.values()):
        sections.append(Section("After fine-tuning",
                                [finetune_table(dataclasses.replace(cmps[0], finetune=finetunes))] + fig("finetune")))
    if not cmps and cmp_error:
        sections.append(Section("Comparison", [f"Not compared: {cmp_error}"]))
    sections.append(Section("Training curves", fig("training_curves") or ["No training curves were found."]))
    skipped = skipped_table(inputs, skipped_figures)
    sections.append(Section("Skipped", [skipped] if skipped.rows else ["Nothing was skipped."]))
    sections.append(Section("Cells", [cells_table(inputs)]))
    return sections


def frame(table: Table) -> pd.DataFrame:
    return pd.DataFrame(table.rows, columns=table.headers)
