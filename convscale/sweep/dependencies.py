"""Which cells may start now: a cooldown branch waits for its trunk's checkpoint at the branch's
first step (sweep/planner.py); every other cell is ready at once. Torch-free: the sweep reads the
trunk's run directory by path (train/layout.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from convscale.sweep.planner import Cell
from convscale.sweep.sweepdir import SweepDir
from convscale.train.layout import has_checkpoint

READY, WAIT, BLOCKED = "ready", "wait", "blocked"


@dataclass(frozen=True)
class Gate:
    state: str  # READY | WAIT | BLOCKED
    reason: str = ""


def gate(sweep: SweepDir, cell: Cell, outstanding: Iterable[str] = ()) -> Gate:
    """May ``cell`` start? ``outstanding``: cells this invocation still runs or will run (a trunk
    among them is worth waiting for; one that is not will write no more checkpoints)."""
    if cell.role != "branch" or cell.trunk_id is None or cell.start_step is None:
        return Gate(READY)
    if has_checkpoint(sweep.run_dir(cell.trunk_id), cell.start_step):
        return Gate(READY)
    state = sweep.state(cell.trunk_id)
    if state == "diverged":  # before the branch point: the branch records the same divergence itself
        return Gate(READY)
    if cell.trunk_id in set(outstanding) or state in ("running", "locked"):
        return Gate(WAIT, f"its trunk {cell.trunk_id} has not reached step {cell.start_step} yet")
    if state == "done":
        return Gate(BLOCKED, f"its trunk {cell.trunk_id} finished without a checkpoint at step {cell.start_step}; "
                             f"remove {sweep.run_dir(cell.trunk_id)} and run the sweep again to retrain it")
    return Gate(BLOCKED, f"its trunk {cell.trunk_id} is {state}; run the sweep again once the trunk can run "
                         f"(see {sweep.log_paths(cell.trunk_id)[1]})")


def trunks_first(cells: list[Cell]) -> list[Cell]:
    """The cells with every trunk before the branches (stable otherwise)."""
    return sorted(cells, key=lambda c: c.role != "trunk")
