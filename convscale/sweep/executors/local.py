"""The ``local`` executor: cells as subprocesses on this machine, ``jobs`` at once."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from convscale import signals
from convscale.errors import UserError
from convscale.sweep.executors.cell import CellOutcome, Resources, run_cell, stop_children, visible_gpus


@dataclass(frozen=True)
class Config:
    """Options of the local executor (`sweep run --jobs`)."""

    jobs: int = 1  # cells at once
    gpus: Optional[int] = None  # GPUs to spread the jobs over; None: every visible one
    threads: Optional[int] = None  # CPU threads per job; None: cpu_count // jobs

    @property
    def parallel_cells(self) -> int:
        """Cells that run at once (the ETA's workers)."""
        return self.jobs


def build(config: Config, train_command: Optional[list[str]] = None,
          on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> "LocalExecutor":
    if config.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {config.jobs}")
    ex = LocalExecutor(jobs=config.jobs, gpus=config.gpus, threads=config.threads, train_command=train_command)
    if on_outcome is not None:
        ex.on_outcome = on_outcome
    return ex


@dataclass
class LocalExecutor:
    """Cells on this machine: ``jobs`` at once; with GPUs one per job (from the GPUs this process
    may use: an inherited ``CUDA_VISIBLE_DEVICES`` list is honoured), else cores // jobs threads each."""

    jobs: int = 1
    gpus: Optional[int] = None  # None: detect (torch.cuda.device_count())
    threads: Optional[int] = None  # per job; None: cpu_count // jobs
    train_command: Optional[list[str]] = None
    on_outcome: Callable[[CellOutcome, int, int], None] = field(default=lambda o, i, n: None)

    def resources(self, slot: int) -> Resources:
        gpus = self.gpus if self.gpus is not None else _cuda_device_count()
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, self.jobs))
        if gpus > 0:
            inherited = visible_gpus()
            ids = inherited[:gpus] if inherited else [str(i) for i in range(gpus)]
            return Resources(threads=threads, gpu=ids[slot % len(ids)])
        return Resources(threads=threads)

    def run(self, root: str | Path, cell_ids: list[str],
            on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> list[CellOutcome]:
        """Run the cells; outcomes in completion order. Ctrl-C stops launching and ends running cells.
        ``on_outcome(outcome, finished, total)`` (default: the field) is called as each cell ends."""
        on_outcome = on_outcome or self.on_outcome
        todo: queue.Queue[str] = queue.Queue()
        for cid in cell_ids:
            todo.put(cid)
        outcomes: list[CellOutcome] = []
        stop = threading.Event()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker(slot: int) -> None:
            while not stop.is_set():
                try:
                    cid = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    o = run_cell(root, cid, self.resources(slot), self.train_command)
                except BaseException as e:  # our bug: stop the sweep, keep the traceback
                    errors.append(e)
                    stop.set()
                    return
                with lock:
                    outcomes.append(o)
                    on_outcome(o, len(outcomes), len(cell_ids))
                if o.status == "interrupted":
                    stop.set()

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(max(1, self.jobs))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)
                    signals.check()  # a SIGTERM whose interrupt a library swallowed
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.main): stop the children, wait for them to exit
            stop.set()
            stop_children()
            for t in threads:
                t.join(timeout=60)
            raise
        if errors:
            raise errors[0]
        return outcomes


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or broken CUDA: run on CPU
        return 0
