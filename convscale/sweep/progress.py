"""How far a sweep is: cells per state, training FLOPs done vs planned, and an ETA (no torch).

States (``SweepDir.state``): done and diverged (finished: result.json), running (a sweep holds the
cell's lock), locked (a `convscale train` outside any sweep holds the run directory's lock: a sweep
cannot run the cell until it ends), failed (the last attempt failed), pending (never started, or
interrupted).

FLOPs (2 x MACs; a training image costs 3 x its forward FLOPs, x2 with SAM): planned is the plan's
training FLOPs of every cell (what the cell computes itself: a cooldown branch its cooldown); done is what the runs trained so far: a finished cell's result.json
``train_flops``, any other cell's last metrics.jsonl row. Remaining is planned minus done over the
unfinished cells (a diverged cell stopped early and will not train more).

ETA (`sweep status`, and the live line of `sweep run` over the cells it runs): each model's
measured throughput of one worker is the FLOPs its cells trained divided by the wall seconds spent
training them, over its finished cells (result.json ``wall_seconds``) and its started ones (their
last metrics.jsonl row). Small models are slower per FLOP than large ones (per-step overhead: on a
CPU the demo's smallest NFNet trains ~20x fewer FLOPs per second than its largest), so one
sweep-wide rate measured on the first, smallest cells would overstate the time left many times
over. A model with no measured cell yet gets its rate from the measured models of its family (of
all families if its own has none), by its FLOPs per training step: interpolated in log-log between
the two nearest, and past the ends the conservative side: below the smallest measured model the
same seconds per step (overhead does not shrink), above the largest the same FLOPs per second. A
cell's start-up (process, imports, data, model) is measured on the finished cells as the time from
its launch (launches/<cell>.json) to its result.json, less its training seconds. ETA = (the sum of
each unfinished cell's remaining FLOPs at its model's rate + cells still to start x mean start-up)
/ workers: it assumes the workers stay busy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from convscale.fileio import read_json
from convscale.sweep.sweepdir import FINISHED, SweepDir

#: the order in which states are listed
STATES = ("done", "running", "failed", "diverged", "locked", "pending")
METRICS_FILE = "metrics.jsonl"  # == convscale.train.metrics.METRICS_FILE (that package imports torch)


def last_jsonl_row(path: Path, tail_bytes: int = 1 << 16) -> Optional[dict[str, Any]]:
    """The last complete JSON row of a JSON-lines file that may be growing, reading only its tail."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().split(b"\n")
    except (FileNotFoundError, NotADirectoryError):
        return None
    for raw in reversed(lines):  # the last piece is empty, or a row still being written
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            return row
    return None


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0.0


@dataclass(frozen=True)
class CellProgress:
    cell_id: str
    family: str
    state: str
    planned_flops: float  # training FLOPs the plan gives the cell
    done_flops: float  # training FLOPs its run has trained so far
    wall_seconds: float  # wall seconds its run has trained them in (0: not started)
    startup_seconds: Optional[float] = None  # finished cells: launch to result.json, less training
    model: str = ""  # canonical zoo name: cells of one model share a measured throughput
    flops_per_step: float = 0.0  # training FLOPs of one step (0: unknown)

    @property
    def measured(self) -> bool:
        return self.wall_seconds > 0 and self.done_flops > 0

    @property
    def to_start(self) -> bool:
        """Whether a worker has yet to start the cell (it is neither finished nor running)."""
        return self.state not in FINISHED and self.state != "running"

    @property
    def remaining_flops(self) -> float:
        return 0.0 if self.state in FINISHED else max(0.0, self.planned_flops - self.done_flops)


