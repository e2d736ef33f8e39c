"""The `convscale` command: parses, calls one stage, prints.

Each sub-command lives in its own module in this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (called with the parsed
args, returns an exit code). Command modules import heavy stages (torch, pandas) inside ``func``
so that ``convscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from convscale.errors import UserError

# Order is the order shown in --help. A module missing here is a bug, not a user error.
COMMAND_MODULES = (
    "models",
    "train",
    "sweep",
    "fit",
    "report",
    "compare",
    "finetune",
    "study",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    from convscale import __version__

    parser = argparse.ArgumentParser(
        prog="convscale",
        description="Compute-matched scaling studies of ConvNets (NFNets) and Vision Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"convscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"convscale.cli.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"convscale.cli.{mod_name}":
                continue  # command not written yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"convscale: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("convscale: interrupted; results already written are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
