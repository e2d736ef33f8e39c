"""Fit everything a scaling study reports, per family, into one JSON-able ``StudyFit``.

An item that a family has too few points for is recorded in ``FamilyFit.skipped`` (item -> the
one-line reason) instead of failing the whole fit; only when nothing at all can be fitted does
``fit_table`` raise UserError. Every family draws one set of run
resamples from a generator seeded by (seed, family), and every item of the family is refitted on
those same replicates; a fit is deterministic under ``seed`` and independent of family order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from convscale.errors import UserError
from convscale.fileio import atomic_write_json, json_clean
from convscale.scaling.design import GRID, ISOFLOP, Replicates, build_points, detect_design, k_of_params, smooth_surface
from convscale.scaling.extrapolate import ExtrapolationCheck, extrapolation_from_replicates
from convscale.scaling.frontier import METHOD_TEXT as FRONTIER_TEXT
from convscale.scaling.frontier import (
    MIN_INTERIOR_POINTS,
    frontier_mask,
    frontier_method,
    frontier_records,
    frontier_table,
    interior_points,
)
from convscale.scaling.optimal import (
    MIN_BUDGETS,
    AllocationFit,
    LrTrendFit,
    allocation_fit,
    frontier_run_samples,
    lr_trend_from_replicates,
    parabola_samples,
    parabola_vertices,
)
from convscale.scaling.parametric import ParametricFit, parametric_from_replicates
from convscale.scaling.powerlaw import PowerLawFit, power_law_from_replicates
from convscale.scaling.robust import DEFAULT_LEVEL, estimate, single_threaded_blas
from convscale.scaling.table import RESULTS_FILES, flops_per_param_sample, load_results, prepare_table
from convscale.serde import Serde

DEFAULT_BOOTSTRAP = 1000
FIT_VERSION = 2  # fit.json layout: 2 = run-resampled intervals with their samples


def source_digest(package_dir: str | Path) -> str:
    """16 hex digits of sha256 over the names and bytes of the ``*.py`` files in ``package_dir``."""
    h = hashlib.sha256()
    for src in sorted(Path(package_dir).glob("*.py")):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def analysis_fingerprint() -> str:
    """The ``source_digest`` of the analysis code (every module of ``convscale.scaling``): a fit.json
    written by other analysis code than the installed one is refitted, never reused as if current."""
    return source_digest(Path(__file__).parent)

# the optional fits of a family (field name -> result class), in report order
_ITEMS: dict[str, type] = {
    "power_law": PowerLawFit,
    "power_law_irreducible": PowerLawFit,
    "optimal_params_frontier_runs": AllocationFit,
    "optimal_images_frontier_runs": AllocationFit,
    "optimal_params_parabola": AllocationFit,
    "optimal_images_parabola": AllocationFit,
    "optimal_params_parametric": AllocationFit,
    "optimal_images_parametric": AllocationFit,
    "lr_trend": LrTrendFit,
    "parametric": ParametricFit,
    "extrapolation": ExtrapolationCheck,
    "extrapolation_irreducible": ExtrapolationCheck,
}

#: the compute-optimal estimate the Findings read, per design, in order of preference
ALLOCATION_PREFERENCE = {ISOFLOP: ("parabola", "parametric", "frontier_runs"),
                         GRID: ("parametric", "frontier_runs")}
INTERVAL_FALLBACK = ("parabola", "parametric")  # the methods that may stand in for one without an interval
ALLOCATION_TEXT = {
    "parabola": "IsoFLOP parabola vertices (approach 2)",
    "parametric": "IsoFLOP slices of the fitted L(N, D) (approach 3)",
    "frontier_runs": "the frontier runs (approach 1)",
}
SIZE_CONVENTIONS = ("params", "params_without_head")
RESAMPLING_TEXT = {
    "seeds": "each run's deviation from its cell's seed mean (drawn from its model's deviations)",
    "deviations": "each run's deviation from a smooth surface (per-budget parabolas or L(N, D)), the design kept",
    "runs": "runs within budgets",
}


@dataclasses.dataclass
class FamilyFit(Serde):
    """All fits of one family. A None item has its reason in ``skipped[item]``.

    ``design``: isoflop | grid (see ``scaling.design``); ``frontier_method``: budget | pareto.
    ``frontier`` rows: compute_flops, loss, params, images_seen, train_flops, lr, epochs, model,
    top1, runs_in_budget (sorted by compute). ``samples``: per item, the bootstrap replicates' rows
    (power laws: log A, a[, log E]; allocations: log coef, exponent; lr_trend: its coefficients;
    parametric: e, a, b, alpha, beta), all from the same resamples of runs.
    """

    family: str
    n_runs: int
    n_done: int
    flops_per_param_sample: float  # median k in C = k*N*D (each model's own k is used where it matters)
    frontier_method: str
    frontier: list[dict[str, Any]]
    design: str = GRID
    resampling: str = "runs"  # see RESAMPLING_TEXT
    size_convention: str = "params"
    chance_loss: float | None = None  # ln(classes) where the table records it
    level: float = DEFAULT_LEVEL
    #: which frontier points the power laws were fitted to: "interior" (runs at the edge of the sweep's
    #: sizes or data sizes left out: they only bound the envelope) or "all" (too few interior ones)
    frontier_law_points: str = "all"
    frontier_interior_points: int = 0  # frontier runs inside the swept sizes (and data sizes, on a grid)
    power_law: PowerLawFit | None = None
    power_law_irreducible: PowerLawFit | None = None
    optimal_params_frontier_runs: AllocationFit | None = None
    optimal_images_frontier_runs: AllocationFit | None = None
    optimal_params_parabola: AllocationFit | None = None
    optimal_images_parabola: AllocationFit | None = None
    optimal_params_parametric: AllocationFit | None = None
    optimal_images_parametric: AllocationFit | None = None
    lr_trend: LrTrendFit | None = None
    parametric: ParametricFit | None = None
    extrapolation: ExtrapolationCheck | None = None
    extrapolation_irreducible: ExtrapolationCheck | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)

    def fitted_items(self) -> list[str]:
        return [k for k in _ITEMS if getattr(self, k) is not None]

    def allocation(self) -> tuple[str, AllocationFit | None, AllocationFit | None]:
        """The compute-optimal (method, params fit, images fit) valid for the design that was fitted:
        the first method of ``INTERVAL_FALLBACK`` in ``ALLOCATION_PREFERENCE`` order whose exponents
        both have an interval, else the first that was fitted at all (the first method is returned
        when none was). A method whose optimum was not found in too many resamples (no interval)
        gives way to the next one (the frontier runs never stand in: not calibrated), except
        where runs are redrawn within budgets (no smooth surface to redraw deviations from): there
        the next method's interval is not to be trusted (4-model cooldown-branch studies: L(N, D)'s
        N_opt interval covered 70 % of 100 planted studies; with 5, 6 and 9 models, redrawn from the
        surface, 97-99 %; benchmarks/RESULTS.md)."""
        prefs = ALLOCATION_PREFERENCE.get(self.design, ALLOCATION_PREFERENCE[GRID])
        fitted = [(m, getattr(self, f"optimal_params_{m}"), getattr(self, f"optimal_images_{m}")) for m in prefs]
        fitted = [(m, n, d) for m, n, d in fitted if n is not None and d is not None]
        if not fitted:
            return prefs[0], None, None
        if self.resampling == "runs":
            return fitted[0]
        # only between the methods whose stand-in was calibrated (the frontier runs' interval was not)
        with_interval = [f for f in fitted if f[0] in INTERVAL_FALLBACK
                         and all(np.isfinite([e.exponent.low, e.exponent.high]).all() for e in f[1:])]
        return (with_interval or fitted)[0]

    def sample_array(self, item: str) -> np.ndarray:
        """The bootstrap samples of ``item`` as an array (0 rows when there are none)."""
        rows = self.samples.get(item) or []
        if not rows:
            return np.empty((0, 0))
        return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)


@dataclasses.dataclass
class StudyFit(Serde):
    """The whole fit: run counts, how compute was measured, and one ``FamilyFit`` per family."""

    n_runs: int
    status_counts: dict[str, int]
    compute_source: str  # train_flops | flops | 3*flops_per_image*images_seen | 6*N*D
    bootstrap: int
    seed: int
    level: float
    notes: list[str]
    families: dict[str, FamilyFit]
    version: int = FIT_VERSION
    analysis: str = ""  # analysis_fingerprint() of the code that fitted it ("" = written before it was kept)

    @classmethod
    def serde_read(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("version") != FIT_VERSION:
            raise ValueError(f"fit.json version {d.get('version')} is not {FIT_VERSION}")
        return d


def _rng(seed: int, family: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process
    return np.random.default_rng([seed, zlib.crc32(family.encode())])


def _rows(a: np.ndarray) -> list[list[float]]:
    return json_clean(np.atleast_2d(np.asarray(a, dtype=float))) if np.size(a) else []


def _fit_family(
    family: str, runs: pd.DataFrame, n_runs: int, bootstrap: int, seed: int, level: float,
    diverged: pd.DataFrame | None = None, design: str | None = None, size_convention: str = "params",
) -> FamilyFit:
    design = detect_design(runs, design)
    if size_convention != "params":
        if runs[size_convention].isna().any():
            raise UserError(f"size convention {size_convention!r} needs a {size_convention} column for every run; "
                            "re-collect the sweep (`convscale sweep collect`) or use --params params")
        runs = runs.assign(params=runs[size_convention])
    points = build_points(runs, design, diverged)
    rows = frontier_table(points, runs)
    chance = runs["chance_loss"].dropna()
    fam = FamilyFit(
        family=family,
        n_runs=n_runs,
        n_done=int(len(runs)),
        flops_per_param_sample=flops_per_param_sample(runs),
        frontier_method=frontier_method(design),
        frontier=frontier_records(rows),
        design=design,
        resampling=points.resampling,  # "deviations" set below when the surface serves
        size_convention=size_convention,
        chance_loss=float(chance.median()) if len(chance) else None,
        level=level,
    )
    rng = _rng(seed, family)
    surface = smooth_surface(points) if points.resampling == "runs" else None
    reps = points.replicates(bootstrap, rng, surface, level) if bootstrap > 0 else Replicates(
        np.empty((0, points.n)), np.empty((0, points.n)), None)
    if reps.centred:
        fam.resampling = "deviations"
    log_l = np.log(points.loss)
    log_l_rep = np.log(reps.loss)
    f_hat = frontier_mask(points, np.ones((1, points.n)), points.loss[None, :])[0]
    f_rep = frontier_mask(points, reps.weights, reps.loss) if bootstrap > 0 else np.zeros((0, points.n), bool)
    # the laws of the frontier: its interior points (a run at the edge of the sweep only bounds the
    # envelope), or all of it when fewer than MIN_INTERIOR_POINTS are interior
    inside = interior_points(points)
    fam.frontier_interior_points = int((f_hat & inside).sum())
    if (f_hat & inside).sum() >= MIN_INTERIOR_POINTS:
        law_hat, law_rep = f_hat & inside, f_rep & inside[None, :]
        fam.frontier_law_points = "interior"
    else:
        law_hat, law_rep = f_hat, f_rep
        fam.frontier_law_points = "all"
    k_of_n = k_of_params(points)

    def attempt(item: str, make: Callable[[], Any]) -> None:
        try:
            out = make()
        except UserError as e:
            fam.skipped[item] = str(e)
            return
        fit, samples = out if isinstance(out, tuple) else (out, None)
        setattr(fam, item, fit)
        if samples is not None and np.size(samples):
            fam.samples[item] = _rows(samples)

    for item, irreducible in (("power_law", False), ("power_law_irreducible", True)):
        attempt(item, lambda irr=irreducible: power_law_from_replicates(
            points.compute, log_l, law_hat, log_l_rep, law_rep, irreducible=irr, level=level, recentre=reps.recentre))
    # approach 1: the frontier runs' N and D against their compute
    log_d_pts = np.log(points.images)
    for quantity, values, col in (("params", np.log(points.params), "params"), ("images", log_d_pts, "images_seen")):
        attempt(f"optimal_{quantity}_frontier_runs", lambda values=values, col=col: allocation_fit(
            col, "frontier_runs", points.compute[f_hat], np.exp(values[f_hat]),
            frontier_run_samples(points, f_rep, values), level, reps.recentre))
    # approach 2: IsoFLOP parabolas, only where budgets were planned
    if design != ISOFLOP:
        for q in ("params", "images"):
            fam.skipped[f"optimal_{q}_parabola"] = (
                f"IsoFLOP parabolas need planned IsoFLOP budgets; this is a {design} design "
                "(the parametric L(N, D) and the frontier runs serve it)")
    else:
        n_hat, d_hat = parabola_vertices(points, np.ones((1, points.n)), points.loss[None, :], k_of_n)
        budgets = np.unique(points.stratum)
        log_c_b = np.log(np.array([points.compute[points.stratum == s][0] for s in budgets]))
        ok = np.isfinite(n_hat[0])
        if ok.sum() < MIN_BUDGETS:
            for q in ("params", "images"):
                fam.skipped[f"optimal_{q}_parabola"] = (
                    f"IsoFLOP parabolas found an interior optimum at {int(ok.sum())} budget(s), need >= {MIN_BUDGETS}: "
                    "sweep >= 3 model sizes per budget that bracket the best one")
        else:
            n_rep, d_rep = parabola_vertices(points, reps.weights, reps.loss, k_of_n) if bootstrap > 0 else (
                np.empty((0, len(budgets))), np.empty((0, len(budgets))))
            n_s, d_s = parabola_samples(log_c_b, n_rep, d_rep)
            for q, col, vals, smp in (("params", "params", n_hat[0], n_s), ("images", "images_seen", d_hat[0], d_s)):
                attempt(f"optimal_{q}_parabola", lambda col=col, vals=vals, smp=smp: allocation_fit(
                    col, "parabola", np.exp(log_c_b[ok]), np.exp(vals[ok]), smp, level, reps.recentre))
    attempt("lr_trend", lambda: lr_trend_from_replicates(points, reps if bootstrap > 0 else None, level))
    attempt("parametric", lambda: parametric_from_replicates(points, reps if bootstrap > 0 else None, level=level))
    if fam.parametric is not None:
        _parametric_allocations(fam, points, level)
    else:
        for q in ("params", "images"):
            fam.skipped[f"optimal_{q}_parametric"] = "no parametric L(N, D) fitted: " + fam.skipped.get("parametric", "")
    for item, irreducible in (("extrapolation", False), ("extrapolation_irreducible", True)):
        attempt(item, lambda irr=irreducible: extrapolation_from_replicates(
            points.compute, log_l, law_hat, log_l_rep, law_rep, irreducible=irr, level=level, recentre=reps.recentre))
    return fam


def _parametric_allocations(fam: FamilyFit, points, level: float) -> None:
    """N_opt(C) and D_opt(C) of the parametric surface as AllocationFits (same samples)."""
    p = fam.parametric
    s = fam.sample_array("parametric")
    c = np.geomspace(points.compute.min(), points.compute.max(), 5)
    if len(s):
        from convscale.scaling.design import k_of_params
        from convscale.scaling.parametric import ISO_SLICES, closed_form_allocation, iso_slice_allocation

        if p.allocation_method.startswith("closed"):
            a = closed_form_allocation(s, p.flops_per_param_sample)
            n_s, d_s = a[:, [2, 1]], a[:, [4, 3]]
        else:
            log_c = np.linspace(np.log(points.compute.min()), np.log(points.compute.max()), ISO_SLICES)
            a = iso_slice_allocation(s, k_of_params(points), log_c,
                                     (float(np.log(points.params).min()), float(np.log(points.params).max())))
            n_s, d_s = a[:, [0, 1]], a[:, [2, 3]]
    else:
        n_s = d_s = np.empty((0, 2))
    for q, col, coef, exp_, smp in (("params", "params", p.n_opt_coef, p.n_opt_exponent, n_s),
                                    ("images", "images_seen", p.d_opt_coef, p.d_opt_exponent, d_s)):
        fam.samples[f"optimal_{q}_parametric"] = _rows(smp)
        with np.errstate(over="ignore"):  # a refit at an exponent bound: an unbounded coefficient
            coef_samples = np.exp(smp[:, 0]) if len(smp) else smp
        setattr(fam, f"optimal_{q}_parametric", AllocationFit(
            quantity=col, method="parametric", coef=estimate(coef.value, coef_samples, level),
            exponent=estimate(exp_.value, smp[:, 1] if len(smp) else smp, level), n_points=p.n_points,
            points=[{"compute_flops": float(x), "value": float(coef.value * x**exp_.value)} for x in c]))


@single_threaded_blas
def fit_table(
    df: pd.DataFrame, *, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = DEFAULT_LEVEL,
    design: str | None = None, size_convention: str = "params",
) -> StudyFit:
    """Fit every family of a results table (see ``convscale.scaling.table`` for the columns).

    ``design``: isoflop | grid to override the detected design; ``size_convention``: count N as
    ``params`` (all parameters) or ``params_without_head`` (without the classifier)."""
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0; got {bootstrap}")
    if not 0 < level < 1:
        raise UserError(f"the interval level must be in (0, 1); got {level}")
    if size_convention not in SIZE_CONVENTIONS:
        raise UserError(f"the size convention must be one of {', '.join(SIZE_CONVENTIONS)}; got {size_convention!r}")
    table = prepare_table(df)
    families = {}
    div = table.diverged
    for family, runs in table.done.groupby("family", sort=True):
        families[str(family)] = _fit_family(
            str(family), runs.reset_index(drop=True), table.runs_per_family[str(family)], bootstrap, seed, level,
            diverged=div[div["family"] == family] if len(div) else None, design=design,
            size_convention=size_convention,
        )
    if not any(f.fitted_items() for f in families.values()):
        first = next(iter(families.values()))
        raise UserError(first.skipped.get("power_law") or next(iter(first.skipped.values())))
    notes = list(table.notes)
    ks = {name: f.flops_per_param_sample for name, f in families.items()}
    ks_text = ", ".join(f"{n}={v:.3g}" for n, v in ks.items())
    notes.append(f"k in C = k*N*D (median train_flops/(params*images_seen)): {ks_text}; "
                 "allocations use each model's own k")
    for name, f in families.items():
        notes.append(f"{name}: {f.design} design, frontier = {FRONTIER_TEXT[f.frontier_method]}; intervals from "
                     f"{bootstrap} resamples of {RESAMPLING_TEXT[f.resampling]}")
    return StudyFit(
        n_runs=table.n_runs,
        status_counts=table.status_counts,
        compute_source=table.compute_source,
        bootstrap=int(bootstrap),
        seed=int(seed),
        level=float(level),
        notes=notes,
        families=families,
        analysis=analysis_fingerprint(),
    )


def fit_results(path: str | Path, **kwargs: Any) -> StudyFit:
    """``fit_table`` on a results file or sweep directory (see ``load_results``)."""
    return fit_table(load_results(path), **kwargs)


FIT_FILE = "fit.json"


def write_fit(path: str | Path, fit: StudyFit) -> Path:
    """Write ``fit`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"directory {target.parent} does not exist; create it or choose another path for the fit")
    return atomic_write_json(target, fit.to_dict(), indent=1, sort_keys=False, allow_nan=False)


def read_fit(path: str | Path) -> StudyFit | None:
    """The StudyFit in ``path``; None when it is missing, unreadable or of another layout version."""
    import json

    try:
        return StudyFit.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, UserError):
        return None


def sweep_fit(sweep_dir: str | Path, *, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, refit: bool = False,
              **kwargs: Any) -> tuple[StudyFit, str]:
    """The one fit of a sweep directory: ``SWEEP/fit.json`` when it is newer than the results table
    and was written by the installed analysis code (``analysis_fingerprint``), else a new fit
    (``bootstrap``, ``seed``, ``kwargs`` of ``fit_table``) written there. Returns the fit and where
    it came from ("fit.json" | "fitted"). Every stage after ``fit`` reads this file."""
    root = Path(sweep_dir)
    results = next((root / n for n in RESULTS_FILES if (root / n).is_file()), None)
    if results is None:
        raise UserError(f"{root} holds no results.parquet or results.csv; run `convscale sweep run` first")
    path = root / FIT_FILE
    if not refit and path.is_file() and path.stat().st_mtime >= results.stat().st_mtime:
        fit = read_fit(path)
        if fit is not None and fit.analysis == analysis_fingerprint():
            return fit, "fit.json"
    fit = fit_table(load_results(results), bootstrap=bootstrap, seed=seed, **kwargs)
    try:
        write_fit(path, fit)
    except OSError:
        pass  # a read-only sweep directory still gets its report; the fit is just not kept
    return fit, "fitted"


def _g(x: float) -> str:
    # round-off (1e-16 slopes from exactly flat data) prints as 0
    return f"{0.0 if abs(x) < 1e-10 else x:.3g}"


def _iv(e: Any) -> str:
    return f"[{_g(e.low)}, {_g(e.high)}]" if np.isfinite(e.low) and np.isfinite(e.high) else "[no interval]"


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
            f"{name}: {f.n_done}/{f.n_runs} runs fitted, {f.design} design, frontier of {len(f.frontier)} points "
            f"({FRONTIER_TEXT[f.frontier_method]}); laws fitted to its {f.frontier_law_points} points"
        )
        if f.power_law:
            p = f.power_law
            curv = f", curvature {_g(p.curvature.value)} in {_iv(p.curvature)}" if p.curvature else ""
            lines.append(f"{name}: {p.equation()} (a in {_iv(p.a)}, R^2 log {p.r2_log:.3f}{curv})")
        if f.power_law_irreducible:
            p = f.power_law_irreducible
            lines.append(f"{name}: {p.equation()} (E in {_iv(p.E)}, a in {_iv(p.a)})")
        for method in ("frontier_runs", "parabola", "parametric"):
            for a in (getattr(f, f"optimal_params_{method}"), getattr(f, f"optimal_images_{method}")):
                if a:
                    sym = "N_opt" if a.quantity == "params" else "D_opt"
                    lines.append(
                        f"{name}: {sym} ~ C^{_g(a.exponent.value)} (in {_iv(a.exponent)}; "
                        f"{ALLOCATION_TEXT[a.method]}, {a.n_points} points)"
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
