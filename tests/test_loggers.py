"""Metric loggers: the registry, the fan-out, and the three experiment trackers read back with
their own readers (TensorBoard's EventAccumulator, MLflow's client, W&B's offline run file), also
across a run killed after logging past its checkpoint and resumed. Tiny NFNet runs at 16 px."""

from __future__ import annotations

import json
import struct
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from convscale.data import build_source
from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.train.config import TrainConfig, apply_overrides
from convscale.train.loggers import LOGGERS, check_log
from convscale.train.loggers.base import STATE_FILE, scalars
from convscale.train.loggers.fanout import TrackerFailed
from convscale.train.loop import run
from convscale.train.metrics import read_metrics

torch.set_num_threads(1)
DATA = DataConfig(resolution=16, num_classes=4, heldout_images=32, workers=0)


def tiny(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), model="nfnet-tiny", data=DATA, batch_size=16, steps=12, lr=0.2,
                agc_exempt_scalar_gains=True, log_every_steps=2, eval_every_steps=6, checkpoint_every_seconds=0,
                checkpoint_every_steps=4, threads=1, quiet=True)
    return TrainConfig().replace(**{**base, **kw})


class KilledAt:
    """The data source of ``cfg``, raising (as a kill would) when batch ``step`` is asked for."""

    def __init__(self, cfg: TrainConfig, step: int):
        self.source, self.step = build_source(cfg.data), step

    def __getattr__(self, name):
        return getattr(self.source, name)

    def train_batches(self, batch_size, start_step=0, *args, **kw):
        for k, batch in enumerate(self.source.train_batches(batch_size, start_step, *args, **kw), start_step):
            if k == self.step:
                raise KeyboardInterrupt("simulated kill")
            yield batch


def killed_and_resumed(cfg: TrainConfig) -> list[dict]:
    """Run ``cfg`` killed at step 11 (after the step-8 checkpoint and the step-10 log row), resume
    it; the resumed run's metrics.jsonl rows."""
    with pytest.raises(KeyboardInterrupt):
        run(cfg, source=KilledAt(cfg, 11))
    first = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert max(r["step"] for r in first) == 10  # logged past the checkpoint: the resume redoes 9..10
    assert run(cfg)["status"] == "done"
    return read_metrics(Path(cfg.run_dir) / "metrics.jsonl")


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every tracker scalar of metrics.jsonl rows: tag -> [(step, value)], in step order."""
    out: dict[str, list] = {}
    for row in rows:
        for tag, value in scalars(row).items():
            out.setdefault(tag, []).append((row["step"], value))
    return out


# ------------------------------------------------------------------ registry, config, fan-out


def test_log_config_is_checked_coerced_and_round_trips():
    cfg = apply_overrides(TrainConfig(steps=1), {"log": "tensorboard,mlflow", "log_options.wandb.tags": "a,b",
                                                 "log_options.mlflow.experiment": "exp"})
    assert cfg.runtime.log == ["tensorboard", "mlflow"]
    assert cfg.runtime.log_options == {"wandb": {"tags": ["a", "b"]}, "mlflow": {"experiment": "exp"}}
    cfg.validate()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig().runtime.log == [] and set(LOGGERS) == {"tensorboard", "wandb", "mlflow"}
    for log, options, message in [
        (["neptune"], {}, r"unknown logger 'neptune'.*valid: \['mlflow', 'tensorboard', 'wandb'\]"),
        (["wandb", "wandb"], {}, "names a logger twice"),
        ([], {"wandb": {"projekt": "p"}}, r"unknown log_options.wandb field\(s\) \['projekt'\]"),
        ([], {"mlflow": {"experiment": 3}}, "log_options.mlflow.experiment must be a str"),
    ]:
        with pytest.raises(UserError, match=message):
            check_log(log, options)
    with pytest.raises(UserError, match="unknown field 'projekt'"):
        apply_overrides(TrainConfig(), {"log_options.wandb.projekt": "p"})


def test_cli_log_flag_sets_the_field():
    from convscale.cli.main import build_parser
    from convscale.cli.train import build_config

    args = build_parser().parse_args(["train", "--run-dir", "r", "--steps", "1", "--log", "tensorboard,wandb",
                                      "--set", "log_options.wandb.mode=offline"])
    cfg = build_config(args)
    assert cfg.runtime.log == ["tensorboard", "wandb"] and cfg.runtime.log_options == {"wandb": {"mode": "offline"}}


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(UserError) as e:
        run(tiny(tmp_path, "r", steps=2, log=[name]))
    assert str(e.value) == f"logging to {name} needs the {package} package: pip install 'convscale[{name}]'"


def test_a_new_logger_is_one_module_and_a_failure_after_start_is_warned_once(tmp_path, monkeypatch):
    seen: list[tuple[str, int]] = []

    @dataclass
    class Options:
        fail_after_rows: int = 2

    class Flaky:
        state = {"id": "flaky-1"}

        def __init__(self, options, ctx):
            self.left = options.fail_after_rows

        def write(self, row):
            if not self.left:
                raise ConnectionError("tracker server went away")
            self.left -= 1
            seen.append((row["kind"], row["step"]))

        def close(self):
            raise AssertionError("a dropped logger is not closed")

    module = types.ModuleType("flaky_logger")
    module.Options, module.EXTRA, module.build = Options, "flaky", Flaky
    module.sweep_defaults = lambda name, sweep_dir: {}
    monkeypatch.setitem(sys.modules, "flaky_logger", module)
    monkeypatch.setitem(LOGGERS, "flaky", "flaky_logger")
    cfg = tiny(tmp_path, "r", log=["flaky"], log_options={"flaky": {"fail_after_rows": 2}})
    with pytest.warns(TrackerFailed, match="the flaky logger failed .ConnectionError: tracker server went away") as w:
        result = run(cfg)
    assert result["status"] == "done" and len([x for x in w if x.category is TrackerFailed]) == 1
    assert seen == [("train", 2), ("train", 4)]
    rows = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")  # metrics.jsonl has every row all the same
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 2), ("train", 4), ("train", 6), ("eval", 6), ("train", 8), ("train", 10), ("train", 12), ("eval", 12)]
    assert json.loads((Path(cfg.run_dir) / STATE_FILE).read_text()) == {"flaky": {"id": "flaky-1"}}


# ------------------------------------------------------------------ TensorBoard


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


TIMINGS = ("train/wall_seconds", "eval/wall_seconds", "train/images_per_second")


def assert_same_scalars(got: dict, want: dict, rel: float = 0.0, timings: bool = True) -> None:
    """Each tag at the same steps (each once, in order) with the same values; ``timings=False``:
    clock readings only at the same steps (a resume may keep the killed attempt's)."""
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        if timings or tag not in TIMINGS:
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=rel, abs=0), tag


