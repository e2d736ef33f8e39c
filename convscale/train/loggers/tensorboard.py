"""TensorBoard event files: ``tensorboard --logdir RUN_DIR/tensorboard`` (or a sweep's ``runs/``).

A resumed run writes a new event file that starts with a purge at the checkpoint step + 1: the
steps the interrupted attempt logged past its checkpoint are dropped by TensorBoard's reader and
logged again, so every (tag, step) appears once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from convscale.train.loggers.base import LoggerContext, require, scalars

EXTRA = "tensorboard"
EVENTS_DIR = "tensorboard"  # RUN_DIR/tensorboard unless Options.dir is given


@dataclass
class Options:
    dir: Optional[str] = None  # None: RUN_DIR/tensorboard; else DIR/<group>/<run name>
    group: Optional[str] = None  # a subfolder of ``dir``: a sweep's cells share the sweep's name


def sweep_defaults(sweep_name: str, sweep_dir: Optional[Path]) -> dict[str, Any]:
    return {"group": sweep_name}


def log_dir(options: Options, ctx: LoggerContext) -> Path:
    if options.dir is None:
        return ctx.run_dir / EVENTS_DIR
    return Path(options.dir).expanduser() / (options.group or "") / ctx.run_name


def after_earlier_files(path: Path) -> None:
    """Wait (at most 1 s) until a new event file's name sorts after the existing ones'.

    TensorBoard reads a folder's files in name order, and the name starts with the creation
    time in whole seconds (then host, pid, a counter: not ordered): a resume within the same
    second would otherwise be read before the attempt it continues."""
    stamps = [int(p.name.split(".")[3]) for p in path.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    wait = max(stamps, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(min(wait, 1.0))


class TensorBoardLogger:
    def __init__(self, options: Options, ctx: LoggerContext):
        require("tensorboard", EXTRA)
        from torch.utils.tensorboard import SummaryWriter

        path = log_dir(options, ctx)
        earlier = path.is_dir() and any(path.glob("events.out.tfevents.*"))
        if earlier:
            after_earlier_files(path)
        self.writer = SummaryWriter(str(path), purge_step=ctx.start_step + 1 if earlier else None)
        if not earlier:
            self.writer.add_text("config", "```\n" + json.dumps(ctx.resolved, indent=2, sort_keys=True) + "\n```", 0)
        self.state = {"log_dir": str(path)}

    def write(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        # now, not within flush_secs: a killed run must not lose steps up to its checkpoint
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build(options: Options, ctx: LoggerContext) -> TensorBoardLogger:
    return TensorBoardLogger(options, ctx)
