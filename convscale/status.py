"""Statuses of a run or a sweep cell, and the exit codes of `convscale` commands, in one place.

A run's ``result.json`` ends ``done`` or ``diverged`` (``FINISHED``: such a run or cell never runs
again); a sweep cell is besides ``running`` (its lock is held), ``failed`` (its last attempt failed)
or ``pending``; a cell's attempt that was stopped by a signal ends ``interrupted`` and resumes next
time. No imports: every stage and the command line read these.
"""

from __future__ import annotations

DONE = "done"
DIVERGED = "diverged"
FINISHED = (DONE, DIVERGED)
RUNNING = "running"
LOCKED = "locked"  # a `convscale train` outside any sweep holds the run directory's lock
BLOCKED = "blocked"  # a cooldown branch whose trunk can write no checkpoint for it (sweep/dependencies.py)
FAILED = "failed"
PENDING = "pending"
INTERRUPTED = "interrupted"

EXIT_DONE = 0  # done, or already finished
EXIT_FAILED = 1  # a sweep with failed cells; an uncaught bug (with its traceback)
EXIT_USER_ERROR = 2  # a UserError or a usage error: one line naming the fix
EXIT_DIVERGED = 3  # `convscale train` / `finetune`: the run diverged (its result.json says so)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C or SIGTERM; what was written is kept, a rerun resumes
