"""Loss-vs-compute figures: (a) one panel per family, (e) both families on one plot.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot: no global state, no GUI backend)
and saved as PNG and SVG. Every cell of the sweep appears: done cells as points, diverged and
failed cells as distinct markers along the top edge of the axes (they have no loss to plot).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from convscale.report.hardware import Hardware
from convscale.report.inputs import SweepInputs
from convscale.report.curves import LawCurve

FAMILY_COLORS = {"nfnet": "#1f5fa8", "vit": "#c8432b"}
OTHER_COLORS = ("#2a9d5b", "#8e44ad", "#b8860b", "#555555")
PNG_DPI = 200
MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")
RC = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10.5, "legend.fontsize": 8,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.25,
    "grid.linewidth": 0.6, "axes.spines.right": False,
}


class PlotSkipped(Exception):
    """A figure that cannot be drawn from this sweep; the message says why."""


def family_color(family: str, families: list[str]) -> str:
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    others = [f for f in families if f not in FAMILY_COLORS]
    return OTHER_COLORS[others.index(family) % len(OTHER_COLORS)] if family in others else OTHER_COLORS[-1]


def model_markers(results: pd.DataFrame, family: str) -> dict[str, str]:
    """One marker per model of a family, in order of size."""
    models = (results[results["family"] == family].groupby("model")["params"].first().sort_values().index)
    return {m: MODEL_MARKERS[i % len(MODEL_MARKERS)] for i, m in enumerate(models)}


def save_figure(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``name``.png (PNG_DPI) and ``name``.svg; returns both paths."""
    import matplotlib

    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    # text as paths in the SVG: it renders the same without the fonts installed
    with matplotlib.rc_context({**RC, "svg.fonttype": "path"}):
        # no bbox_inches="tight": constrained layout already fits everything, and "tight" draws twice
        fig.savefig(png, dpi=PNG_DPI, facecolor="white")
        fig.savefig(svg, facecolor="white", metadata={"Date": None})
    return png, svg


def fmt_estimate(e: Any, digits: int = 3) -> str:
    """'0.123 [0.101, 0.144]' (no interval when the bootstrap was not run)."""
    def g(x: float) -> str:  # round-off (1e-16 slopes of flat data) prints as 0
        return f"{0.0 if abs(x) < 1e-10 else x:.{digits}g}"

    s = g(e.value)
    if math.isfinite(e.low) and math.isfinite(e.high):
        s += f" [{g(e.low)}, {g(e.high)}]"
    return s


def add_hardware_axis(ax: Any, hardware: Hardware | None) -> None:
    """A top x-axis in device-hours of ``hardware`` (a constant factor of FLOPs)."""
    if hardware is None:
        return
    k = hardware.flops_per_hour
    top = ax.secondary_xaxis("top", functions=(lambda f: np.asarray(f) / k, lambda h: np.asarray(h) * k))
    top.set_xlabel(f"{hardware.unit} (at {100 * hardware.mfu:g}% MFU)")
    top.xaxis.set_minor_formatter(sparse_minor_log_labels(top.xaxis))


def sparse_minor_log_labels(axis: Any) -> Any:
    """Minor-tick labels of a log axis: only 2x and 5x each decade, and only when the axis spans
    less than 1.5 decades (matplotlib's default labels every minor tick there, and they overlap)."""
    from matplotlib.ticker import FuncFormatter

    def label(v: float, pos: Any) -> str:
        lo, hi = sorted(axis.get_view_interval())
        if not (v > 0 and lo > 0) or math.log10(hi / lo) >= 1.5:
            return ""
        exp = math.floor(math.log10(v) + 1e-9)
        mant = v / 10**exp
        return f"${mant:.0f}\\times10^{{{exp}}}$" if any(abs(mant - m) < 1e-6 for m in (2, 5)) else ""

    return FuncFormatter(label)


def tidy_log_x(ax: Any) -> None:
    """A log x-axis whose minor ticks are labelled sparsely (see ``sparse_minor_log_labels``)."""
    ax.xaxis.set_minor_formatter(sparse_minor_log_labels(ax.xaxis))


def params_label(n: float) -> str:
    """44.2k, 1.5M: parameter counts for legends."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def plain_log_labels(axis: Any) -> None:
    """Label a log axis 2, 3, 0.6 instead of 2x10^0: where matplotlib labels a tick, print it plainly."""
    from matplotlib.ticker import FuncFormatter

    for get, set_ in ((axis.get_major_formatter, axis.set_major_formatter),
                      (axis.get_minor_formatter, axis.set_minor_formatter)):
        inner = get()
        set_(FuncFormatter(lambda v, pos, inner=inner: f"{v:.3g}" if inner(v, pos) else ""))


def widen_log_limits(ax: Any, axis: str = "y", min_ratio: float = 4.0) -> None:
    """At least a factor ``min_ratio`` of range, so a flat series still gets labelled ticks."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < min_ratio:
        mid = (lo * hi) ** 0.5
        (ax.set_ylim if axis == "y" else ax.set_xlim)(mid / min_ratio**0.5, mid * min_ratio**0.5)


