"""The live progress line of `sweep run` and the demo: on a terminal, a tqdm bar of training FLOPs
with the cells per state and the ETA of `convscale sweep status` (same numbers, re-read from the
sweep directory every few seconds); elsewhere (a log file, a pipe, the tests) nothing but the
plain lines the sweep always printed."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, TextIO

from convscale.sweep.progress import SweepProgress, format_seconds, read_progress


def live_text(p: SweepProgress, workers: int, measured: Optional[SweepProgress] = None) -> str:
    """'3/12 finished, 2 running, 1 failed | ETA 3.5 min (2 worker(s))': the line's words, at the
    throughputs and start-up ``measured`` (default ``p``) measured."""
    counts = p.counts
    finished = counts["done"] + counts["diverged"]
    others = ", ".join(f"{counts[s]} {s}" for s in ("running", "failed", "locked", "diverged") if counts[s])
    eta = p.eta_seconds(workers, measured)
    return (f"{finished}/{len(p.cells)} finished" + (f", {others}" if others else "")
            + f" | ETA {'measuring' if eta is None else format_seconds(eta)} ({workers} worker(s))")


class LiveLine:
    """``with LiveLine(root, cells, workers) as line: ... line.write(msg)``: a refreshing bar on a
    terminal (``write`` prints above it); on anything else ``write`` is ``log`` and nothing more."""

    def __init__(self, root: str | Path, cell_ids: Iterable[str], workers: int,
                 log: Callable[[str], None] = lambda s: print(s, flush=True),
                 stream: Optional[TextIO] = None, refresh_seconds: float = 2.0,
                 enabled: Optional[bool] = None) -> None:
        self.root, self.cell_ids, self.workers = Path(root), set(cell_ids), max(1, workers)
        self.stream = stream if stream is not None else sys.stdout
        self.log, self.refresh_seconds = log, refresh_seconds
        self.bar = None
        self._enabled = enabled  # None: when ``stream`` is a terminal
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        if importlib.util.find_spec("tqdm") is None:  # an install without it: plain lines
            return False
        if self._enabled is not None:
            return self._enabled
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def __enter__(self) -> "LiveLine":
        if not self.enabled:
            return self
        from tqdm import tqdm

        p = self.progress()
        self.bar = tqdm(total=p[0].planned_flops, file=self.stream, unit="FLOP", unit_scale=True, dynamic_ncols=True,
                        bar_format="{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} | {desc}", leave=True)
        self.refresh(p)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.bar is not None:
            self.refresh()
            self.bar.close()
            self.bar = None

    def progress(self) -> tuple[SweepProgress, SweepProgress]:
        """The cells this line follows, and the whole sweep (whose cells measure the throughputs and start-up)."""
        p = read_progress(self.root)
        return p.subset(self.cell_ids), p

    def refresh(self, progress: Optional[tuple[SweepProgress, SweepProgress]] = None) -> None:
        if self.bar is None:
            return
        p, whole = progress or self.progress()
        self.bar.n = p.done_flops
        self.bar.set_description_str(live_text(p, self.workers, whole), refresh=False)
        self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.bar is None:
            self.log(msg)
            return
        self.bar.write(msg, file=self.stream)
        self.refresh()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except Exception:  # a file caught mid-write; the next refresh reads it whole
                pass
