"""The run's JSON-lines metrics file and the progress display on stderr."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from convscale.fileio import atomic_write_text, jsonl_line, read_jsonl

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete rows of a metrics file (a torn last line from a killed run is dropped)."""
    return read_jsonl(path)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; each row is flushed at once."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        # On resume, rows past the checkpoint's step will be written again: drop them (and any torn line).
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(map(jsonl_line, kept)))
        self._f = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(jsonl_line(row))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress bar on a TTY; on a log file a line every ``every_seconds``.

    ``quiet``: nothing but one line per evaluation (and the final result).
    """

    def __init__(self, total_steps: int, quiet: bool, stream: Optional[TextIO] = None,
                 every_seconds: float = 30.0):
        self.total = total_steps
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_seconds = every_seconds
        self._last = 0.0

    def update(self, step: int, loss: float, images_per_second: float, seconds_per_step: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < self.every_seconds and step < self.total:
            return
        self._last = now
        eta = (self.total - step) * seconds_per_step
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} "
                f"{images_per_second:,.0f} img/s ETA {_fmt_seconds(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that is always printed (evaluations, the result)."""
        if self.tty and not self.quiet:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