def add_caption(fig: Figure, text: str, inches: float = 0.5) -> None:
    """A small caption under the axes, in a band that the constrained layout keeps free."""
    frac = inches / fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, frac, 1, 1 - frac))
    fig.text(0.01, frac * 0.92, text, ha="left", va="top", fontsize=7.5, wrap=True)


def _cell_compute(df: pd.DataFrame) -> pd.Series:
    """A cell's compute: its measured train_flops, else its planned budget (an IsoFLOP budget, or
    3 x forward FLOPs per image x the planned images for epoch and image budgets)."""
    planned = df["budget_flops"]
    if {"steps", "batch_size", "flops_per_image"} <= set(df.columns):
        own = 3.0 * pd.to_numeric(df["flops_per_image"], errors="coerce") * pd.to_numeric(
            df["steps"], errors="coerce") * pd.to_numeric(df["batch_size"], errors="coerce")
        planned = planned.where(planned.notna(), own)
    return df["train_flops"].where(df["train_flops"].notna() & (df["train_flops"] > 0), planned)


def draw_cells(ax: Any, results: pd.DataFrame, family: str, color: str) -> list[Any]:
    """Every cell of ``family``: done ones at (compute, loss), marker per model; diverged and
    failed ones along the top edge. Returns legend handles."""
    fam = results[results["family"] == family]
    markers = model_markers(results, family)
    handles = []
    done = fam[(fam["status"] == "done") & fam["loss"].notna()]
    for model, g in done.groupby("model", sort=False):
        ax.scatter(_cell_compute(g), g["loss"], marker=markers[model], s=26, facecolor=color, alpha=0.45,
                   edgecolor="none", zorder=2)
    for model in markers:
        n = float(fam.loc[fam["model"] == model, "params"].iloc[0])
        handles.append(Line2D([], [], ls="", marker=markers[model], color=color, alpha=0.6, ms=5,
                              label=f"{model} ({params_label(n)} params)"))
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for status, marker, kw in (("diverged", "x", {"color": "black"}),
                               ("failed", "v", {"facecolor": "none", "edgecolor": "0.35"})):
        bad = fam[fam["status"] == status]
        c = _cell_compute(bad).dropna()
        if len(c):
            ax.scatter(c, np.full(len(c), 0.97), transform=top, marker=marker, s=36, lw=1.2, zorder=4,
                       clip_on=False, **kw)
            handles.append(Line2D([], [], ls="", marker=marker, ms=6, mew=1.2, label=f"{status} ({len(bad)}, at top)",
                                  color=kw.get("color", "0.35"), mfc="none"))
    return handles


def draw_frontier(ax: Any, fr: pd.DataFrame, color: str, label: str = "frontier") -> Any:
    """The frontier points joined by a line; a point of several seeds gets a bar over its seeds'
    losses (lowest to highest) at its best lr."""
    if "seeds" in fr and (fr["seeds"] > 1).any():
        many = fr[fr["seeds"] > 1]
        ax.errorbar(many["compute_flops"], many["loss"],
                    yerr=[many["loss"] - many["seed_loss_min"], many["seed_loss_max"] - many["loss"]],
                    fmt="none", ecolor=color, elinewidth=1.4, capsize=3, zorder=4)
        label = f"{label} (bars: seed range, {int(many['seeds'].max())} seeds)"
    return ax.plot(fr["compute_flops"], fr["loss"], "-o", color=color, ms=6.5, mec="black", mew=0.8, lw=1.2,
                   zorder=5, label=label)[0]


def draw_law(ax: Any, lc: LawCurve, c_lo: float, c_hi: float, color: str, label: str | None = None) -> list[Any]:
    """The fitted law over [c_lo, c_hi] and its bootstrap band."""
    grid = np.geomspace(c_lo, c_hi, 200)
    law = lc.law
    pct = f"{100 * lc.level:g}%"
    label = label or f"fit L = A·C^-a, a = {fmt_estimate(law.a)}"
    handles = [ax.plot(grid, law.predict(grid), "--", color=color, lw=1.6, zorder=3, label=label)[0]]
    band = lc.band(grid)
    if band is not None:
        handles.append(ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15, lw=0, zorder=1,
                                       label=f"{pct} bootstrap band"))
    return handles


def _compute_range(inputs: SweepInputs, families: list[str]) -> tuple[float, float]:
    c = _cell_compute(inputs.results[inputs.results["family"].isin(families)]).dropna()
    c = c[c > 0]
    return float(c.min()) / 1.5, float(c.max()) * 1.5