@dataclass
class SweepProgress:
    """The state of every cell of a sweep directory, read from its files."""

    root: Path
    study: str
    cells: list[CellProgress] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(c.state == s for c in self.cells) for s in STATES}

    @property
    def planned_flops(self) -> float:
        return sum(c.planned_flops for c in self.cells)

    @property
    def done_flops(self) -> float:
        return sum(c.done_flops for c in self.cells)

    @property
    def remaining_flops(self) -> float:
        return sum(c.remaining_flops for c in self.cells)

    @property
    def measured_cells(self) -> int:
        return sum(c.measured for c in self.cells)

    @property
    def flops_per_second(self) -> Optional[float]:
        """Measured training FLOPs per second of one worker over every measured cell (None before
        any cell has trained): the sweep's mean; the ETA uses each model's own (``model_rates``)."""
        measured = [c for c in self.cells if c.measured]
        if not measured:
            return None
        return sum(c.done_flops for c in measured) / sum(c.wall_seconds for c in measured)

    def model_rates(self) -> dict[tuple[str, str], float]:
        """(family, model) -> measured training FLOPs per second of one worker, for every model
        with a measured cell."""
        done: dict[tuple[str, str], list[float]] = {}
        for c in self.cells:
            if c.measured:
                acc = done.setdefault((c.family, c.model), [0.0, 0.0])
                acc[0] += c.done_flops
                acc[1] += c.wall_seconds
        return {k: f / s for k, (f, s) in done.items()}

    def rate_of(self, family: str, model: str, flops_per_step: float) -> Optional[float]:
        """FLOPs per second one worker trains ``model`` at: measured, or from the measured models of
        its family (else of all) by FLOPs per step (module docstring). None: nothing measured."""
        rates = self.model_rates()
        if (family, model) in rates:
            return rates[(family, model)]
        step = {(c.family, c.model): c.flops_per_step for c in self.cells if c.flops_per_step > 0}
        known = [(step[k], r) for k, r in rates.items() if k in step]
        own = [(step[k], r) for k, r in rates.items() if k in step and k[0] == family]
        points = sorted(own or known)
        if not points or flops_per_step <= 0:
            return self.flops_per_second
        if flops_per_step <= points[0][0]:  # smaller: the same seconds per step
            return points[0][1] * flops_per_step / points[0][0]
        if flops_per_step >= points[-1][0]:  # larger: the same FLOPs per second
            return points[-1][1]
        for (x0, r0), (x1, r1) in zip(points, points[1:]):
            if x0 <= flops_per_step <= x1:
                if x1 == x0:
                    return r0
                t = (math.log(flops_per_step) - math.log(x0)) / (math.log(x1) - math.log(x0))
                return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
        return points[-1][1]  # pragma: no cover - the loop covers the range

    def training_seconds_left(self, measured: Optional["SweepProgress"] = None) -> Optional[float]:
        """Seconds one worker needs to train the unfinished cells' remaining FLOPs, each at its
        model's rate as ``measured`` (default: this progress) measured it; None before any rate."""
        timing = measured or self
        total = 0.0
        for c in self.cells:
            if c.remaining_flops > 0:
                rate = timing.rate_of(c.family, c.model, c.flops_per_step)
                if rate is None or rate <= 0:
                    return None
                total += c.remaining_flops / rate
        return total

    @property
    def startup_seconds(self) -> Optional[float]:
        """Mean measured start-up of a cell (None before a cell with a launch record has finished)."""
        measured = [c.startup_seconds for c in self.cells if c.startup_seconds is not None]
        return sum(measured) / len(measured) if measured else None

    def eta_seconds(self, workers: int, measured: Optional["SweepProgress"] = None,
                    startup_seconds: Optional[float] = None) -> Optional[float]:
        """Seconds until every unfinished cell is trained by ``workers`` cells at once, at each
        model's throughput and the start-up that ``measured`` (default: this progress) measured, or
        at the given start-up (None: nothing measured yet)."""
        if self.remaining_flops == 0:
            return 0.0
        seconds = self.training_seconds_left(measured)
        if seconds is None:
            return None
        timing = measured or self
        startup = startup_seconds if startup_seconds is not None else (timing.startup_seconds or 0.0)
        to_start = sum(c.to_start for c in self.cells)
        return (seconds + to_start * startup) / max(1, workers)

    def subset(self, cell_ids: set[str]) -> "SweepProgress":
        """The progress of some of the cells (the ones a sweep invocation runs)."""
        return SweepProgress(self.root, self.study, [c for c in self.cells if c.cell_id in cell_ids])

    def to_dict(self, workers: int) -> dict[str, Any]:
        return {"root": str(self.root), "study": self.study, "cells": len(self.cells), "counts": self.counts,
                "planned_flops": self.planned_flops, "done_flops": self.done_flops,
                "remaining_flops": self.remaining_flops, "measured_cells": self.measured_cells,
                "flops_per_second_per_worker": self.flops_per_second, "workers": workers,
                "flops_per_second_per_model": {m: r for (_, m), r in sorted(self.model_rates().items())},
                "training_seconds_left": self.training_seconds_left(),
                "startup_seconds": self.startup_seconds, "cells_to_start": sum(c.to_start for c in self.cells),
                "eta_seconds": self.eta_seconds(workers)}


def read_progress(root: str | Path) -> SweepProgress:
    """Every cell's state and FLOPs in the sweep directory ``root``; UserError if it holds no sweep."""
    sweep = SweepDir(root)
    study, cells = sweep.load()
    out = SweepProgress(root=sweep.root, study=study.name)
    for c in cells:
        state = sweep.state(c.cell_id)
        startup = None
        if state in FINISHED:
            res = sweep.result(c.cell_id) or {}
            done, seconds = _num(res.get("train_flops")), _num(res.get("wall_seconds"))
            startup = _startup_seconds(sweep, c.cell_id, seconds)
        else:
            row = last_jsonl_row(sweep.run_dir(c.cell_id) / METRICS_FILE) or {}
            done, seconds = _num(row.get("train_flops")), _num(row.get("wall_seconds"))
        # a cooldown branch trains only its cooldown: its result counts the trunk's prefix, which the trunk trained
        prefix = float(c.train_flops) - c.own_flops
        if prefix and done == done:
            done = max(done - prefix, 0.0)
        per_step = float(c.train_flops) / c.steps if c.steps else 0.0
        out.cells.append(CellProgress(c.cell_id, c.family, state, c.own_flops, done, seconds, startup,
                                      model=c.model, flops_per_step=per_step))
    return out


def _startup_seconds(sweep: SweepDir, cell_id: str, train_seconds: float) -> Optional[float]:
    """Launch to result.json less the training seconds; None without a launch record (a cell run
    by hand) or when the run trained over several launches (its seconds span more than this one)."""
    started = _num((read_json(sweep.launch_path(cell_id)) or {}).get("started"))
    try:
        ended = (sweep.run_dir(cell_id) / "result.json").stat().st_mtime
    except OSError:
        return None
    startup = ended - started - train_seconds
    return startup if started and startup >= 0 else None


def format_seconds(s: Optional[float]) -> str:
    """'45 s', '12.5 min', '3.2 h'; 'unknown' for None."""
    if s is None:
        return "unknown"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
