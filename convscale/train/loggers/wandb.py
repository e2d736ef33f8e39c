"""Weights & Biases: one W&B run per convscale run, its resolved config as the run's config.

Offline (``WANDB_MODE=offline`` or ``mode = "offline"``) it writes RUN_DIR/wandb/offline-run-*
for a later ``wandb sync``. The run id is stored in the run directory: a resumed run continues the
same W&B run (``resume="allow"``) and skips the rows the interrupted attempt already logged (W&B
steps only go forward). Offline, each attempt is its own offline-run folder with that same id.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from convscale.errors import UserError
from convscale.train.loggers.base import LoggerContext, require, scalars

EXTRA = "wandb"


@dataclass
class Options:
    project: str = "convscale"
    entity: Optional[str] = None  # None: the logged-in user's default entity
    group: Optional[str] = None  # a sweep's cells: the sweep's name
    mode: Optional[str] = None  # "online" | "offline" | "disabled"; None: WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)


def sweep_defaults(sweep_name: str, sweep_dir: Optional[Path]) -> dict[str, Any]:
    return {"group": sweep_name}


class WandbLogger:
    def __init__(self, options: Options, ctx: LoggerContext):
        wandb = require("wandb", EXTRA)
        run_id = ctx.state.get("run_id") or uuid.uuid4().hex[:16]  # W&B ids: [a-z0-9]
        try:
            self.run = wandb.init(
                project=options.project, entity=options.entity, group=options.group, name=ctx.run_name,
                id=run_id, resume="allow", dir=str(ctx.run_dir), config=ctx.resolved, mode=options.mode,
                tags=options.tags or None, reinit="create_new",
                settings=wandb.Settings(console="off"),  # stdout stays the run's own (progress line, result)
            )
        except Exception as e:
            raise UserError(f"wandb could not start a run ({type(e).__name__}: {e}); run `wandb login`, "
                            f"or set WANDB_MODE=offline") from None
        self.skip = ctx.replayed
        self.state = {"run_id": run_id, "project": options.project, "group": options.group}

    def write(self, row: dict[str, Any]) -> None:
        if (row.get("kind"), row["step"]) in self.skip:
            return
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()

    def abandon(self) -> None:
        self.run.finish(exit_code=1)


def build(options: Options, ctx: LoggerContext) -> WandbLogger:
    return WandbLogger(options, ctx)
