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
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="bootstrap resamples per fit (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--out", metavar="FILE.json", help="also write the full fit as JSON to this file (atomically)")
    p.set_defaults(func=run)


def _write_atomic(path: str, text: str) -> None:
    import os
    import tempfile
    from pathlib import Path

    from convscale.errors import UserError

    target = Path(path)
    _check_out(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

    from convscale.scaling import fit_results, format_text

    _check_not_cut_short(Path(args.results))
    if args.out:  # before the fit, not after it
        _check_out(Path(args.out))
    fit = fit_results(args.results, bootstrap=args.bootstrap, seed=args.seed)
    as_json = json.dumps(fit.to_dict(), indent=2, allow_nan=False)
    if args.out:
        _write_atomic(args.out, as_json + "\n")
    print(as_json if args.format == "json" else format_text(fit))
    return 0
