"""MLflow: one MLflow run per convscale run, in a local file store or on a tracking server.

The store is ``tracking_uri``, else $MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns (a
sweep's cells share SWEEP_DIR/mlruns, one experiment named after the sweep). MLflow 3 refuses file
stores unless MLFLOW_ALLOW_FILE_STORE is true; a run that asks for one sets it (unless already set).
The run id is stored in the run directory: a resumed run continues the same MLflow run and skips
each metric's steps it already holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from convscale.errors import UserError
from convscale.train.loggers.base import LoggerContext, require, scalars

EXTRA = "mlflow"
STORE_DIR = "mlruns"
MAX_BATCH_PARAMS = 100  # MLflow's limit per log_batch call
MAX_PARAM_CHARS = 6000


@dataclass
class Options:
    tracking_uri: Optional[str] = None  # a path, file:, sqlite: or http(s): URI
    experiment: str = "convscale"  # a sweep's cells: the sweep's name


def sweep_defaults(sweep_name: str, sweep_dir: Optional[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"experiment": sweep_name}
    if sweep_dir is not None and not os.environ.get("MLFLOW_TRACKING_URI"):
        out["tracking_uri"] = str(Path(sweep_dir).resolve() / STORE_DIR)
    return out


def tracking_uri(options: Options, run_dir: Path) -> str:
    uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(run_dir.resolve() / STORE_DIR)
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter is a path too)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


#: in a local store's folder: held while a cell looks up or creates its experiment
EXPERIMENT_LOCK = ".convscale-experiment.lock"


def _local_store(uri: str) -> Optional[Path]:
    """The folder of a file-store URI (a path or file://...), None for a server or database."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(uri)
    return None


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``train.lr`` -> "0.1" (lists and None as JSON)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_CHARS]
    return out


class MlflowLogger:
    def __init__(self, options: Options, ctx: LoggerContext):
        require("mlflow", EXTRA)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(options, ctx.run_dir)
        self.logged: dict[str, int] = {}  # metric -> last step the store holds (a resumed run)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if ctx.state.get("run_id") and ctx.state.get("tracking_uri") == uri:
                self.run_id = ctx.state["run_id"]
                run = self.client.get_run(self.run_id)
                for key in run.data.metrics:
                    self.logged[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment_id = self._experiment(options.experiment, uri)
                run = self.client.create_run(experiment_id, run_name=ctx.run_name,
                                             tags={"convscale.run_dir": str(ctx.run_dir.resolve())})
                self.run_id = run.info.run_id
                params = [Param(k, v) for k, v in flat_params(ctx.resolved).items()]
                for i in range(0, len(params), MAX_BATCH_PARAMS):
                    self.client.log_batch(self.run_id, params=params[i:i + MAX_BATCH_PARAMS])
        except UserError:
            raise
        except Exception as e:
            database = urlparse(uri).scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")
            fix = ("a database store needs the full package (pip install mlflow; convscale[mlflow] is mlflow-skinny)"
                   if database else "fix log_options.mlflow.tracking_uri or $MLFLOW_TRACKING_URI")
            raise UserError(f"mlflow could not start a run at {uri} ({type(e).__name__}: {str(e)[:200]}); "
                            f"{fix}") from None
        self.state = {"run_id": self.run_id, "tracking_uri": uri, "experiment": options.experiment}

    def _experiment(self, name: str, uri: str) -> str:
        """The experiment ``name``, created if missing. In a file store two cells starting at once
        would each create one (its name check is not atomic): there the store's lock file serialises it."""
        store = _local_store(uri)
        if store is None:
            return self._get_or_create(name)
        store.mkdir(parents=True, exist_ok=True)
        with open(store / EXPERIMENT_LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return self._get_or_create(name)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _get_or_create(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another cell of the sweep created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def write(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now_ms = row["step"], int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, step) for key, value in scalars(row).items()
                   if step > self.logged.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def abandon(self) -> None:
        self.client.set_terminated(self.run_id, "KILLED")


def build(options: Options, ctx: LoggerContext) -> MlflowLogger:
    return MlflowLogger(options, ctx)
