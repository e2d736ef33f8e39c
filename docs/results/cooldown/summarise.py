"""Side by side: one cosine run per budget vs cooldown branches, from the two sweep directories.

    python docs/results/cooldown/summarise.py SWEEP_COSINE SWEEP_COOLDOWN [--wall-seconds A B]

Prints markdown: per family and budget the frontier loss (and its model) of each sweep; the
fitted frontier exponent with its interval and the compute-optimal allocation exponents; the
training FLOPs each sweep computed (``spent_flops``: trunks plus cooldowns for branches) and the
cell-hours its runs took; and whether the findings' verdicts agree.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from convscale.report.compare import compare_all
from convscale.report.findings import study_findings
from convscale.report.inputs import load_sweep
from convscale.scaling import sweep_fit
from convscale.scaling.table import load_results


def _est(e) -> str:
    if e is None:
        return "n/a"
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" if math.isfinite(e.low) else f"{e.value:.3f}"


def summarise(dirs: list[str], names: list[str], wall: list[float] | None) -> str:
    for d in dirs:  # refit: a fit.json left by an earlier convscale would be read back as it is
        sweep_fit(d, bootstrap=1000, seed=0, refit=True)
    sweeps = [load_sweep(d, bootstrap=1000) for d in dirs]
    lines = ["| family | budget (FLOPs) | " + " | ".join(f"{n}: loss (model)" for n in names) + " | difference |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for fam in sweeps[0].families:
        frs = [s.frontiers.get(fam) for s in sweeps]
        if any(f is None for f in frs):
            continue
        for c in frs[0]["compute_flops"]:
            rows = [f[f["compute_flops"].sub(c).abs() < 1e-6 * c] for f in frs]
            if any(len(r) == 0 for r in rows):
                continue
            cells = [f"{r['loss'].iloc[0]:.4f} ({r['model'].iloc[0]})" for r in rows]
            diff = rows[1]["loss"].iloc[0] - rows[0]["loss"].iloc[0]
            lines.append(f"| {fam} | {c:.3g} | " + " | ".join(cells) + f" | {diff:+.4f} |")
    lines += ["", "| family | item | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for fam in sweeps[0].families:
        fits = [s.fit.families.get(fam) if s.fit else None for s in sweeps]
        law = [_est(f.power_law.a) if f and f.power_law else "n/a" for f in fits]
        lines.append(f"| {fam} | frontier exponent a (L = A C^-a) | " + " | ".join(law) + " |")
        for item, idx in (("N_opt exponent", 1), ("D_opt exponent", 2)):
            vals = []
            for f in fits:
                alloc = f.allocation() if f else (None, None, None)
                vals.append(f"{_est(alloc[idx].exponent)} ({alloc[0]})" if alloc[idx] is not None else "n/a")
            lines.append(f"| {fam} | {item} | " + " | ".join(vals) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    spent, everything = [], [load_results(d) for d in dirs]  # trunks included
    for df in everything:
        col = df["spent_flops"] if "spent_flops" in df and df["spent_flops"].notna().any() else df["train_flops"]
        spent.append(float(pd.to_numeric(col, errors="coerce").sum()))
    lines.append("| training FLOPs computed | " + " | ".join(f"{x:.3e}" for x in spent) + " |")
    lines.append("| relative | " + " | ".join(f"{x / spent[0]:.2f}x" for x in spent) + " |")
    hours = [float(pd.to_numeric(df["wall_hours"], errors="coerce").sum()) for df in everything]
    lines.append("| cell wall time (sum over cells) | " + " | ".join(f"{60 * h:.1f} min" for h in hours) + " |")
    if wall:
        lines.append("| sweep wall time (2 jobs) | " + " | ".join(f"{w / 60:.1f} min" for w in wall) + " |")
    verdicts = [{f"{f.key} ({f.family})": f.verdict for f in study_findings(s, compare_all(s))} for s in sweeps]
    lines += ["", "| finding | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in verdicts[0]:
        lines.append(f"| {key} | " + " | ".join(str(v.get(key, "n/a")) for v in verdicts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs=2)
    parser.add_argument("--names", nargs=2, default=["cosine per budget", "cooldown branches"])
    parser.add_argument("--wall-seconds", nargs=2, type=float)
    args = parser.parse_args()
    print(summarise(args.dirs, args.names, args.wall_seconds))


if __name__ == "__main__":
    main()
