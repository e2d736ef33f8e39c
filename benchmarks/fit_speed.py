"""Speed of the fits: batched replicate refits against a plain per-replicate scipy loop, same run.

1. The parametric L(N, D) = E + A/N^alpha + B/D^beta on 240 runs (a planted 8 x 6 grid x 5 lrs:
   48 tuned points) with 1000 resamples: convscale's batched Levenberg-Marquardt over all replicates
   at once, warm-started at the full-data fit, against the reference: one scipy L-BFGS-B refit per
   replicate from the same warm start (plus the best grid start, as convscale did before).
2. The whole fit (`fit_table`, every item of every family, 1000 resamples) of a 160-run IsoFLOP
   sweep (2 families x 5 budgets x 4 sizes x 4 lrs), in process and as `convscale fit`.

    python benchmarks/fit_speed.py [--reference-replicates 100]

The reference is timed on --reference-replicates refits and scaled to 1000 (it is linear in them).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convscale.scaling import fit_table  # noqa: E402
from convscale.scaling.design import build_points, detect_design, smooth_surface  # noqa: E402
from convscale.scaling.parametric import (  # noqa: E402
    _BOUNDS, _objective, _screen_grid, parametric_from_replicates, point_fit,
)
from convscale.scaling.planted import Law, planted_study  # noqa: E402
from convscale.scaling.robust import minimize_multistart, single_threaded_blas  # noqa: E402
from convscale.scaling.table import prepare_table  # noqa: E402

LAW = Law(A=60.0, alpha=0.34, B=400.0, beta=0.28, E=0.5)


def grid_240() -> pd.DataFrame:
    return planted_study(LAW, "epochs", sizes=np.geomspace(1e6, 6e7, 8), budgets=2.0 ** np.arange(-2, 4),
                         epoch_images=5e7, lrs_per_cell=5, noise=0.02, rng=np.random.default_rng(0))


def sweep_160() -> pd.DataFrame:
    parts = []
    for i, fam in enumerate(("nfnet", "vit")):
        parts.append(planted_study(LAW, "isoflop", sizes=np.geomspace(1e6, 1.6e7, 4),
                                   budgets=np.geomspace(1e15, 1e17, 5), lrs_per_cell=4, noise=0.02, family=fam,
                                   rng=np.random.default_rng(i)))
    return pd.concat(parts, ignore_index=True)


@single_threaded_blas
def reference_loop(points, reps, hat, count: int) -> float:
    """Seconds per replicate of a plain loop: one scipy multi-start refit per replicate."""
    log_n, log_d = np.log(points.params), np.log(points.images)
    t0 = time.perf_counter()
    for b in range(count):
        w = reps.weights[b]
        idx = np.repeat(np.arange(points.n), w.astype(int))
        y = np.log(reps.loss[b])
        inits = np.vstack([hat, _screen_grid(log_n[idx], log_d[idx], y[idx], 1e-3, 1)])
        minimize_multistart(_objective(log_n[idx], log_d[idx], y[idx], 1e-3), inits, bounds=_BOUNDS, top_k=2)
    return (time.perf_counter() - t0) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-replicates", type=int, default=100)
    a = p.parse_args()
    cpu = subprocess.run("grep -o 'avx512_bf16\\|amx' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip() or "AVX2 only"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU: {cpu}")

    runs = prepare_table(grid_240()).done
    points = build_points(runs, detect_design(runs))
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    reps = points.replicates(1000, rng, smooth_surface(points))
    fit, _ = parametric_from_replicates(points, reps)
    ours = time.perf_counter() - t0
    hat = point_fit(np.log(points.params), np.log(points.images), np.log(points.loss))
    ref = reference_loop(points, reps, hat, a.reference_replicates) * 1000
    print(f"parametric L(N, D), {len(runs)} runs ({points.n} points), 1000 resamples: "
          f"batched {ours:.2f} s (surface, replicates and fit), per-replicate scipy loop {ref:.1f} s "
          f"(timed on {a.reference_replicates}, x{1000 / a.reference_replicates:g}); ratio {ref / ours:.1f}x; "
          f"alpha {fit.alpha.value:.3f} [{fit.alpha.low:.3f}, {fit.alpha.high:.3f}] (planted {LAW.alpha})")

    df = sweep_160()
    t0 = time.perf_counter()
    fit_table(df, bootstrap=1000, seed=0)
    whole = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "results.csv"
        df.to_csv(path, index=False)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "convscale", "fit", str(path)], check=True, capture_output=True)
        cli = time.perf_counter() - t0
    print(f"whole fit of a {len(df)}-run sweep (2 families, every item, 1000 resamples): "
          f"{whole:.2f} s in process, {cli:.2f} s as `convscale fit` (with the interpreter's start-up)")


if __name__ == "__main__":
    main()
