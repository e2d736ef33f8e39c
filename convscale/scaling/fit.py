"""Fit everything a scaling study reports, per family, into one JSON-able ``StudyFit``.

An item that a family has too few points for is recorded in ``FamilyFit.skipped`` (item -> the
one-line reason) instead of failing the whole fit; only when nothing at all can be fitted does
``fit_table`` raise UserError. Every random draw comes from a generator seeded by
(seed, family, item), so a fit is deterministic under ``seed`` and independent of family order.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.scaling.extrapolate import ExtrapolationCheck, extrapolation_check
from convscale.scaling.frontier import budget_groups, frontier, frontier_records
from convscale.scaling.optimal import AllocationFit, LrTrendFit, fit_allocation, fit_lr_trend, isoflop_optima
from convscale.scaling.parametric import ParametricFit, fit_parametric
from convscale.scaling.powerlaw import PowerLawFit, fit_power_law
from convscale.scaling.robust import DEFAULT_LEVEL, json_clean, single_threaded_blas
from convscale.scaling.table import flops_per_param_sample, load_results, prepare_table

DEFAULT_BOOTSTRAP = 200

# the optional fits of a family (field name -> result class), in report order
_ITEMS: dict[str, type] = {
    "power_law": PowerLawFit,
    "power_law_irreducible": PowerLawFit,
    "optimal_params_best_run": AllocationFit,
    "optimal_images_best_run": AllocationFit,
    "optimal_params_parabola": AllocationFit,
    "optimal_images_parabola": AllocationFit,
    "lr_trend": LrTrendFit,
    "parametric": ParametricFit,
    "extrapolation": ExtrapolationCheck,
    "extrapolation_irreducible": ExtrapolationCheck,
}


@dataclasses.dataclass
class FamilyFit:
    """All fits of one family. A None item has its reason in ``skipped[item]``.

    ``frontier`` rows: compute_flops, loss, params, images_seen, train_flops, lr, epochs, model,
    top1, runs_in_budget (sorted by compute). ``frontier_method``: budget_flops | flops_bins | pareto.
    """

    family: str
    n_runs: int
    n_done: int
    flops_per_param_sample: float  # k in C = k*N*D (median over the family's done runs)
    frontier_method: str
    frontier: list[dict[str, Any]]
    power_law: PowerLawFit | None = None
    power_law_irreducible: PowerLawFit | None = None
    optimal_params_best_run: AllocationFit | None = None
    optimal_images_best_run: AllocationFit | None = None
    optimal_params_parabola: AllocationFit | None = None
    optimal_images_parabola: AllocationFit | None = None
    lr_trend: LrTrendFit | None = None
    parametric: ParametricFit | None = None
    extrapolation: ExtrapolationCheck | None = None
    extrapolation_irreducible: ExtrapolationCheck | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def fitted_items(self) -> list[str]:
        return [k for k in _ITEMS if getattr(self, k) is not None]

    def allocation(self) -> tuple[str, AllocationFit | None, AllocationFit | None]:
        """The compute-optimal (method, params fit, images fit) to read: IsoFLOP parabola vertices
        where they were fitted, else the best run of each budget."""
        method = "parabola" if self.optimal_params_parabola is not None else "best_run"
        return method, getattr(self, f"optimal_params_{method}"), getattr(self, f"optimal_images_{method}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in _ITEMS:
            d[k] = None if d[k] is None else d[k].to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FamilyFit":
        kw = dict(d)
        for k, typ in _ITEMS.items():
            kw[k] = None if d.get(k) is None else typ.from_dict(d[k])
        return cls(**kw)


@dataclasses.dataclass
class StudyFit:
    """The whole fit: run counts, how compute was measured, and one ``FamilyFit`` per family."""

    n_runs: int
    status_counts: dict[str, int]
    compute_source: str  # train_flops | flops | 3*flops_per_image*images_seen | 6*N*D
    bootstrap: int
    seed: int
    level: float
    notes: list[str]
    families: dict[str, FamilyFit]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["families"] = {k: v.to_dict() for k, v in self.families.items()}
        return json_clean(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudyFit":
        return cls(**{**d, "families": {k: FamilyFit.from_dict(v) for k, v in d["families"].items()}})


def _rng(seed: int, family: str, item: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process
    return np.random.default_rng([seed, zlib.crc32(family.encode()), zlib.crc32(item.encode())])


def _fit_family(
    family: str, runs: pd.DataFrame, n_runs: int, bootstrap: int, seed: int, level: float,
    diverged: pd.DataFrame | None = None,
) -> FamilyFit:
    k = flops_per_param_sample(runs)
    rows, method = frontier(runs)
    fam = FamilyFit(
        family=family,
        n_runs=n_runs,
        n_done=int(len(runs)),
        flops_per_param_sample=k,
        frontier_method=method,
        frontier=frontier_records(rows),
    )
    c, loss = rows["compute_flops"].to_numpy(), rows["loss"].to_numpy()
    common = {"bootstrap_count": bootstrap, "level": level}

    def attempt(item: str, make: Callable[[np.random.Generator], Any]) -> None:
        try:
            setattr(fam, item, make(_rng(seed, family, item)))
        except UserError as e:
            fam.skipped[item] = str(e)

    attempt("power_law", lambda r: fit_power_law(c, loss, irreducible=False, rng=r, **common))
    attempt("power_law_irreducible", lambda r: fit_power_law(c, loss, irreducible=True, rng=r, **common))
    for quantity, col in (("params", "params"), ("images", "images_seen")):
        attempt(
            f"optimal_{quantity}_best_run",
            lambda r, col=col: fit_allocation(
                c, rows[col].to_numpy(), quantity=col, method="best_run", rng=r, **common
            ),
        )
    budgets, _ = budget_groups(runs)
    iso = isoflop_optima(runs, budgets, k)
    for quantity, col, target in (("params", "params_opt", "params"), ("images", "images_opt", "images_seen")):
        item = f"optimal_{quantity}_parabola"
        if method == "pareto":
            fam.skipped[item] = (
                "no compute budgets to group runs by (pareto frontier); IsoFLOP parabolas need >= 3 sizes per budget"
            )
            continue
        if len(iso) < 3:
            fam.skipped[item] = (
                f"IsoFLOP parabolas found an interior optimum at {len(iso)} budget(s), need >= 3: "
                "sweep >= 3 model sizes per budget that bracket the best one"
            )
            continue
        attempt(
            item,
            lambda r, col=col, target=target: fit_allocation(
                iso["compute_flops"].to_numpy(),
                iso[col].to_numpy(),
                quantity=target,
                method="parabola",
                rng=r,
                **common,
            ),
        )
    attempt("lr_trend", lambda r: fit_lr_trend(runs, diverged=diverged, rng=r, **common))
    attempt("parametric", lambda r: fit_parametric(runs, flops_per_param_sample=k, rng=r, **common))
    attempt("extrapolation", lambda r: extrapolation_check(c, loss, irreducible=False, rng=r, **common))
    attempt("extrapolation_irreducible", lambda r: extrapolation_check(c, loss, irreducible=True, rng=r, **common))
    return fam


@single_threaded_blas
def fit_table(
    df: pd.DataFrame, *, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL
) -> StudyFit:
    """Fit every family of a results table (see ``convscale.scaling.table`` for the columns)."""
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0; got {bootstrap}")
    if not 0 < level < 1:
        raise UserError(f"the interval level must be in (0, 1); got {level}")
    table = prepare_table(df)
    families = {}
    div = table.diverged
    for family, runs in table.done.groupby("family", sort=True):
        families[str(family)] = _fit_family(
            str(family), runs.reset_index(drop=True), table.runs_per_family[str(family)], bootstrap, seed, level,
            diverged=div[div["family"] == family] if len(div) else None,
        )
    if not any(f.fitted_items() for f in families.values()):
        first = next(iter(families.values()))
        raise UserError(first.skipped.get("power_law") or next(iter(first.skipped.values())))
    notes = list(table.notes)
    ks = {name: f.flops_per_param_sample for name, f in families.items()}
    ks_text = ", ".join(f"{n}={v:.3g}" for n, v in ks.items())
    notes.append(f"k in C = k*N*D (median train_flops/(params*images_seen)): {ks_text}")
    return StudyFit(
        n_runs=table.n_runs,
        status_counts=table.status_counts,
        compute_source=table.compute_source,
        bootstrap=int(bootstrap),
        seed=int(seed),
        level=float(level),
        notes=notes,
        families=families,
    )


def fit_results(path: str | Path, **kwargs: Any) -> StudyFit:
    """``fit_table`` on a results file or sweep directory (see ``load_results``)."""
    return fit_table(load_results(path), **kwargs)


def _g(x: float) -> str:
    # round-off (1e-16 slopes from exactly flat data) prints as 0
    return f"{0.0 if abs(x) < 1e-10 else x:.3g}"


def _iv(e: Any) -> str:
    return f"[{_g(e.low)}, {_g(e.high)}]" if np.isfinite(e.low) and np.isfinite(e.high) else "[no bootstrap]"


def format_text(fit: StudyFit) -> str:
    """A compact human-readable summary, one block per family."""
    pct = f"{100 * fit.level:g}%"
    counts = ", ".join(f"{v} {k}" for k, v in fit.status_counts.items())
    lines = [
        f"{fit.n_runs} runs ({counts}); compute from {fit.compute_source}; "
        f"{pct} bootstrap intervals ({fit.bootstrap} resamples)"
    ]
    lines += [f"note: {n}" for n in fit.notes]
    for name, f in fit.families.items():
        lines.append("")
        lines.append(
            f"{name}: {f.n_done}/{f.n_runs} runs fitted, frontier of {len(f.frontier)} points ({f.frontier_method})"
        )
        if f.power_law:
            p = f.power_law
            lines.append(f"{name}: {p.equation()} (a in {_iv(p.a)}, R^2 log {p.r2_log:.3f})")
        if f.power_law_irreducible:
            p = f.power_law_irreducible
            lines.append(f"{name}: {p.equation()} (E in {_iv(p.E)}, a in {_iv(p.a)})")
        for method in ("best_run", "parabola"):
            for a in (getattr(f, f"optimal_params_{method}"), getattr(f, f"optimal_images_{method}")):
                if a:
                    sym = "N_opt" if a.quantity == "params" else "D_opt"
                    lines.append(
                        f"{name}: {sym} ~ C^{_g(a.exponent.value)} (in {_iv(a.exponent)}; "
                        f"{a.method}, {a.n_points} budgets)"
                    )
        if f.lr_trend:
            t = f.lr_trend
            s = f"{name}: log lr_opt = {_g(t.intercept.value)} + {_g(t.slope_duration.value)} log {t.duration_column}"
            s += f" (in {_iv(t.slope_duration)}, {t.sign_duration})"
            if t.slope_params:
                s += f" + {_g(t.slope_params.value)} log N (in {_iv(t.slope_params)}, {t.sign_params})"
            lines.append(s + f"; {t.n_at_grid_edge} of {t.n_points} optima at the edge of their lr grid")
        if f.parametric:
            p = f.parametric
            lines.append(f"{name}: {p.equation()} (alpha in {_iv(p.alpha)}, beta in {_iv(p.beta)})")
            lines.append(
                f"{name}:   N_opt ~ C^{p.n_opt_exponent.value:.3g} (in {_iv(p.n_opt_exponent)}), "
                f"D_opt ~ C^{p.d_opt_exponent.value:.3g} (in {_iv(p.d_opt_exponent)}), "
                f"k = {p.flops_per_param_sample:.3g}"
            )
        for item in ("extrapolation", "extrapolation_irreducible"):
            x = getattr(f, item)
            if x:
                lines.append(
                    f"{name}: extrapolation ({x.form}) to C={x.held_out_compute_flops:.3g}: "
                    f"predicted {x.predicted.value:.4g}"
                    f" {_iv(x.predicted)}, actual {x.actual_loss:.4g}, error {100 * x.relative_error:+.1f}%"
                )
        for item, reason in f.skipped.items():
            lines.append(f"{name}: {item} not fitted: {reason}")
    return "\n".join(lines)
