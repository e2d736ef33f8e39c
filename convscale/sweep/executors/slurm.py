"""The ``slurm`` executor: one submitit array task per cell (``cluster="local"`` runs them here)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from convscale.sweep.executors.cell import CellOutcome, Resources, run_cell
from convscale.sweep.fsutil import atomic_write_json
from convscale.sweep.sweepdir import SweepDir


@dataclass(frozen=True)
class Config:
    """Options of the Slurm executor (`sweep run --executor slurm --partition ... --time ...`)."""

    partition: Optional[str] = None
    gpus_per_node: int = 0  # GPUs per cell (N > 1: one torchrun of N processes)
    cpus_per_task: int = 4
    timeout_minutes: int = 60  # per cell
    array_parallelism: int = 64  # array tasks at once
    cluster: Optional[str] = None  # None: submitit's detection (slurm when sbatch exists); "local": here
    extra_parameters: dict = field(default_factory=dict)  # passed to submitit's update_parameters

    @property
    def parallel_cells(self) -> int:
        """Cells that run at once at most (the ETA's workers; the queue may grant fewer)."""
        return self.array_parallelism


def build(config: Config, train_command: Optional[list[str]] = None,
          on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> "SlurmExecutor":
    return SlurmExecutor(partition=config.partition, gpus_per_node=config.gpus_per_node,
                         cpus_per_task=config.cpus_per_task, timeout_minutes=config.timeout_minutes,
                         array_parallelism=config.array_parallelism, cluster=config.cluster,
                         train_command=train_command, extra_parameters=dict(config.extra_parameters),
                         on_outcome=on_outcome)


def _array_task(root: str, cell_id: str, resources: Resources, train_command: Optional[list[str]]) -> CellOutcome:
    """One Slurm array task (module-level so submitit can pickle it). A cooldown branch starts
    after its trunk's job (a Slurm dependency); where the cluster has none (submitit's local one)
    it waits here while the trunk has not written its branch point yet."""
    from convscale.sweep.dependencies import BLOCKED, READY, gate

    sweep = SweepDir(root)
    cell = next((c for c in sweep.load()[1] if c.cell_id == cell_id), None)
    while cell is not None:
        trunk_open = cell.trunk_id is not None and sweep.state(cell.trunk_id) in ("pending", "running", "locked")
        g = gate(sweep, cell, [cell.trunk_id] if trunk_open else [])
        if g.state == READY:
            break
        if g.state == BLOCKED:
            return CellOutcome(cell_id, "blocked", message=g.reason)
        time.sleep(BRANCH_POLL_SECONDS)
    return run_cell(root, cell_id, resources, train_command)


#: how often a branch's task looks for its trunk's checkpoint where Slurm did not hold it back
BRANCH_POLL_SECONDS = 1.0


def torchrun_train_command(processes: int) -> list[str]:
    """``convscale train`` as ``processes`` data-parallel processes on this node (one per GPU)."""
    if processes <= 1:
        return [sys.executable, "-m", "convscale", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "convscale", "train"]


@dataclass
class SlurmExecutor:
    """One submitit array task per cell. ``cluster="local"`` runs the tasks here (for tests).

    With ``gpus_per_node`` N > 1 a cell trains on all N GPUs (torchrun, DDP), so the N
    device-hours it is charged are N GPUs at work, not one working and N - 1 idle."""

    partition: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    timeout_minutes: int = 60
    array_parallelism: int = 64
    cluster: Optional[str] = None  # None: submitit's detection (slurm when sbatch exists)
    train_command: Optional[list[str]] = None
    extra_parameters: dict = field(default_factory=dict)
    on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None

    def submit(self, root: str | Path, cell_ids: list[str]) -> list:
        """Submit the cells as one job array; returns submitit jobs (``job.result()`` is a CellOutcome)."""
        import submitit

        root = str(Path(root).resolve())
        executor = submitit.AutoExecutor(folder=str(Path(root) / "submitit" / "%j"), cluster=self.cluster)
        params = dict(timeout_min=self.timeout_minutes, cpus_per_task=self.cpus_per_task,
                      slurm_array_parallelism=self.array_parallelism, name=f"convscale-{Path(root).name}")
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.partition:
            params["slurm_partition"] = self.partition
        params.update(self.extra_parameters)
        executor.update_parameters(**params)
        # Slurm sets CUDA_VISIBLE_DEVICES itself; keep it (gpu="") out of our env unless on CPU
        res = Resources(threads=self.cpus_per_task, gpu=None)
        if self.gpus_per_node:
            res = _SlurmGpuResources(threads=self.cpus_per_task, gpus=self.gpus_per_node)
        command = self.cell_command()
        # trunks (and cells of their own) first; each trunk's branches as an array held until its job ends
        cells = {c.cell_id: c for c in SweepDir(root).load()[1]}
        first = [cid for cid in cell_ids if cells.get(cid) is None or cells[cid].role != "branch"]
        jobs = dict(zip(first, executor.map_array(_array_task, [root] * len(first), first, [res] * len(first),
                                                  [command] * len(first))))
        groups: dict[str, list[str]] = {}
        for cid in cell_ids:
            if cid not in jobs:
                groups.setdefault(str(cells[cid].trunk_id), []).append(cid)
        for trunk, branch_ids in groups.items():
            if trunk in jobs:
                executor.update_parameters(slurm_additional_parameters={
                    **params.get("slurm_additional_parameters", {}), "dependency": f"afterany:{jobs[trunk].job_id}"})
            n = len(branch_ids)
            jobs.update(zip(branch_ids, executor.map_array(_array_task, [root] * n, branch_ids, [res] * n,
                                                           [command] * n)))
        return [jobs[cid] for cid in cell_ids]

    def cell_command(self) -> list[str]:
        """The command prefix each array task runs its cell with."""
        return self.train_command or torchrun_train_command(self.gpus_per_node)

    def run(self, root: str | Path, cell_ids: list[str],
            on_outcome: Optional[Callable[[CellOutcome, int, int], None]] = None) -> list[CellOutcome]:
        """Submit and wait for every task; a task that died without an outcome is recorded as failed."""
        on_outcome = on_outcome or self.on_outcome
        sweep = SweepDir(root)
        outcomes = []
        jobs = self.submit(root, cell_ids)
        for i, (cid, job) in enumerate(zip(cell_ids, jobs)):
            try:
                o = job.result()
            except Exception as e:  # killed by Slurm (time limit, pre-emption) or the task crashed
                last = (str(e).strip().splitlines() or [""])[-1]
                atomic_write_json(sweep.failure_path(cid),
                                  {"exit_code": None, "last_stderr_line": f"slurm job {job.job_id}: {last}",
                                   "time": time.time()})
                o = CellOutcome(cid, "failed", None, 0.0, f"slurm job {job.job_id}: {last}")
            outcomes.append(o)
            if on_outcome:
                on_outcome(o, i + 1, len(cell_ids))
        return outcomes


@dataclass(frozen=True)
class _SlurmGpuResources(Resources):
    """GPU resources whose CUDA_VISIBLE_DEVICES is set by Slurm, not by us."""

    gpus: int = 1

    @property
    def devices(self) -> int:
        return self.gpus

    @property
    def device_kind(self) -> str:
        return "gpu"

    def env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
