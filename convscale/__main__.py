"""``python -m convscale``: the SIGTERM handler goes in before anything heavy is imported."""

import sys

from convscale import signals
from convscale.status import EXIT_INTERRUPTED

signals.install()
try:
    from convscale.cli.main import entry
except KeyboardInterrupt:  # SIGTERM while importing: nothing has started, nothing to keep
    sys.exit(EXIT_INTERRUPTED)
entry()
