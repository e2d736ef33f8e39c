"""`convscale demo`: a small but real scaling study end to end on the built-in data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a whole study (sweep, fits, fine-tuning, comparison, report) on the built-in data",
        description="Pre-train 6 NFNet and 5 ViT sizes at 6 compute budgets over 1.5 decades (cooldown "
        "branches: one constant-lr trunk per model, a short cooldown per budget) on the procedural stream (10 "
        "classes), fit the scaling laws, fine-tune the best of each family on scikit-learn's handwritten digits "
        "(5 seeds each), set the paper's findings against the runs, and write the report. --scale quick took 4.3-4.8 "
        "minutes on 2 avx512_bf16 EPYC cores (2026-12-08; its earlier 100-class design 3.7-6.1 on avx512_bf16 "
        "Xeons and EPYCs, 6.6-8.5 on 2 AVX2 EPYC cores with one fine-tune per family); --scale medium "
        "(7 NFNet and 4 ViT sizes, 7 budgets over 1.7 decades, 3 learning rates, 2 seeds) 51 on the AVX2 cores; "
        "--scale gpu is a larger study for one GPU; --scale tiny is a smoke run.",
    )
    p.add_argument("--scale", choices=["quick", "medium", "tiny", "gpu"], default="quick")
    p.add_argument("--out", help="sweep directory (default sweeps/<study name>)")
    p.add_argument("--jobs", type=int, default=0, help="cells at once (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the runs for the intervals")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from convscale.demo import format_summary, run_demo
    from convscale.errors import UserError

    if args.jobs < 0:
        raise UserError(f"--jobs must be >= 1 (or 0 for the default), got {args.jobs}")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    result = run_demo(scale=args.scale, out=args.out, jobs=args.jobs, bootstrap=args.bootstrap)
    print(format_summary(result))
    return 0
