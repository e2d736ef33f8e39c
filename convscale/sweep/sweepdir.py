"""The sweep directory: where a study's plan, cell configs, run dirs, locks and results live.

    SWEEP_DIR/
      study.json            the resolved study (StudyConfig.to_json)
      plan.json             every cell with its planned images, steps and FLOPs
      configs/<cell>.json   the cell's TrainConfig: `convscale train --config` reads it
      runs/<cell>/          an ordinary `convscale train` run dir (config.json, metrics.jsonl, result.json)
      locks/<cell>.lock     flock-held while the cell runs (runs/<cell>/run.lock: while any train runs it)
      logs/<cell>.out|.err  the training subprocess's stdout/stderr (appended across attempts)
      launches/<cell>.json  how the last attempt ran (devices, threads, host): for device-hours
      failures/<cell>.json  exit code and last stderr line of a failed attempt (removed on success)
      results.parquet|.csv  one row per cell (`convscale sweep collect`)
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from convscale.errors import UserError
from convscale.fileio import atomic_write_json, atomic_write_text, read_json
from convscale.status import FAILED, FINISHED, LOCKED, PENDING, RUNNING
from convscale.sweep.locking import is_locked
from convscale.sweep.planner import Cell, Plan, cell_train_config
from convscale.sweep.study import StudyConfig

RUN_LOCK_FILE = "run.lock"  # == convscale.train.rundir.LOCK_FILE (the train package imports torch)


def _numbers_part(train_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a TrainConfig dict that change a run's numbers (not run_dir, threads, ...)."""
    from convscale.train.config import numbers_part

    d = numbers_part(train_config)  # also of an older version's cell config (flat, fields added since)
    if d.get("data", {}).get("kind") == "procedural":  # a stream cache holds the same images as no cache
        d["data"] = {k: v for k, v in d["data"].items() if k != "path"}
    return d


