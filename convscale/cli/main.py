"""The `convscale` command: parses, calls one stage, prints.

Each sub-command lives in its own module in this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (called with the parsed
args, returns an exit code). Command modules import heavy stages (torch, pandas) inside ``func``
so that ``convscale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import importlib
import logging
import signal
import sys
import threading
import traceback

from convscale import signals
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
    "export",
    "study",
    "demo",
)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line naming the fix, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from convscale import __version__

    parser = Parser(
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


#: OSErrors that the file system or the user's paths cause, never our code: the fix for each
FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: "free some space, then rerun the same command (what was written is kept; a run resumes)",
    errno.EDQUOT: "free some quota, then rerun the same command (what was written is kept; a run resumes)",
    errno.EROFS: "that file system is read-only; give a path on a writable one",
    errno.EACCES: "check the permissions, or give a path you may write",
    errno.EPERM: "check the permissions, or give a path you may write",
    errno.ENOTDIR: "a part of that path is a file, not a folder; give another path",
}


def main(argv: list[str] | None = None, restore_signals: bool = True) -> int:
    """Run one command; its exit code. ``restore_signals=False`` (the process entry point) keeps
    the SIGTERM handler to the end, so that a SIGTERM in the last moments still exits 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM (kill, Slurm pre-emption, a sweep stopping its cells) ends a command the way Ctrl-C
    # does: finally blocks run, locks are released, children are stopped. A second one kills.
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signals.install() if in_main_thread else None
    try:
        signals.check()  # one that arrived while starting, its interrupt swallowed by an import
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"convscale: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("convscale: interrupted; results already written are kept", file=sys.stderr)
        if restore_signals:
            signals.reset()  # an in-process caller goes on
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"convscale: error: {where}{e.strerror}; {FILE_SYSTEM_ERRORS[e.errno]}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread and restore_signals:
            signal.signal(signal.SIGTERM, old_handler)


def entry() -> None:
    """The `convscale` process. A SIGTERM at any moment ends it as Ctrl-C does (exit 130, results
    kept); once the command has returned, a SIGTERM only hastens the exit with the code decided.
    The process ends by ``os._exit`` as the last exit handler: the interpreter's own finalisation
    would reset the SIGTERM handler (a late SIGTERM then kills with -15) and may report exit by
    SIGINT (-2) for an interrupt that was caught and handled inside a C extension's call."""
    exit_code = [130]
    atexit.register(_exit_now, exit_code)  # registered first, so it runs after every other one
    try:
        exit_code[0] = main(restore_signals=False)
    except KeyboardInterrupt:  # arrived after main's own handling (its very last lines)
        print("convscale: interrupted; results already written are kept", file=sys.stderr)
        exit_code[0] = 130
    except SystemExit as e:  # argparse: --help, --version, a usage error
        exit_code[0] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # our bug: the traceback, exit 1
        traceback.print_exc()
        exit_code[0] = 1
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit_now(exit_code))
    sys.exit(exit_code[0])


def _exit_now(exit_code: list[int]) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code[0])


if __name__ == "__main__":
    entry()
