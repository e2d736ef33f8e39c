"""`convscale compare SWEEP_DIR`: the families side by side at matched compute (each against the reference)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two model families at matched compute (best per budget, compute to reach a loss)",
        description=(
            "The best run of each family at each budget, the compute each family needs to reach a target loss "
            "(from its fitted power law and measured on its frontier) and their ratio, and fine-tuned top-1 vs "
            "pre-training compute when SWEEP_DIR/finetune holds results. With more than two families, each is "
            "compared with the reference (nfnet when present)."
        ),
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="sweep directory (the --dir of `convscale sweep run`)")
    p.add_argument("--target-loss", type=float, default=None, metavar="L",
                   help="held-out loss to reach (default: the higher of the two frontiers' lowest losses)")
    p.add_argument("--target-top1", type=float, default=None, metavar="A",
                   help="also the compute to reach held-out top-1 A (a fraction, e.g. 0.55)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples when SWEEP_DIR/fit.json is missing, older than the results or from other analysis code (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from convscale.errors import UserError
    from convscale.report import compare_all, comparisons_json, format_comparisons, load_sweep

    from convscale.cli.checks import check_number

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0; got {args.bootstrap}")
    check_number("--target-loss", args.target_loss)
    check_number("--target-top1", args.target_top1, 0, 1)
    inputs = load_sweep(args.sweep_dir, bootstrap=args.bootstrap, seed=args.seed)
    cmps = compare_all(inputs, target_loss=args.target_loss, target_top1=args.target_top1)
    print(json.dumps(comparisons_json(cmps), indent=2, allow_nan=False) if args.format == "json"
          else format_comparisons(cmps))
    return 0
