"""`convscale study NAME`: write a built-in study (demo, tiny, gpu, paper) as an editable TOML file."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from convscale.sweep.presets import PRESETS

    p = sub.add_parser("study", help="write a built-in study file (e.g. the paper's) to edit and sweep")
    p.add_argument("name", choices=sorted(PRESETS), help="which study")
    p.add_argument("--out", help="write to this .toml file (default: print it); an existing file is kept")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from convscale.errors import UserError
    from convscale.fileio import atomic_write_text
    from convscale.sweep.presets import preset, to_toml
    from convscale.sweep.study import parse_study

    study = preset(args.name)
    parse_study(study)  # a preset that does not validate is our bug
    header = (
        f"convscale study '{args.name}' (written by `convscale study {args.name}`)\n"
        f"  convscale sweep plan {args.out or args.name + '.toml'} --no-probe   # cells, FLOPs, device-hours\n"
        f"  convscale sweep run {args.out or args.name + '.toml'} --jobs N"
    )
    if args.name == "paper":
        header += (
            "\nSmith, Brock, Berrada, De (2023): NFNet F0-F7+ on JFT-4B at 224 px, batch 4096, 0.25-8 epochs."
            "\nThe [data] table below stands in for JFT-4B (30k classes, epoch_images = 4e9) so the"
            "\nplan's FLOPs are the paper's; point it at your data, e.g. kind = \"shards\", path = \"/data/jft/*.tar\"."
        )
    text = to_toml(study, header)
    if args.out:
        out = Path(args.out)
        if out.exists() and out.is_dir():
            raise UserError(f"--out {out} is a directory; give a file name such as {out / (args.name + '.toml')}")
        if out.exists() and not args.force:
            raise UserError(f"--out {out} exists; give a new file name, or --force to overwrite it")
        atomic_write_text(out, text)
        print(f"wrote {out}; next: convscale sweep plan {out} --no-probe")
    else:
        sys.stdout.write(text)
    return 0
