"""Names in a run directory that other stages read without loading torch (the sweep waits for a
trunk's checkpoint by its path): checkpoint folders and their completion marker."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
#: written last into a checkpoint folder: the folder is complete when it exists
CHECKPOINT_STATE = "state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of ``run_dir``'s checkpoint after ``step`` updates (complete once its state.json exists)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"{STEP_PREFIX}{step:08d}"


def has_checkpoint(run_dir: str | Path, step: int) -> bool:
    return (checkpoint_dir(run_dir, step) / CHECKPOINT_STATE).is_file()
