"""`convscale report SWEEP_DIR`: figures, summary.md and one self-contained report.html."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="draw a sweep's scaling plots and write summary.md and a self-contained report.html",
        description=(
            "Fit the sweep in SWEEP_DIR (or read SWEEP_DIR/fit.json when it is newer than the results and was written by the installed analysis code) and "
            "write PNG+SVG figures, summary.md and report.html into SWEEP_DIR/report (or --out)."
        ),
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="sweep directory (the --dir of `convscale sweep run`)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: SWEEP_DIR/report)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples when SWEEP_DIR/fit.json is missing, older than the results or from other analysis code (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--hardware", choices=("h100", "tpu-v4", "none"), default="tpu-v4",
                   help="reference device of the device-hours axis (default tpu-v4: core-hours, as the paper)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed on it (default 0.4)")
    p.add_argument("--target-loss", type=float, default=None, metavar="L",
                   help="loss of the compute comparison (default: a loss both frontiers reach)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from convscale.cli.checks import check_number
    from convscale.report import build_report

    check_number("--bootstrap", args.bootstrap, 0, low_open=False)
    check_number("--mfu", args.mfu, 0, 1)
    check_number("--target-loss", args.target_loss)
    res = build_report(args.sweep_dir, out_dir=args.out, bootstrap=args.bootstrap, seed=args.seed,
                       hardware=args.hardware, mfu=args.mfu, target_loss=args.target_loss)
    print(f"wrote {len(res.files)} files to {res.out_dir}: open {res.out_dir / 'report.html'}")
    for item, reason in res.skipped.items():
        print(f"skipped {item}: {reason}")
    return 0
