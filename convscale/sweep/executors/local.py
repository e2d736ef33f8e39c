"""The ``local`` executor: cells as subprocesses on this machine, ``jobs`` at once."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from convscale import signals
from convscale.errors import UserError
from convscale.sweep.executors import forkserver
from convscale.sweep.executors.cell import (CellOutcome, Resources, _die_with_parent, cell_env, run_cell, stop_children,
                                            visible_gpus)
from convscale.sweep.sweepdir import SweepDir


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
    fork: bool = True  # CPU cells forked from a warm process per slot (forkserver.py) where available

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
        todo = Todo(root, cell_ids)
        outcomes: list[CellOutcome] = []
        stop = threading.Event()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def record(o: CellOutcome) -> None:
            with lock:
                outcomes.append(o)
                on_outcome(o, len(outcomes), len(cell_ids))

        servers: list[Optional[forkserver.ForkServer]] = [None] * max(1, self.jobs)  # one per slot, made when used

        def server_for(slot: int, resources: Resources) -> "forkserver.ForkServer | None":
            """A warm process to fork this slot's CPU cells from (forkserver.py), or None."""
            if not self.fork or resources.gpu is not None or self.train_command is not None or not forkserver.available():
                return None
            if servers[slot] is None:
                servers[slot] = forkserver.ForkServer(cell_env(resources), preexec_fn=_die_with_parent(os.getpid()))
            return servers[slot]

        def worker(slot: int) -> None:
            while not stop.is_set():
                cid, blocked = todo.take()
                for o in blocked:
                    record(o)
                if cid is None:
                    if todo.empty:
                        return
                    stop.wait(WAIT_SECONDS)  # a branch waits for its trunk's checkpoint
                    continue
                try:
                    res = self.resources(slot)
                    o = run_cell(root, cid, res, self.train_command, server=server_for(slot, res))
                except BaseException as e:  # our bug: stop the sweep, keep the traceback
                    errors.append(e)
                    stop.set()
                    return
                todo.finished(cid)
                record(o)
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
        finally:
            for server in servers:
                if server is not None:
                    server.close()
        if errors:
            raise errors[0]
        return outcomes


#: how often a worker with nothing ready looks again (a branch waiting for its trunk's checkpoint)
WAIT_SECONDS = 0.5


class Todo:
    """The cells still to run, handed out when ready (sweep/dependencies.py): trunks first, a
    branch once its trunk's checkpoint exists; a branch whose trunk can write none is given back as a
    ``blocked`` outcome. Thread-safe."""

    def __init__(self, root: str | Path, cell_ids: list[str]):
        from convscale.sweep.dependencies import trunks_first

        self.sweep = SweepDir(root)
        try:
            cells = {c.cell_id: c for c in self.sweep.load()[1]}
        except UserError:  # no plan (a bare list of run configs): every cell is ready
            cells = {}
        self.cells = cells
        known = trunks_first([cells[c] for c in cell_ids if c in cells])
        self.pending = [c.cell_id for c in known] + [c for c in cell_ids if c not in cells]
        self.running: set[str] = set()
        self._lock = threading.Lock()

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self.pending

    def take(self) -> tuple[Optional[str], list[CellOutcome]]:
        """The next ready cell (None if none is ready now) and the cells found blocked meanwhile."""
        from convscale.sweep.dependencies import BLOCKED, READY, gate

        blocked: list[CellOutcome] = []
        with self._lock:
            outstanding = set(self.pending) | self.running
            for cid in list(self.pending):
                cell = self.cells.get(cid)
                g = gate(self.sweep, cell, outstanding - {cid}) if cell is not None else None
                if g is None or g.state == READY:
                    self.pending.remove(cid)
                    self.running.add(cid)
                    return cid, blocked
                if g.state == BLOCKED:
                    self.pending.remove(cid)
                    blocked.append(CellOutcome(cid, "blocked", message=g.reason))
        return None, blocked

    def finished(self, cell_id: str) -> None:
        with self._lock:
            self.running.discard(cell_id)


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or broken CUDA: run on CPU
        return 0