def test_tensorboard_reader_reads_the_scalars_back(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny(tmp_path, "r", log=["tensorboard"])
    run(cfg)
    rows = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    got = tensorboard_scalars(Path(cfg.run_dir) / "tensorboard")
    assert got["train/loss"][0][0] == 2 and [s for s, _ in got["eval/heldout_top1"]] == [6, 12]
    assert_same_scalars(got, expected(rows), rel=1e-6)  # event files hold float32
    # --restart wipes the tracker files with the run (they are a run's own entries)
    run(cfg.replace(steps=4), restart=True)
    assert [s for s, _ in tensorboard_scalars(Path(cfg.run_dir) / "tensorboard")["train/loss"]] == [2, 4]


def test_only_the_process_that_writes_files_logs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import convscale.train.loop as loop

    monkeypatch.setattr(loop, "is_main_process", lambda: False)  # as on rank 1 of a torchrun job
    cfg = tiny(tmp_path, "r", steps=4, log=["tensorboard"])
    run(cfg)
    assert not (Path(cfg.run_dir) / "tensorboard").exists() and not (Path(cfg.run_dir) / STATE_FILE).exists()


# ------------------------------------------------------------------ MLflow


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_mlflow_client_reads_the_metrics_and_config_back(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    cfg = tiny(tmp_path, "r", log=["mlflow"], log_options={"mlflow": {"tracking_uri": str(store), "experiment": "e1"}})
    run(cfg)
    run_id = json.loads((Path(cfg.run_dir) / STATE_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=str(store))
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "r"
    assert client.get_experiment(tracked.info.experiment_id).name == "e1"
    assert tracked.data.params["train.optim.lr"] == "0.2" and tracked.data.params["steps"] == "12"
    want = expected(read_metrics(Path(cfg.run_dir) / "metrics.jsonl"))
    got = {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, tag), key=lambda m: m.step)]
           for tag in tracked.data.metrics}
    assert_same_scalars(got, want)


