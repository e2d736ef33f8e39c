"""Run a study into a sweep directory: plan, skip finished cells, execute the rest, write results."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from convscale.errors import UserError
from convscale.status import BLOCKED, FAILED, FINISHED, INTERRUPTED, LOCKED
from convscale.sweep.study import StudyConfig


@dataclass
class SweepOutcome:
    root: Path
    cells: int
    finished_before: int
    outcomes: list = field(default_factory=list)
    results_path: Optional[Path] = None
    status_counts: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:
        """Cells that did not finish and need a fix: failed, or a branch its trunk cannot serve."""
        return [o for o in self.outcomes if o.status in (FAILED, BLOCKED)]

    @property
    def interrupted(self) -> bool:
        return any(o.status == INTERRUPTED for o in self.outcomes)

    @property
    def locked(self) -> list:
        return [o for o in self.outcomes if o.status == LOCKED]


def run_sweep(
    study: StudyConfig,
    root: str | Path,
    executor: str = "local",
    jobs: int = 1,
    only: Sequence[str] = (),
    slurm: Optional[dict] = None,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
    options: Optional[dict] = None,
    live: Optional[bool] = None,
):
    """Run every unfinished cell of ``study`` under ``root``; finished cells (done or diverged) are
    skipped, crashed ones rerun (their runs resume). Returns a ``SweepOutcome`` and writes
    ``results.parquet`` / ``results.csv``.

    ``executor``: a name in ``convscale.sweep.executors.EXECUTORS``; ``options``: its Config fields
    (``jobs`` is the local executor's, ``slurm`` the slurm executor's options, as before).
    ``live``: the refreshing progress line (convscale.sweep.live); None: when stdout is a terminal."""
    from convscale.sweep.executors import build_executor, executor_config
    from convscale.sweep.live import LiveLine
    from convscale.sweep.planner import plan_study
    from convscale.sweep.results import collect, write_results
    from convscale.sweep.smoke import check_no_mixing
    from convscale.sweep.sweepdir import SweepDir

    if options is None:
        options = {"jobs": jobs} if executor == "local" else dict(slurm or {})
    config = executor_config(executor, options)
    runner = build_executor(executor, config)  # bad options are refused before anything is written
    check_no_mixing(root, study)
    plan = plan_study(study)
    sweep = SweepDir(root)
    sweep.prepare(plan)
    cells = [c for c in plan.cells if not only or any(t in c.cell_id for t in only)]
    if not cells:
        raise UserError(f"--only {list(only)} matches no cell id; run `convscale sweep plan` to see the ids")
    states = {c.cell_id: sweep.state(c.cell_id) for c in cells}
    todo = [c.cell_id for c in cells if states[c.cell_id] not in FINISHED]
    out = SweepOutcome(root=sweep.root, cells=len(cells), finished_before=len(cells) - len(todo))
    log(f"sweep {sweep.root}: {len(cells)} cells, {out.finished_before} finished, {len(todo)} to run")
    if todo:
        sweep.ensure_shared_data(plan)

    line = LiveLine(sweep.root, todo, min(config.parallel_cells, len(todo)), log, enabled=live)

    def report(o, i, n) -> None:
        extra = f" ({o.seconds:.1f} s)" if o.seconds else ""
        msg = f": {o.message}" if o.message else ""
        line.write(f"[{i}/{n}] {o.status:<11} {o.cell_id}{extra}{msg}")

    if todo:
        with line:
            out.outcomes = runner.run(sweep.root, todo, on_outcome=report)
    df = collect(sweep.root)
    out.results_path, _ = write_results(sweep.root, df)
    out.status_counts = df["status"].value_counts().to_dict()
    log(f"results: {out.results_path} "
        f"({', '.join(f'{v} {k}' for k, v in sorted(out.status_counts.items()))})")
    if out.locked:
        log(f"{len(out.locked)} cell(s) skipped because another sweep holds their lock: "
            f"{', '.join(o.cell_id for o in out.locked)}")
    if out.failed:
        print(f"{len(out.failed)} cell(s) failed; logs in {sweep.root / 'logs'}; "
              f"rerun the same command to retry them", file=sys.stderr)
    return out
