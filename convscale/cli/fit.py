"""`convscale fit RESULTS`: fit scaling laws to a results table and print or save them."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit scaling laws (frontier power law, compute-optimal N and D, lr trend, L(N, D)) to a results table",
        description=(
            "Fit scaling laws to RESULTS: a results .parquet/.csv (one row per run) or a sweep directory "
            "holding results.parquet or results.csv. Any CSV with columns params, data and loss works "
            "(optional: flops, family, lr, epochs; without flops, C = 6*N*D)."
        ),
    )
    p.add_argument("results", metavar="RESULTS", help="results file or sweep directory")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of the runs, shared by every fit of a family (default: 1000)")
    p.add_argument("--design", choices=("isoflop", "grid"), default=None,
                   help="override the detected study design (isoflop: group runs by budget_flops; grid: Pareto "
                        "frontier of all runs)")
    p.add_argument("--params", choices=("params", "params_without_head"), default="params", dest="size_convention",
                   help="count model size N with or without the classifier head (default: params)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--out", metavar="FILE.json",
                   help="also write the full fit as JSON to this file (a sweep directory's fit always goes to "
                        "SWEEP/fit.json, which report and compare read)")
    p.set_defaults(func=run)


def _check_out(target: Path) -> None:
    from convscale.errors import UserError

    if not target.parent.is_dir():
        raise UserError(f"directory {target.parent} does not exist; create it or choose another --out path")


def _check_not_cut_short(path: Path) -> None:
    """A CSV cut mid-row parses as a row with a shortened last value or missing ones: refuse it
    (every CSV writer ends the file with a newline; Parquet checks itself)."""
    from convscale.errors import UserError

    if path.is_dir() and not (path / "results.parquet").is_file():
        path = path / "results.csv"
    if path.suffix.lower() != ".csv" or not path.is_file():
        return
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return
        f.seek(-1, 2)
        if f.read(1) not in (b"\n", b"\r"):
            raise UserError(f"{path} does not end with a newline, so its last row may be cut short; "
                            "re-write the file (if it is whole, add the final newline)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from convscale.scaling import fit_results, format_text, sweep_fit, write_fit

    _check_not_cut_short(Path(args.results))
    if args.out:  # before the fit, not after it
        _check_out(Path(args.out))
    kw = dict(bootstrap=args.bootstrap, seed=args.seed, design=args.design, size_convention=args.size_convention)
    if Path(args.results).is_dir():
        fit, _ = sweep_fit(args.results, refit=True, **kw)
    else:
        fit = fit_results(args.results, **kw)
    as_json = json.dumps(fit.to_dict(), indent=2, allow_nan=False)
    if args.out:
        write_fit(args.out, fit)
    print(as_json if args.format == "json" else format_text(fit))
    return 0
