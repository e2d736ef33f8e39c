"""``python -m convscale``: the SIGTERM handler goes in before anything heavy is imported."""

import sys

from convscale import signals

signals.install()
try:
    from convscale.cli.main import entry
except KeyboardInterrupt:  # SIGTERM while importing: nothing has started, nothing to keep
    sys.exit(130)
entry()
