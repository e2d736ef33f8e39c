"""Detail figures: (b) compute-optimal params and images, (c) optimal lr vs epochs, (d) training curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from convscale.report.inputs import SweepInputs
from convscale.report.plots import (
    PlotSkipped,
    add_caption,
    family_color,
    fmt_estimate,
    params_label,
    plain_log_labels,
    tidy_log_x,
    widen_log_limits,
)
from convscale.scaling import lr_optima, prepare_table

_METHOD_STYLE = {"frontier_runs": ("o", "-", "frontier runs"), "parabola": ("s", ":", "IsoFLOP parabola"),
                 "parametric": ("D", "--", "L(N, D) slices")}


def optimal_allocation(inputs: SweepInputs) -> Figure:
    """(b) N_opt(C) and D_opt(C): the points each method found and the fitted C^exponent lines."""
    families = inputs.families
    fig = Figure(figsize=(10.4, 4.2 + 0.16 * 2 * len(inputs.families)), layout="constrained")
    axes = fig.subplots(1, 2)
    drawn = False
    for ax, quantity, col, label in ((axes[0], "params", "params", "parameters N"),
                                     (axes[1], "images", "images_seen", "images seen D")):
        for fam in families:
            color = family_color(fam, families)
            ff = inputs.fit.families.get(fam) if inputs.fit is not None else None
            fitted = False
            for method, (marker, ls, name) in _METHOD_STYLE.items():
                a = getattr(ff, f"optimal_{quantity}_{method}") if ff is not None else None
                if a is None:
                    continue
                c = np.array([p["compute_flops"] for p in a.points])
                v = np.array([p["value"] for p in a.points])
                ax.scatter(c, v, marker=marker, s=30, color=color, edgecolor="black", lw=0.5, zorder=3)
                grid = np.geomspace(c.min() / 1.3, c.max() * 1.3, 50)
                ax.plot(grid, a.predict(grid), ls=ls, color=color, lw=1.4,
                        label=f"{fam}, {name}: ∝ C^{fmt_estimate(a.exponent)}")
                fitted = drawn = True
            if not fitted:
                fr = inputs.frontiers.get(fam)
                if fr is not None and len(fr):
                    ax.scatter(fr["compute_flops"], fr[col], marker="o", s=30, facecolor="none", edgecolor=color,
                               label=f"{fam}: frontier runs (too few to fit)")
                    drawn = True
        ax.set_xscale("log")
        tidy_log_x(ax)
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(f"compute-optimal {label}")
        # below the panel: inside, it hid points (the upper left is where small budgets' optima sit)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    if not drawn:
        raise PlotSkipped("no frontier points to place compute-optimal sizes")
    level = f"{100 * inputs.fit.level:g}%" if inputs.fit is not None else ""
    axes[0].set_title("compute-optimal model size")
    axes[1].set_title("compute-optimal training images")
    add_caption(fig, f"Exponents with {level} intervals from resampled runs. 'frontier runs': the runs on the "
             "compute-efficient frontier; 'parabola': vertex of loss vs log N at each IsoFLOP budget, "
             "fitted with weights that fall off with distance from the vertex; "
             "'L(N, D) slices': the optimum of the fitted surface at each compute.")
    return fig


def _lr_points(inputs: SweepInputs, fam: str) -> tuple[pd.DataFrame, str]:
    ff = inputs.fit.families.get(fam) if inputs.fit is not None else None
    if ff is not None and ff.lr_trend is not None:
        return pd.DataFrame(ff.lr_trend.points), ff.lr_trend.duration_column
    done = prepare_table(inputs.results).done
    runs = done[done["family"] == fam]
    col = "epochs" if runs["epochs"].notna().any() else "images_seen"
    return lr_optima(runs, col), col


def lr_vs_epochs(inputs: SweepInputs) -> Figure:
    """(c) optimal learning rate vs epoch budget, one line per model size, per family."""
    families = inputs.families
    n_models = max((inputs.results.loc[inputs.results["family"] == f, "model"].nunique() for f in families), default=0)
    # the legend (one line per model, the edge marker, the fit) goes below the panels
    fig = Figure(figsize=(5.0 * len(families), 4.0 + 0.16 * (n_models + 2)), layout="constrained")
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    any_points = False
    for ax, fam in zip(axes, families):
        pts, col = _lr_points(inputs, fam)
        ax.set_title(fam)
        ax.set_xlabel("epochs" if col == "epochs" else "images seen")
        ax.set_ylabel("optimal peak learning rate")
        if len(pts) == 0:
            ax.text(0.5, 0.5, "no model and duration with >= 2 learning rates", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            continue
        any_points = True
        norm = LogNorm(pts["params"].min() / 1.5, pts["params"].max() * 1.5)
        cmap = colormaps["viridis"]
        trend = inputs.fit.families[fam].lr_trend if inputs.fit is not None and fam in inputs.fit.families else None
        for model, g in pts.sort_values("duration").groupby("model", sort=False):
            color = cmap(norm(g["params"].iloc[0]))
            edge = g["at_edge"].astype(bool).to_numpy()
            ax.plot(g["duration"], g["lr_opt"], "-", color=color, lw=1.2,
                    label=f"{model} ({params_label(g['params'].iloc[0])})")
            ax.scatter(g["duration"][~edge], g["lr_opt"][~edge], color=color, s=28, zorder=3)
            ax.scatter(g["duration"][edge], g["lr_opt"][edge], facecolor="white", edgecolor=color, s=28, zorder=3)
            if trend is not None:
                grid = np.geomspace(g["duration"].min(), g["duration"].max(), 20)
                ax.plot(grid, trend.predict(grid, np.full_like(grid, g["params"].iloc[0])), ":", color=color, lw=1)
        ax.set_xscale("log")
        tidy_log_x(ax)
        ax.set_yscale("log")
        widen_log_limits(ax, "y")
        plain_log_labels(ax.yaxis)
        handles, _ = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", label="optimum at grid edge"))
        if trend is not None:
            handles.append(Line2D([], [], ls=":", color="0.3",
                                  label=f"fit: lr ∝ {col}^{fmt_estimate(trend.slope_duration)}"))
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    if not any_points:
        raise PlotSkipped("no model and duration was run with >= 2 learning rates (no lr sweep)")
    add_caption(fig, "Optimum: vertex of a parabola of loss vs log lr through the best grid lr and its "
                "neighbours; hollow: best lr at the edge of the grid (the true optimum may lie beyond).")
    return fig


def training_curves(inputs: SweepInputs, x: str = "train_flops") -> Figure:
    """(d) train loss of every cell vs training FLOPs (or images seen), held-out losses as points."""
    families = sorted({c.family for c in inputs.curves})
    if not families:
        raise PlotSkipped("no cell has a metrics.jsonl to draw a training curve from")
    fig = Figure(figsize=(5.2 * len(families), 4.2), layout="constrained")
    axes = fig.subplots(1, len(families), sharex=True, sharey=True, squeeze=False)[0]
    cmap = colormaps["viridis"]
    params = [c.params for c in inputs.curves]
    norm = LogNorm(min(params) / 1.5, max(params) * 1.5)
    for ax, fam in zip(axes, families):
        for c in (c for c in inputs.curves if c.family == fam):
            color = cmap(norm(c.params))
            t = c.train[c.train[x] > 0]
            ls = "--" if c.status == "diverged" else "-"
            ax.plot(t[x], t["loss"], ls, color=color, lw=0.8, alpha=0.75)
            h = c.heldout[c.heldout[x] > 0]
            ax.scatter(h[x], h["heldout_loss"], color=color, edgecolor="black", lw=0.4, s=14, zorder=3)
            if c.status == "diverged" and len(t):
                ax.scatter(t[x].iloc[-1:], t["loss"].iloc[-1:], marker="x", color="black", s=30, zorder=4)
        ax.set_xscale("log")
        tidy_log_x(ax)
        ax.set_yscale("log")
        ax.set_title(fam)
        ax.set_xlabel("training compute (FLOPs)" if x == "train_flops" else "images seen")
        handles = [Line2D([], [], color="0.3", lw=1, label="train loss (cell)"),
                   Line2D([], [], ls="", marker="o", mfc="0.6", mec="black", label="held-out loss"),
                   Line2D([], [], ls="--", marker="x", color="black", label="diverged")]
        ax.legend(handles=handles, loc="upper right", framealpha=0.9)
    axes[0].set_ylabel("loss")
    plain_log_labels(axes[0].yaxis)
    sm = fig.colorbar(_mappable(norm, cmap), ax=list(axes), shrink=0.85, pad=0.01)
    sm.set_label("parameters")
    return fig


def _mappable(norm: LogNorm, cmap):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)
