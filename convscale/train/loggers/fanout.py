"""One write(row) / close() in front of metrics.jsonl and the chosen trackers."""

from __future__ import annotations

import atexit
import warnings
from pathlib import Path
from typing import Any

from convscale.train.loggers import logger_module, parse_options
from convscale.train.loggers.base import LoggerContext, read_state, write_state
from convscale.train.metrics import MetricsWriter, read_metrics


class TrackerFailed(RuntimeWarning):
    """A tracker failed after it started; the run goes on without it."""


#: fan-outs with trackers this process opened and has not closed, by run dir
_OPEN: dict[Path, "FanOut"] = {}


class FanOut:
    """metrics.jsonl first (its failure is the run's), then each tracker (whose failure is not:
    it is warned about once and the tracker dropped)."""

    def __init__(self, jsonl: MetricsWriter, trackers: dict[str, Any]):
        self.jsonl = jsonl
        self.trackers = dict(trackers)
        if self.trackers:  # a run that ends by an exception never calls close(): end the tracked runs
            atexit.register(self.abandon)

    def write(self, row: dict[str, Any]) -> None:
        self.jsonl.write(row)
        for name, tracker in list(self.trackers.items()):
            self._guard(name, tracker.write, row)

    def close(self) -> None:
        self.jsonl.close()
        for name, tracker in list(self.trackers.items()):
            self._guard(name, tracker.close)
        self.trackers.clear()
        atexit.unregister(self.abandon)
        if _OPEN.get(self.jsonl.path.parent.resolve()) is self:
            del _OPEN[self.jsonl.path.parent.resolve()]

    def abandon(self) -> None:
        """At exit without close(), or when this process resumes the run: mark each tracked run as
        ended early (MLflow KILLED, W&B exit code 1); a resume continues it."""
        atexit.unregister(self.abandon)
        self.jsonl.close()
        for name, tracker in list(self.trackers.items()):
            self._guard(name, getattr(tracker, "abandon", tracker.close))
        self.trackers.clear()

    def _guard(self, name: str, call, *args) -> None:
        try:
            call(*args)
        except Exception as e:  # a tracker's server, disk or library: never the run's end
            self.trackers.pop(name, None)
            warnings.warn(f"convscale: the {name} logger failed ({type(e).__name__}: {e}); "
                          f"the run goes on, logging to metrics.jsonl and the other loggers only",
                          TrackerFailed, stacklevel=3)


def open_fanout(log: list[str], log_options: dict[str, Any], run_dir: Path, resolved: dict[str, Any],
                start_step: int) -> FanOut:
    # rows past the checkpoint that the interrupted attempt wrote: read before MetricsWriter drops them
    replayed = frozenset((r.get("kind"), r.get("step")) for r in read_metrics(run_dir / "metrics.jsonl")
                         if r.get("step", 0) > start_step) if log else frozenset()
    earlier = _OPEN.pop(run_dir.resolve(), None)
    if earlier is not None:  # an attempt in this process that ended by an exception: end its runs first
        earlier.abandon()
    stored = read_state(run_dir)
    trackers: dict[str, Any] = {}
    try:
        for name in log:
            options = parse_options(name, log_options.get(name, {}))
            ctx = LoggerContext(run_dir=run_dir, run_name=run_dir.resolve().name, resolved=resolved,
                                start_step=start_step, replayed=replayed, state=stored.get(name, {}))
            trackers[name] = logger_module(name).build(options, ctx)
    except BaseException:
        for tracker in trackers.values():  # the ones that did start end cleanly
            try:
                tracker.close()
            except Exception:
                pass
        raise
    if trackers:
        write_state(run_dir, {**stored, **{name: t.state for name, t in trackers.items()}})
    fanout = FanOut(MetricsWriter(run_dir, start_step), trackers)
    if trackers:
        _OPEN[run_dir.resolve()] = fanout
    return fanout