def test_an_attempt_that_ends_by_an_exception_is_marked_killed_and_resumed(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from convscale.train.loggers.fanout import open_fanout

    run_dir, store = tmp_path / "r", str(tmp_path / "mlruns")
    run_dir.mkdir()
    options = {"mlflow": {"tracking_uri": store}}
    first = open_fanout(["mlflow"], options, run_dir, {"steps": 4}, 0)
    first.write({"kind": "train", "step": 2, "loss": 1.5})
    first.abandon()  # what exit does for a run whose loop raised (and a resume in the same process)
    client = MlflowClient(tracking_uri=store)
    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    again = open_fanout(["mlflow"], options, run_dir, {"steps": 4}, 0)  # resumed from step 0
    assert client.get_run(run_id).info.status == "RUNNING"
    again.write({"kind": "train", "step": 2, "loss": 1.5})  # replayed: the store holds it already
    again.write({"kind": "train", "step": 4, "loss": 1.25})
    again.close()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(2, 1.5), (4, 1.25)]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2, 4]


# ------------------------------------------------------------------ W&B (offline)


def wandb_records(run_dir: Path) -> list[list]:
    """The records of each W&B offline run file under ``run_dir`` (oldest first). The .wandb file
    is a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB blocks of records with a 7-byte
    header: crc32, length, type) of protobuf ``Record`` messages; wandb ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, records, pos, pending = path.read_bytes(), [], 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: one whole record
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
        runs.append(records)
    return runs


def wandb_run_and_history(records: list) -> tuple:
    """(the run record, {tag: [(step, value)]}) of one offline run file's records."""
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history: dict[str, list] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    return run_record, history


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_wandb_offline_run_holds_the_config_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(tmp_path, "r", log=["wandb"], log_options={"wandb": {"project": "p", "group": "g", "tags": ["t"]}})
    run(cfg)
    run_dir = Path(cfg.run_dir)
    (records,) = wandb_records(run_dir)
    run_record, history = wandb_run_and_history(records)
    assert run_record.run_id == json.loads((run_dir / STATE_FILE).read_text())["wandb"]["run_id"]
    assert (run_record.project, run_record.run_group, run_record.display_name, list(run_record.tags)) == ("p", "g", "r", ["t"])
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    resolved = json.loads((run_dir / "config.json").read_text())
    assert {k: config[k] for k in resolved} == resolved  # the run's full resolved config
    assert_same_scalars(history, expected(read_metrics(run_dir / "metrics.jsonl")))


