"""``python -m convscale``: the SIGTERM handler goes in before anything heavy is imported.

The entry runs only as the main module: a multiprocessing child started by "spawn" re-imports the
parent's main module (as ``__mp_main__``) and must not run the command line again."""

import sys

from convscale import signals
from convscale.status import EXIT_INTERRUPTED

if __name__ == "__main__":
    signals.install()
    try:
        from convscale.cli.main import entry
    except KeyboardInterrupt:  # SIGTERM while importing: nothing has started, nothing to keep
        sys.exit(EXIT_INTERRUPTED)
    entry()