def _caption(fig: Figure, inputs: SweepInputs, hardware: Hardware | None, extra: str = "") -> None:
    counts = inputs.results["status"].value_counts()
    text = (f"{inputs.study_name}: {len(inputs.results)} cells ("
            + ", ".join(f"{v} {k}" for k, v in counts.items()) + "). Compute: training FLOPs "
            "(FLOPs = 2 x MACs, a training step = 3 x forward).")
    if hardware is not None:
        text += f" Top axis: {hardware.caption()}."
    add_caption(fig, text + extra)


def loss_vs_compute(inputs: SweepInputs, laws: dict[str, LawCurve | None], hardware: Hardware | None) -> Figure:
    """(a) held-out loss vs training compute, one panel per family, log-log."""
    families = inputs.families
    fig = Figure(figsize=(5.2 * len(families), 5.6), layout="constrained")
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    lo, hi = _compute_range(inputs, families)
    for ax, fam in zip(axes, families):
        color = family_color(fam, families)
        ax.set_xscale("log")
        ax.set_yscale("log")
        handles = draw_cells(ax, inputs.results, fam, color)
        fr = inputs.frontiers.get(fam)
        if fr is not None and len(fr):
            handles.append(draw_frontier(ax, fr, color))
        lc = laws.get(fam)
        if lc is not None:
            handles += draw_law(ax, lc, lo, hi, color)
        elif inputs.fit is not None and fam in inputs.fit.families:
            reason = inputs.fit.families[fam].skipped.get("power_law", "")
            ax.text(0.02, 0.02, f"no power law: {reason}", transform=ax.transAxes, fontsize=7, va="bottom", wrap=True)
        ax.set_xlim(lo, hi)
        tidy_log_x(ax)
        ax.set_title(f"{fam}")
        ax.set_xlabel("training compute (FLOPs)")
        add_hardware_axis(ax, hardware)
        # below the panel (inside, any corner can hide cells of some sweep), one column: model names
        # and intervals are long, two columns ran past the panel
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
        plain_log_labels(ax.yaxis)
    axes[0].set_ylabel("held-out loss")
    _caption(fig, inputs, hardware)
    return fig


def families_overlay(inputs: SweepInputs, laws: dict[str, LawCurve | None], hardware: Hardware | None,
                     target_loss: float | None = None, reach: dict[str, float] | None = None) -> Figure:
    """(e) both families' frontiers and laws on one plot; the target loss and the compute each
    family's law needs to reach it, when given."""
    families = inputs.families
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = _compute_range(inputs, families)
    for fam in families:
        color = family_color(fam, families)
        fr = inputs.frontiers.get(fam)
        if fr is not None and len(fr):
            draw_frontier(ax, fr, color, label=f"{fam} frontier")
        lc = laws.get(fam)
        if lc is not None:
            draw_law(ax, lc, lo, hi, color, label=f"{fam}: L = {lc.law.A.value:.3g}·C^-{lc.law.a.value:.3g}")
        if reach and math.isfinite(reach.get(fam, math.nan)):
            ax.axvline(reach[fam], color=color, lw=0.9, ls=":", zorder=1)
    if target_loss is not None:
        ax.axhline(target_loss, color="0.3", lw=0.9, ls="-.", label=f"target loss {target_loss:.4g}")
    ax.set_xlim(lo, hi)
    tidy_log_x(ax)
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("held-out loss")
    ax.set_title("families at matched compute")
    plain_log_labels(ax.yaxis)
    add_hardware_axis(ax, hardware)
    ax.legend(loc="lower left", framealpha=0.9)
    _caption(fig, inputs, hardware, " Dotted verticals: compute at which each law reaches the target.")
    return fig


def finetune_vs_compute(inputs: SweepInputs, finetune: dict[str, list[dict[str, Any]]],
                        hardware: Hardware | None) -> Figure:
    """Fine-tuned held-out top-1 vs pre-training compute, per family."""
    if not any(finetune.values()):
        raise PlotSkipped("no finished fine-tune result with a known pre-training cell")
    families = inputs.families
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    for fam, recs in finetune.items():
        if not recs:
            continue
        d = pd.DataFrame(recs).sort_values("pretrain_flops")
        color = family_color(fam, families)
        ax.plot(d["pretrain_flops"], 100 * d["heldout_top1"], "o", color=color, mec="black", mew=0.6, label=fam)
        best = d.assign(best=d["heldout_top1"].cummax())
        ax.plot(best["pretrain_flops"], 100 * best["best"], "-", color=color, lw=1.2, alpha=0.8)
        for _, r in d.iterrows():
            ax.annotate(str(r["model"]), (r["pretrain_flops"], 100 * r["heldout_top1"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    tidy_log_x(ax)
    ax.set_xlabel("pre-training compute (FLOPs)")
    ax.set_ylabel("fine-tuned held-out top-1 (%)")
    ax.set_title("after fine-tuning")
    add_hardware_axis(ax, hardware)
    ax.legend(loc="lower right", framealpha=0.9)
    _caption(fig, inputs, hardware, " Lines: best fine-tuned top-1 reached with at most that pre-training compute.")
    return fig