# ------------------------------------------------------------------ resume


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_resumed_run_continues_each_tracked_run_without_duplicate_steps(tmp_path, monkeypatch):
    log = [name for name in ("tensorboard", "mlflow", "wandb") if _installed(name)]
    if not log:
        pytest.skip("no tracker installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = tmp_path / "mlruns"
    cfg = tiny(tmp_path, "r", log=log, log_options={"mlflow": {"tracking_uri": str(store)}})
    rows = killed_and_resumed(cfg)
    run_dir = Path(cfg.run_dir)
    state = json.loads((run_dir / STATE_FILE).read_text())
    want = expected(rows)
    assert [s for s, _ in want["train/loss"]] == [2, 4, 6, 8, 10, 12]
    if "tensorboard" in log:  # two event files; the second purges the first's steps past the checkpoint
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
        assert_same_scalars(tensorboard_scalars(run_dir / "tensorboard"), want, rel=1e-6)
    if "mlflow" in log:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=str(store))
        (only,) = client.search_runs([client.get_experiment_by_name("convscale").experiment_id])
        assert only.info.run_id == state["mlflow"]["run_id"] and only.info.status == "FINISHED"
        got = {tag: sorted((m.step, m.value) for m in client.get_metric_history(only.info.run_id, tag))
               for tag in only.data.metrics}
        # steps 9..10 of the killed attempt are kept, not logged again (a resumed run equals the
        # uninterrupted one, so their values are the resumed metrics.jsonl's too)
        assert_same_scalars(got, want, timings=False)
    if "wandb" in log:  # offline: one run file per attempt, the same run id, each step in one of them
        attempts = [wandb_run_and_history(records) for records in wandb_records(run_dir)]
        assert [a[0].run_id for a in attempts] == [state["wandb"]["run_id"]] * 2
        merged: dict[str, list] = {}
        for _, history in attempts:
            for tag, points in history.items():
                merged.setdefault(tag, []).extend(points)
        assert attempts[1][1]["train/loss"][0][0] == 12  # the resume skipped rows 9..10 it replayed
        assert_same_scalars(merged, want, rel=1e-12, timings=False)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------ sweeps


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_study_log_table_groups_cells_under_the_sweep(tmp_path):
    from convscale.sweep.planner import cell_train_config, plan_study
    from convscale.sweep.study import StudyConfig, parse_study

    raw = {"name": "mini", "data": {"resolution": 16, "num_classes": 4},
           "family": [{"name": "nfnet", "models": ["nfnet-tiny"], "optimizer": "sgd_agc", "lrs": [0.2]}],
           "train": {"batch_size": 16, "log_every_steps": 2}, "budgets": {"images": [64]},
           "log": {"to": ["wandb", "mlflow", "tensorboard"], "wandb": {"project": "scaling"},
                   "tensorboard": {"dir": str(tmp_path / "tb")}}}
    study = parse_study(raw)
    assert StudyConfig.from_json(study.to_json()) == study
    (cell,) = plan_study(study).cells
    cfg = cell_train_config(study, cell, str(tmp_path / "sweep" / "runs" / cell.cell_id),
                            sweep_dir=str(tmp_path / "sweep"))
    assert cfg.runtime.log == ["wandb", "mlflow", "tensorboard"]
    assert cfg.runtime.log_options == {"wandb": {"group": "mini", "project": "scaling"},
                               "mlflow": {"experiment": "mini", "tracking_uri": str(tmp_path / "sweep" / "mlruns")},
                               "tensorboard": {"group": "mini", "dir": str(tmp_path / "tb")}}
    with pytest.raises(UserError, match=r"unknown field\(s\) \['neptune'\] in \[log\]"):
        parse_study({**raw, "log": {"to": ["wandb"], "neptune": {}}})
    if _installed("tensorboard"):  # the cell's events land in DIR/<sweep>/<cell id>
        run(cfg.replace(log=["tensorboard"], threads=1))
        assert tensorboard_scalars(tmp_path / "tb" / "mini" / cell.cell_id)["train/loss"][-1][0] == 4


@pytest.mark.slow
def test_sweep_cells_are_tracked_runs_grouped_under_the_study(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from support import DISTRIBUTED_VARIABLES, env

    from convscale.sweep.run import run_sweep
    from convscale.sweep.study import parse_study

    for key in DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env(WANDB_MODE="offline", WANDB_SILENT="true").items():  # the cells' subprocesses
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores only when told to
    study = parse_study({"name": "mini", "data": {"resolution": 16, "num_classes": 4, "heldout_images": 32},
                         "train": {"batch_size": 16, "log_every_steps": 2, "threads": 1},
                         "family": [{"name": "nfnet", "models": ["nfnet-tiny"], "optimizer": "sgd_agc",
                                     "lrs": [0.1, 0.2], "train": {"agc_exempt_scalar_gains": True}}],
                         "budgets": {"images": [64]}, "log": {"to": ["mlflow", "wandb"]}})
    root = tmp_path / "sweep"
    out = run_sweep(study, root, jobs=2, log=lambda line: None)  # two cells at once: one experiment made
    assert out.status_counts == {"done": 2}
    cells = {o.cell_id for o in out.outcomes}
    client = MlflowClient(tracking_uri=str(root / "mlruns"))
    runs = client.search_runs([client.get_experiment_by_name("mini").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(cells)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [2, 4]
        assert r.data.params["model_name"] == "nfnet-w0.03125-d1.1.1"
    for cell in cells:
        (records,) = wandb_records(root / "runs" / cell)
        run_record, history = wandb_run_and_history(records)
        config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
        assert (run_record.run_group, run_record.display_name) == ("mini", cell)
        assert f"lr{config['train']['optim']['lr']:g}" in cell and [s for s, _ in history["train/loss"]] == [2, 4]


def test_a_tracker_that_cannot_start_stops_the_run_with_one_line(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "taken").write_text("a file where the store would go")
    cfg = tiny(tmp_path, "r", steps=2, log=["mlflow"], log_options={"mlflow": {"tracking_uri": str(tmp_path / "taken")}})
    with pytest.raises(UserError, match=r"^mlflow could not start a run at .*taken \(.*\); fix log_options.mlflow.tracking_uri"):
        run(cfg)
