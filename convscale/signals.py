"""SIGTERM ends a convscale process the way Ctrl-C does, even where a library swallows the interrupt.

The handler raises KeyboardInterrupt (finally blocks run, locks are released, a run checkpoints and
exits "interrupted") and records that a stop was asked for. Third-party code sometimes catches a
KeyboardInterrupt it did not expect (a bare ``except`` during an import, a C extension that
clears the error): the record stays, and the places where a process waits or loops
(``check()`` in the sweep's wait loop, the training step loop, before a command starts) raise
again. A second SIGTERM kills at once (the default disposition), for a process that hangs.

Torch-free and import-light: ``python -m convscale`` installs it before anything else.
"""

from __future__ import annotations

import signal

_stop_requested = False


def _on_sigterm(signum, frame) -> None:
    global _stop_requested
    _stop_requested = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def install():
    """Handle SIGTERM from now on (main thread only); the previous handler, to restore."""
    return signal.signal(signal.SIGTERM, _on_sigterm)


def stop_requested() -> bool:
    return _stop_requested


def check() -> None:
    """Raise KeyboardInterrupt again if a SIGTERM arrived and its first interrupt was swallowed."""
    if _stop_requested:
        raise KeyboardInterrupt


def reset() -> None:
    """Forget a handled stop (an in-process caller, such as a test, that goes on afterwards)."""
    global _stop_requested
    _stop_requested = False
