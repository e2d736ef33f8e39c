"""`convscale models`: the zoo as a table (name, family, params with and without the classifier head,
forward/training GFLOPs per image)."""

from __future__ import annotations

import argparse
import csv
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter and FLOP counts")
    p.add_argument("names", nargs="*", help="models to show (default: every named variant)")
    p.add_argument("--resolution", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier classes (default 1000)")
    p.add_argument("--family", help="only this family (nfnet, vit, convnext, ...)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=run)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_gflops(x: float) -> str:
    """3 decimals, and 3 significant digits below 1 (a 16-px model is ~0.0005 GFLOPs, not 0.000)."""
    return f"{x:.3f}" if x >= 1 else f"{x:.3g}"


def run(args: argparse.Namespace) -> int:
    from convscale.errors import UserError
    from convscale.models import FAMILIES, get_config, model_names, zoo_table

    if args.num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.resolution < 1:
        raise UserError(f"--resolution must be a positive number of pixels, got {args.resolution}")
    if args.family is not None and args.family not in FAMILIES:
        raise UserError(f"--family {args.family!r} is unknown; use one of {', '.join(FAMILIES)}")
    names = args.names or model_names(args.family)
    if args.names and args.family:
        names = [n for n in names if get_config(n).family == args.family]
    unfit: dict[str, str] = {}  # models that cannot take this resolution, and why
    for name in names:
        try:
            get_config(name).check_resolution(args.resolution)
        except UserError as e:
            unfit[name] = str(e)
    if unfit and len(unfit) == len(names):
        raise UserError(next(iter(unfit.values())) if len(names) == 1 else
                        f"no model listed takes {args.resolution} px ({next(iter(unfit.values()))})")
    rows = zoo_table([n for n in names if n not in unfit], args.resolution, args.num_classes)
    if args.format != "table":  # csv/json stay machine-readable: the models left out are told on stderr
        for name, why in unfit.items():
            print(f"convscale: left out {name}: {why}", file=sys.stderr)
    out = sys.stdout
    if args.format == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        w = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["name"])
        w.writeheader()
        w.writerows(rows)
    else:
        header = ("model", "family", "params", "w/o head", f"GFLOPs/img fwd @{args.resolution}px", "train GFLOPs/img")
        table = [
            (r["name"], r["family"], _fmt_params(r["params"]), _fmt_params(r["params_without_head"]),
             _fmt_gflops(r["gflops"]), _fmt_gflops(r["train_gflops"]))
            for r in rows
        ]
        table += [(name, get_config(name).family, "-", "-", "-", "-") for name in unfit]  # marked, explained below
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
        line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
        print(line)
        print("  ".join("-" * w for w in widths))
        for t in table:
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
        for name, why in unfit.items():
            print(f"- {name}: {why}")
        print(
            f"\nFLOPs = 2 x multiply-accumulates; training FLOPs per image = 3 x forward; "
            f"{args.num_classes} classes; w/o head = without the classifier's weight and bias."
        )
    return 0
