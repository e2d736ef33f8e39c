"""Pre-training: TrainConfig -> a run directory with config.json, metrics.jsonl, checkpoints, result.json.

    from convscale.train import TrainConfig, run
    result = run(TrainConfig(run_dir="runs/a", model="nfnet-tiny", steps=100))
"""

from __future__ import annotations

from convscale.train.config import TrainConfig, apply_overrides, budget_to_steps

from convscale.status import EXIT_DIVERGED


def run(cfg: TrainConfig, restart: bool = False, source=None) -> dict:
    """Train, resume or report the run ``cfg`` describes; returns result.json's dict."""
    from convscale.train.loop import run as _run

    return _run(cfg, restart=restart, source=source)


__all__ = ["EXIT_DIVERGED", "TrainConfig", "apply_overrides", "budget_to_steps", "run"]
