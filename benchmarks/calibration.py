"""Calibration of convscale's intervals and verdicts on studies drawn from known laws.

For each study design the planner offers (IsoFLOP budgets, the paper's epoch grid, an N x D table
from anywhere) this draws many studies from a known law with log-normal run noise, fits each with
``fit_table`` (run-resampled bootstrap), and reports how often each 95 % interval covers the planted
value: the frontier's power-law exponent, the N_opt and D_opt exponents (from the estimate the
Findings read for that design), and the lr slopes. Then the verdict matrix: the Findings' verdicts
for planted-agree, planted-disagree and too-noisy studies.

    python benchmarks/calibration.py                       # 100 studies per design (a few minutes)
    python benchmarks/calibration.py --studies 20 --bootstrap 200   # quick look
    python benchmarks/calibration.py --trunk-noise 0.05 --noise 0.005 --lrs-per-cell 1 --skip-verdicts

``--trunk-noise``: a design as cooldown branches train it (the IsoFLOP design unless ``--designs``
names others). Every budget of one (model, lr)
is a branch of one trunk, so its runs share part of their deviation: each (model, lr) draws a
log-normal offset of this sd, on top of each run's own ``--noise``. The fits' deviations bootstrap
redraws runs' deviations independently; this measures what the shared part does to the coverage.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convscale.scaling import fit_table  # noqa: E402
from convscale.scaling.planted import Law, planted_study  # noqa: E402

# A Chinchilla-shaped law with equal exponents (N_opt, D_opt ~ C^0.5, frontier ~ C^-0.17, E = 0 so
# the frontier is an exact power law) and one whose size grows three times faster than its data.
EQUAL = Law(A=60.0, alpha=0.34, B=400.0, beta=0.34)
SIZE_FAST = Law(A=13.5, alpha=0.2, B=4e4, beta=0.6)
# the equal-rate law above an irreducible loss: the frontier flattens (its local exponent halves
# across the designs' two decades of compute: not a power law there)
BENT = Law(A=60.0, alpha=0.34, B=400.0, beta=0.34, E=3.0)

LAWS = {"equal": EQUAL, "size_fast": SIZE_FAST, "bent": BENT}

DESIGNS = {
    # 5 IsoFLOP budgets over 2 decades, 9 sizes over 2.8 decades, 3 lrs per cell
    "isoflop": dict(sizes=np.geomspace(1e5, 6e7, 9), budgets=np.geomspace(1e15, 1e17, 5)),
    # the paper's grid: 6 models x epochs 0.25-8 (x2), 3 lrs; the grid's diagonal is the planted
    # law's compute-optimal ridge (D_opt / N_opt ~ 265), as a study planned from a pilot would place it
    "epochs": dict(sizes=np.geomspace(1e6, 3.2e7, 6), budgets=2.0 ** np.arange(-2, 4), epoch_images=1e9),
    # a table from anywhere: 6 sizes x 6 data sizes, params/data/loss/flops/lr only
    "nd_grid": dict(sizes=np.geomspace(1e6, 3.2e7, 6), budgets=np.geomspace(2.5e8, 8e9, 6)),
}


def one(law: Law, design: str, noise: float, seed: int, bootstrap: int, seeds: int = 1, trunk_noise: float = 0.0,
        lrs_per_cell: int = 3, sizes: Optional[np.ndarray] = None):
    kw = dict(DESIGNS[design])
    if sizes is not None:
        kw["sizes"] = sizes
    rng = np.random.default_rng(seed)
    df = planted_study(law, design, noise=noise, seeds=seeds, rng=rng, lrs_per_cell=lrs_per_cell, **kw)
    if trunk_noise > 0:
        df = with_trunk_noise(df, trunk_noise, rng)
    fit = fit_table(df, bootstrap=bootstrap, seed=seed)
    return next(iter(fit.families.values()))


def with_trunk_noise(df, sd: float, rng: np.random.Generator):
    """Each (model, lr rank within its cell, seed) -- one trunk of a cooldown-branch study --
    multiplies the loss of all its runs by one log-normal factor of sd ``sd``."""
    by = ["model", "budget"] + (["seed"] if "seed" in df else [])
    rank = df.groupby(by)["lr"].rank(method="first").astype(int)
    trunk = df["model"].astype(str) + "/" + rank.astype(str)
    if "seed" in df:  # every seed trains its own trunk
        trunk = trunk + "/" + df["seed"].astype(str)
    offset = {t: rng.normal(0.0, sd) for t in sorted(trunk.unique())}
    return df.assign(loss=df["loss"] * np.exp(trunk.map(offset).to_numpy()), role="branch")


def covers(est, truth) -> float:
    if est is None or not (np.isfinite(est.low) and np.isfinite(est.high)) or not np.isfinite(truth):
        return np.nan
    return float(est.low <= truth <= est.high)


def calibration(studies: int, bootstrap: int, noise: float, trunk_noise: float = 0.0,
                lrs_per_cell: int = 3, seeds: int = 1, sizes: Optional[np.ndarray] = None,
                designs: Optional[list[str]] = None, law: Law = EQUAL) -> list[list[str]]:
    truth = dict(law.truth())
    if law.E > 0:  # above an irreducible loss the frontier has no single exponent: nothing to cover
        truth["frontier_exponent"] = np.nan
    rows = []
    for design in designs or (["isoflop"] if trunk_noise > 0 else list(DESIGNS)):
        hits: dict[str, list[float]] = {k: [] for k in ("frontier a", "N_opt exp", "D_opt exp", "lr vs epochs",
                                                         "lr vs size")}
        widths: dict[str, list[float]] = {k: [] for k in hits}
        methods: Counter[str] = Counter()  # which allocation method each study used (the fallback included)
        t0 = time.perf_counter()
        for s in range(studies):
            f = one(law, design, noise, s, bootstrap, seeds=seeds, trunk_noise=trunk_noise, lrs_per_cell=lrs_per_cell,
                    sizes=sizes)
            method, n_fit, d_fit = f.allocation()
            methods[method or "none"] += 1
            pairs = {
                "frontier a": (f.power_law.a if f.power_law else None, truth["frontier_exponent"]),
                "N_opt exp": (n_fit.exponent if n_fit else None, truth["n_opt_exponent"]),
                "D_opt exp": (d_fit.exponent if d_fit else None, truth["d_opt_exponent"]),
                "lr vs epochs": (f.lr_trend.slope_duration if f.lr_trend else None, truth["lr_slope_duration"]),
                "lr vs size": (f.lr_trend.slope_params if f.lr_trend else None, truth["lr_slope_params"]),
            }
            for k, (est, t) in pairs.items():
                hits[k].append(covers(est, t))
                if est is not None and np.isfinite(est.high - est.low):
                    widths[k].append(est.high - est.low)
        secs = (time.perf_counter() - t0) / studies
        method = ", ".join(f"{m} {n}" for m, n in methods.most_common())
        for k in hits:
            h = np.array(hits[k])
            ok = np.isfinite(h)
            rows.append([design, k, method if k.endswith("exp") else "", f"{100 * np.nanmean(h):.0f}%" if ok.any() else "-",
                         f"{ok.sum()}/{len(h)}", f"{np.median(widths[k]):.3g}" if widths[k] else "-", f"{secs:.2f}"])
    return rows


def verdicts(studies: int, bootstrap: int, seeds: int = 1, trunk_noise: float = 0.0,
             designs: Optional[list[str]] = None, lrs_per_cell: int = 3) -> list[list[str]]:
    """Findings (1) and (2) verdicts per design for planted-agree, planted-disagree and noisy studies
    (SIZE_FAST's frontier is an exact power law too: (1) should agree there; BENT's allocation grows at
    equal rates: (2) should agree there)."""
    from convscale.report.findings import allocation_verdict, power_law_verdict

    cases = [("agree (equal rates, power law), 1 % noise", EQUAL, 0.01),
             ("disagree (N_opt ~ C^0.75), 1 % noise", SIZE_FAST, 0.01),
             ("bent frontier (E = 3 under losses 4.2-3.5), 0.5 % noise", BENT, 0.005),
             ("too noisy (30 % noise)", EQUAL, 0.30)]
    rows = []
    for design in designs or (["isoflop"] if trunk_noise > 0 else list(DESIGNS)):
        for name, law, noise in cases:
            pl, al = {}, {}
            for s in range(studies):
                f = one(law, design, noise, 1000 + s, bootstrap, seeds=seeds, trunk_noise=trunk_noise,
                        lrs_per_cell=lrs_per_cell)
                v1 = power_law_verdict(f)[0]
                v2 = allocation_verdict(f)[0]
                pl[v1] = pl.get(v1, 0) + 1
                al[v2] = al.get(v2, 0) + 1
            fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
            rows.append([design, name, fmt(pl), fmt(al)])
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=400)
    p.add_argument("--noise", type=float, default=0.02, help="log-normal sd of a run's loss (default 0.02)")
    p.add_argument("--trunk-noise", type=float, default=0.0,
                   help="log-normal sd shared by every run of one (model, lr): cooldown branches of one trunk "
                        "(default 0)")
    p.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=None,
                   help="designs to measure (default: all; only isoflop with --trunk-noise)")
    p.add_argument("--lrs-per-cell", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1, help="runs per (model, budget, lr) cell, each with its own noise")
    p.add_argument("--sizes", type=int, default=None,
                   help="model sizes, trained at every budget (default: each design's own ladder)")
    p.add_argument("--size-range", type=float, nargs=2, default=(3e5, 2e7), metavar=("LO", "HI"),
                   help="parameters of the smallest and largest size with --sizes (default 3e5 2e7: brackets "
                        "the planted law's N_opt 8e5-8e6 in the IsoFLOP budgets)")
    p.add_argument("--law", choices=list(LAWS), default="equal",
                   help="the planted law of the coverage table (equal: default; size_fast: N_opt ~ C^0.75; "
                        "bent: equal rates above E = 3, the frontier not a power law, so its a is not scored)")
    p.add_argument("--verdict-studies", type=int, default=20)
    p.add_argument("--skip-verdicts", action="store_true")
    p.add_argument("--skip-coverage", action="store_true")
    a = p.parse_args()
    if a.trunk_noise > 0 and a.designs and "nd_grid" in a.designs:
        p.error("--trunk-noise plants cooldown branches, which a planned study has and a table from anywhere "
                "(nd_grid) does not: use --designs isoflop epochs")
    sizes = np.geomspace(*a.size_range, a.sizes) if a.sizes else None
    cpu = subprocess.run("grep -o 'avx512_bf16\\|amx' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip() or "AVX2 only"
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU: {cpu}")
    print(f"# {a.studies} studies per design, {a.bootstrap} resamples, noise {a.noise}, trunk noise {a.trunk_noise}, "
          f"{a.lrs_per_cell} lr(s) per cell, {a.seeds} seed(s), law {a.law}"
          + (f", {a.sizes} sizes {a.size_range[0]:.3g}-{a.size_range[1]:.3g}" if sizes is not None else ""))
    if not a.skip_coverage:
        print(table(["design", "quantity", "method", "coverage of 95% interval", "studies with an interval",
                     "median width", "s / fit"], calibration(a.studies, a.bootstrap, a.noise, a.trunk_noise, a.lrs_per_cell, a.seeds,
                                                   sizes, a.designs, LAWS[a.law])))
    if not a.skip_verdicts:
        print()
        print(table(["design", "planted", "(1) power law", "(2) same rate"], verdicts(a.verdict_studies, a.bootstrap, a.seeds, a.trunk_noise,
                                                                                   a.designs, a.lrs_per_cell)))


if __name__ == "__main__":
    main()