class SweepDir:
    """Paths and state of one sweep directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- paths ---------------------------------------------------------------------------
    @property
    def study_path(self) -> Path:
        return self.root / "study.json"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def data_path(self) -> Path:
        return self.root / "data"

    def shares_data(self, study: StudyConfig) -> bool:
        return study.share_procedural_data and study.data.kind == "procedural" and not study.data.path

    def config_path(self, cell_id: str) -> Path:
        return self.root / "configs" / f"{cell_id}.json"

    def run_dir(self, cell_id: str) -> Path:
        return self.root / "runs" / cell_id

    def lock_path(self, cell_id: str) -> Path:
        return self.root / "locks" / f"{cell_id}.lock"

    def log_paths(self, cell_id: str) -> tuple[Path, Path]:
        return self.root / "logs" / f"{cell_id}.out", self.root / "logs" / f"{cell_id}.err"

    def launch_path(self, cell_id: str) -> Path:
        return self.root / "launches" / f"{cell_id}.json"

    def failure_path(self, cell_id: str) -> Path:
        return self.root / "failures" / f"{cell_id}.json"

    # --- writing the plan ----------------------------------------------------------------
    def prepare(self, plan: Plan) -> None:
        """Write study.json, plan.json and every cell's TrainConfig.

        A cell whose run has started may not change its config (its run dir would resume a
        different run); that is a UserError naming the fix. Cells are only ever added.
        """
        configs: dict[str, str] = {}
        data_path = str(self.data_path.resolve()) if self.shares_data(plan.study) else None
        for cell in plan.cells:
            cfg = cell_train_config(plan.study, cell, str(self.run_dir(cell.cell_id)), data_path,
                                    sweep_dir=str(self.root.resolve()))
            text = cfg.to_json() + "\n"
            old = read_json(self.config_path(cell.cell_id))
            if old is not None and _numbers_part(old) != _numbers_part(cfg.to_dict()) and self.run_dir(cell.cell_id).exists():
                raise UserError(
                    f"cell {cell.cell_id} already started in {self.root} with different settings; "
                    f"use a new --dir for the changed study, or delete {self.run_dir(cell.cell_id)} to rerun it"
                )
            configs[cell.cell_id] = text
        for cell_id, text in configs.items():
            if not self.config_path(cell_id).is_file() or self.config_path(cell_id).read_text() != text:
                atomic_write_text(self.config_path(cell_id), text)
        # keep cells of earlier versions of the study that have runs: their results stay collectable
        old_plan = read_json(self.plan_path) or {}
        new_ids = {c.cell_id for c in plan.cells}
        kept = [c for c in old_plan.get("cells", []) if c["cell_id"] not in new_ids and self.run_dir(c["cell_id"]).exists()]
        d = plan.to_dict()
        d["cells"] = d["cells"] + kept
        plan.study.write(self.study_path)
        atomic_write_json(self.plan_path, d)

    def ensure_shared_data(self, plan: Plan, log=print) -> None:
        """Generate the shared procedural stream (once; again only if a longer cell was added)."""
        if not self.shares_data(plan.study) or not plan.cells:
            return
        import shutil
        import time

        from convscale.data.procedural import materialize
        from convscale.sweep.locking import CellLock

        need = max(c.images for c in plan.cells)
        lock = CellLock(self.root / "locks" / "data.lock")
        while not lock.acquire():  # another sweep is generating it: wait, then use its result
            time.sleep(2)
        try:
            have = (read_json(self.data_path / "meta.json") or {}).get("num_images", 0)
            if have >= need:
                return
            log(f"generating the shared procedural stream: {need} images at {plan.study.data.resolution} px "
                f"into {self.data_path}", flush=True)
            start = time.monotonic()
            tmp = self.root / "data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            materialize(plan.study.data, need, str(tmp))
            old = self.root / "data.old"
            shutil.rmtree(old, ignore_errors=True)
            if self.data_path.exists():  # running cells keep reading their open (memory-mapped) files
                self.data_path.rename(old)
            tmp.rename(self.data_path)
            shutil.rmtree(old, ignore_errors=True)
            log(f"  done in {time.monotonic() - start:.0f} s", flush=True)
        finally:
            lock.release()

    # --- reading -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.study_path.is_file() and self.plan_path.is_file()

    def load(self) -> tuple[StudyConfig, list[Cell]]:
        """The study and cells written by ``prepare``; UserError if this is not a sweep dir."""
        if not self.exists():
            raise UserError(
                f"{self.root} holds no sweep (no study.json/plan.json); run "
                f"`convscale sweep run STUDY.toml --dir {self.root}` first, or give the sweep's directory"
            )
        study_dict = read_json(self.study_path)
        if not isinstance(study_dict, dict):
            raise UserError(f"{self.study_path} is damaged; rerun `convscale sweep run STUDY.toml --dir {self.root}` "
                            f"to rewrite it (finished cells are kept)")
        study = StudyConfig.from_dict(study_dict)
        plan = read_json(self.plan_path)
        try:
            return study, [Cell.from_dict(c) for c in plan["cells"]]
        except (TypeError, KeyError, ValueError, UserError) as e:
            detail = f" ({e})" if isinstance(e, UserError) else ""
            raise UserError(f"{self.plan_path} is damaged{detail}; rerun `convscale sweep run STUDY.toml --dir {self.root}` "
                            f"to rewrite it (finished cells are kept)") from None

    def result(self, cell_id: str) -> Optional[dict[str, Any]]:
        """The cell's result.json (written by train at the end of the run), if any."""
        return read_json(self.run_dir(cell_id) / "result.json")

    def state(self, cell_id: str) -> str:
        """done | diverged (finished), running (a sweep holds the cell lock), locked (a train outside
        any sweep holds the run directory's lock), failed (last attempt failed) or pending."""
        res = self.result(cell_id)
        if res is not None and res.get("status") in FINISHED:
            return res["status"]
        if is_locked(self.lock_path(cell_id)):
            return RUNNING
        if is_locked(self.run_dir(cell_id) / RUN_LOCK_FILE):
            return LOCKED
        if self.failure_path(cell_id).is_file():
            return FAILED
        return PENDING

    def train_command(self, cell_id: str, prefix: Optional[list[str]] = None) -> list[str]:
        """The command that runs (or resumes) the cell, exactly as a human could type it."""
        prefix = prefix or [sys.executable, "-m", "convscale", "train"]
        return [*prefix, "--config", str(self.config_path(cell_id)), "--run-dir", str(self.run_dir(cell_id))]

    def train_command_text(self, cell_id: str) -> str:
        return shlex.join(["python", "-m", "convscale", "train"] + self.train_command(cell_id)[4:])
