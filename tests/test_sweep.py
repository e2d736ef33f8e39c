"""convscale.sweep: study parsing, planning arithmetic, locking, resume semantics, executors, results."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from support import SWEEP_STUDY as STUDY

from convscale.errors import UserError
from convscale.sweep import (
    COLUMNS,
    LocalExecutor,
    SlurmExecutor,
    SweepDir,
    collect,
    load_study,
    plan_study,
    write_results,
)
from convscale.sweep.locking import CellLock, is_locked
from convscale.sweep.study import StudyConfig
from convscale.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]



def study_from(tmp_path: Path, budgets: str = "images = [64, 128]", text: str = STUDY) -> StudyConfig:
    p = tmp_path / "study.toml"
    p.write_text(text.replace("{budgets}", budgets))
    return load_study(p)


# ---------------------------------------------------------------------------------------------
# study files


def test_example_study_parses_and_round_trips_through_json():
    study = load_study(REPO / "studies" / "example.toml")
    assert study.name == "example"
    assert study.data.resolution == 16 and study.data.num_classes == 100
    nf, vit = study.families
    assert nf.learning_rates() == [0.1, 0.2, 0.4]  # 0.2 x [0.5, 1, 2]
    assert vit.learning_rates() == [0.002, 0.004]
    assert nf.train["agc_exempt_scalar_gains"] is True
    assert study.budgets.kind == "train_flops" and study.budgets.values == (1e11, 3e11, 1e12)
    again = StudyConfig.from_json(study.to_json())
    assert again == study


@pytest.mark.parametrize(
    "edit, field, where",
    [
        (("name = \"t\"", "name = \"t\"\nnmae = 1"), "nmae", "study"),
        (("num_classes = 10", "num_clases = 10"), "num_clases", "[data]"),
        (("batch_size = 32", "batchsize = 32"), "batchsize", "[train]"),
        (("lr_factors = [0.5, 2]", "lr_factor = [0.5, 2]"), "lr_factor", "[[family]]"),
        (("agc_exempt_scalar_gains = true", "agc_exempt = true"), "agc_exempt", "train"),
    ],
)
def test_unknown_fields_are_user_errors_naming_field_and_valid_ones(tmp_path, edit, field, where):
    with pytest.raises(UserError) as e:
        study_from(tmp_path, text=STUDY.replace(*edit))
    msg = str(e.value)
    assert field in msg and where in msg and "valid fields" in msg and "\n" not in msg


def test_unknown_budget_field_and_budget_count(tmp_path):
    with pytest.raises(UserError, match="valid fields.*train_flops"):
        study_from(tmp_path, budgets="flops = [1e9]")
    with pytest.raises(UserError, match="exactly one of"):
        study_from(tmp_path, budgets="images = [64]\nepochs = [1]")


def test_cell_fields_in_train_table_are_refused(tmp_path):
    with pytest.raises(UserError, match="sets per cell"):
        study_from(tmp_path, text=STUDY.replace("batch_size = 32", "batch_size = 32\nlr = 0.1"))
    with pytest.raises(UserError, match="either lr_center"):
        study_from(tmp_path, text=STUDY.replace("lrs = [0.004]", "lrs = [0.004]\nlr_center = 0.1"))
    with pytest.raises(UserError, match="optimizer must be one of"):
        study_from(tmp_path, text=STUDY.replace('"adamw"', '"adam"'))


# ---------------------------------------------------------------------------------------------
# planner


def test_isoflop_planner_arithmetic(tmp_path):
    from convscale.models import get_config

    budgets = (3e9, 1e10)
    study = study_from(tmp_path, budgets=f"train_flops = {list(budgets)}")
    plan = plan_study(study)
    assert len(plan.cells) == 2 * (2 + 1)  # 2 budgets x (nfnet 2 lrs + vit 1 lr)
    for c in plan.cells:
        fwd = get_config(c.model, num_classes=10).forward_flops(16)
        assert c.flops_per_image == fwd
        per_image = 3 * fwd
        # images = budget / (3 x forward FLOPs), rounded to whole batches of 32
        assert c.steps == math.floor(c.budget / per_image / 32 + 0.5)
        assert c.images == c.steps * 32
        assert c.train_flops == per_image * c.images
        assert abs(c.train_flops - c.budget) <= 0.5 * 32 * per_image  # within half a batch
        assert c.budget_flops == c.budget
    ids = [c.cell_id for c in plan.cells]
    assert "nfnet-w0.03125-d1.1.1__C3e+09__lr0.1" in ids and "vit-tiny__C1e+10__lr0.004" in ids
    assert all(all(ch.isalnum() or ch in "._+-" for ch in i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_model_that_cannot_meet_a_budget_is_left_out_and_infeasible_budget_errors(tmp_path):
    from convscale.models import get_config

    fwd = {get_config(m).name: get_config(m, num_classes=10).forward_flops(16) for m in ("nfnet-tiny", "vit-tiny")}
    small, big = sorted(fwd, key=fwd.get)
    # a budget between one batch of the small model and one batch of the big one
    budget = 32 * 3 * (fwd[small] + fwd[big]) / 2
    plan = plan_study(study_from(tmp_path, budgets=f"train_flops = [{budget!r}]"))
    assert {c.model for c in plan.cells} == {small}
    assert [(s.model, s.budget) for s in plan.skipped] == [(big, budget)]
    assert "less than one batch" in plan.skipped[0].reason
    tiny = 0.5 * 32 * 3 * fwd[small]
    with pytest.raises(UserError) as e:
        plan_study(study_from(tmp_path, budgets=f"train_flops = [{tiny!r}, {budget!r}]"))
    assert f"{tiny:g}" in str(e.value) and "raise it" in str(e.value)


def test_epoch_budgets_and_max_epochs(tmp_path):
    from convscale.models import get_config

    text = STUDY.replace("precision = \"fp32\"", "precision = \"fp32\"\nepoch_images = 1000")
    plan = plan_study(study_from(tmp_path, budgets="epochs = [0.5]", text=text))
    # 0.5 epochs = 500 images = 15.6 batches of 32 -> 16 steps, 512 images
    assert all(c.steps == 16 and c.images == 512 and c.epochs == 0.512 for c in plan.cells)
    # epoch budgets are no IsoFLOP groups: each cell has its own compute, no shared budget
    assert all(c.budget_flops is None for c in plan.cells) and len(plan.cells) == 3
    with pytest.raises(UserError, match="epochs=2 .*max_epochs"):
        plan_study(study_from(tmp_path, budgets="epochs = [0.5, 2]\nmax_epochs = 1", text=text))
    # a FLOP budget that needs > 1 epoch of the smaller model only: the smaller model is left out
    fwd = {m: get_config(m, num_classes=10).forward_flops(16) for m in ("nfnet-tiny", "vit-tiny")}
    budget = 3 * 1000 * math.sqrt(fwd["nfnet-tiny"] * fwd["vit-tiny"])
    plan = plan_study(study_from(tmp_path, budgets=f"train_flops = [{budget!r}]\nmax_epochs = 1", text=text))
    small = get_config(min(fwd, key=fwd.get)).name
    assert small not in {c.model for c in plan.cells} and [s.model for s in plan.skipped] == [small]
    assert "more than max_epochs=1" in plan.skipped[0].reason


def test_family_max_epochs_overrides_the_study_cap(tmp_path):
    """A [[family]] max_epochs caps that family's cells only; the other keeps [budgets] max_epochs.
    The same budget is planned for the smaller model without the family cap and left out with it."""
    from convscale.models import get_config

    text = STUDY.replace("precision = \"fp32\"", "precision = \"fp32\"\nepoch_images = 1000")
    fwd = {m: get_config(m, num_classes=10).forward_flops(16) for m in ("nfnet-tiny", "vit-tiny")}
    small = min(fwd, key=fwd.get)
    budget = 3 * 1000 * 0.85 * fwd[small]  # 0.85 epochs of the smaller model, > 1 batch of the larger
    loose = plan_study(study_from(tmp_path, budgets=f"train_flops = [{budget!r}]\nmax_epochs = 1", text=text))
    assert {c.model for c in loose.cells} == {get_config(m).name for m in fwd} and not loose.skipped
    fam = "nfnet" if small == "nfnet-tiny" else "vit"
    capped_text = re.sub(rf'(name = "{fam}"\n)', r'\1max_epochs = 0.25\n', text, count=1)
    assert capped_text != text
    study = study_from(tmp_path, budgets=f"train_flops = [{budget!r}]\nmax_epochs = 1", text=capped_text)
    assert [f.max_epochs for f in study.families if f.name == fam] == [0.25]
    capped = plan_study(study)
    assert [s.model for s in capped.skipped] == [get_config(small).name]
    assert "more than max_epochs=0.25" in capped.skipped[0].reason
    assert {c.model for c in capped.cells} == {get_config(m).name for m in fwd if m != small}
    # the cap round-trips through the sweep dir's study.json
    assert StudyConfig.from_json(study.to_json()) == study
    with pytest.raises(UserError, match="max_epochs must be a number of epochs > 0"):
        study_from(tmp_path, budgets=f"train_flops = [{budget!r}]", text=capped_text.replace("max_epochs = 0.25", "max_epochs = -1"))


# ---------------------------------------------------------------------------------------------
# executors with a fake `convscale train` (no torch): behaviour per cell from behaviour.json

FAKE_TRAIN = r"""
import json, os, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
run_dir = args["--run-dir"]
cell = os.path.basename(run_dir)
sweep = os.path.dirname(os.path.dirname(run_dir))
with open(os.path.join(sweep, "calls.log"), "a") as f:
    f.write(cell + "\n")
behaviour = json.load(open(os.path.join(sweep, "behaviour.json"))).get(cell, "done")
os.makedirs(run_dir, exist_ok=True)
cfg = json.load(open(args["--config"]))
json.dump(cfg, open(os.path.join(run_dir, "config.json"), "w"))
if behaviour == "crash":
    print("Traceback...\nRuntimeError: boom", file=sys.stderr)
    sys.exit(1)
if behaviour == "sleep":
    time.sleep(1.5)
status = "diverged" if behaviour == "diverged" else "done"
images = cfg["images"]
json.dump({"status": status, "heldout_loss": 1.5 if status == "done" else None,
           "heldout_top1": 0.25 if status == "done" else None, "heldout_top5": 0.75 if status == "done" else None,
           "images_seen": images, "train_flops": 3.0 * images, "wall_seconds": 36.0,
           "steps": images // cfg["batch_size"] if status == "done" else 1,
           "threads": os.environ.get("OMP_NUM_THREADS")},
          open(os.path.join(run_dir, "result.json"), "w"))
sys.exit(3 if status == "diverged" else 0)
"""


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    study = study_from(tmp_path)
    sweep = SweepDir(tmp_path / "sweep")
    plan = plan_study(study)
    sweep.prepare(plan)

    def behave(**b):
        (sweep.root / "behaviour.json").write_text(json.dumps(b))

    def calls():
        log = sweep.root / "calls.log"
        return log.read_text().split() if log.exists() else []

    behave()
    return sweep, [c.cell_id for c in plan.cells], [sys.executable, str(script)], behave, calls


def test_resume_semantics_done_skipped_crashed_rerun_failed_recorded(fake):
    sweep, ids, cmd, behave, calls = fake
    assert len(ids) == 6
    crash, div = ids[0], ids[1]
    behave(**{crash: "crash", div: "diverged"})
    out = {o.cell_id: o for o in LocalExecutor(jobs=1, threads=1, train_command=cmd).run(sweep.root, ids)}
    assert out[crash].status == "failed" and out[crash].exit_code == 1
    assert out[crash].message == "RuntimeError: boom"  # the last stderr line
    assert json.loads(sweep.failure_path(crash).read_text())["last_stderr_line"] == "RuntimeError: boom"
    assert out[div].status == "diverged" and out[div].exit_code == 3
    assert out[div].message == "diverged at step 1; rerun it at a lower lr"  # a result without its reason
    assert sum(o.status == "done" for o in out.values()) == 4
    assert sweep.state(crash) == "failed" and sweep.state(div) == "diverged"

    behave()  # the bug is fixed: the crashed cell now finishes
    out2 = {o.cell_id: o for o in LocalExecutor(jobs=1, threads=1, train_command=cmd).run(sweep.root, ids)}
    assert out2[crash].status == "done"
    assert all(out2[i].status == "skipped" for i in ids if i != crash)  # done and diverged never rerun
    assert calls().count(crash) == 2 and all(calls().count(i) == 1 for i in ids if i != crash)
    assert not sweep.failure_path(crash).exists()


def test_locked_cell_is_skipped(fake):
    sweep, ids, cmd, behave, calls = fake
    lock = CellLock(sweep.lock_path(ids[2]))
    assert lock.acquire()  # "another sweep" is running this cell
    try:
        assert is_locked(sweep.lock_path(ids[2])) and sweep.state(ids[2]) == "running"
        out = {o.cell_id: o for o in LocalExecutor(jobs=2, threads=1, train_command=cmd).run(sweep.root, ids)}
    finally:
        lock.release()
    assert out[ids[2]].status == "locked" and ids[2] not in calls()
    assert sum(o.status == "done" for o in out.values()) == 5
    assert not is_locked(sweep.lock_path(ids[2]))


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_parallel_jobs_split_threads_and_run_at_once(fake):
    sweep, ids, cmd, behave, calls = fake
    behave(**{i: "sleep" for i in ids[:2]})
    import time

    t0 = time.monotonic()
    out = LocalExecutor(jobs=2, threads=3, gpus=0, train_command=cmd).run(sweep.root, ids[:2])
    assert time.monotonic() - t0 < 2.9  # two 1.5 s cells side by side, not one after the other
    assert [o.status for o in out] == ["done", "done"]
    assert json.loads((sweep.run_dir(ids[0]) / "result.json").read_text())["threads"] == "3"


def test_results_table_columns_and_values(fake):
    sweep, ids, cmd, behave, calls = fake
    behave(**{ids[0]: "crash", ids[2]: "diverged"})
    LocalExecutor(jobs=1, threads=2, gpus=0, train_command=cmd).run(sweep.root, ids[:3])
    df = collect(sweep.root)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(df) == 6
    by = df.set_index("cell_id")
    assert by.loc[ids[0], "status"] == "failed" and by.loc[ids[0], "error"] == "RuntimeError: boom"
    assert (by.loc[ids[3:], "status"] == "pending").all()
    done = by.loc[ids[1]]
    assert done["status"] == "done" and done["loss"] == 1.5 and done["top5"] == 0.75
    assert done["wall_hours"] == pytest.approx(0.01) and done["device_hours"] == pytest.approx(0.02)  # 2 cores
    assert done["images_seen"] == done["budget"] == 64 and done["study"] == "t"
    assert done["steps_trained"] == done["steps"] == 2  # 64 images at batch 32
    # a run that diverged says how far it got; the planned steps stay beside it
    assert by.loc[ids[2], "steps_trained"] == 1 and by.loc[ids[2], "steps"] > 1
    import pandas as pd

    assert pd.isna(by.loc[ids[0], "steps_trained"]) and pd.isna(by.loc[ids[3], "steps_trained"])
    parquet, csv = write_results(sweep.root, df)

    back = pd.read_parquet(parquet)
    assert list(back.columns) == list(df.columns) and len(pd.read_csv(csv)) == 6


def test_empty_sweep_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="convscale sweep run"):
        collect(tmp_path)


def test_changed_config_of_a_started_cell_is_a_user_error(fake, tmp_path):
    sweep, ids, cmd, behave, calls = fake
    LocalExecutor(jobs=1, threads=1, train_command=cmd).run(sweep.root, ids[:1])
    changed = study_from(tmp_path, text=STUDY.replace("heldout_images = 64", "heldout_images = 128"))
    with pytest.raises(UserError, match="different settings"):
        sweep.prepare(plan_study(changed))


def test_shared_procedural_stream_is_generated_once_and_used_by_every_cell(tmp_path):
    study = study_from(tmp_path, text="share_procedural_data = true\n" + STUDY)
    plan = plan_study(study)
    sweep = SweepDir(tmp_path / "sweep")
    sweep.prepare(plan)
    sweep.ensure_shared_data(plan, log=lambda *a, **k: None)
    meta = json.loads((sweep.data_path / "meta.json").read_text())
    assert meta["num_images"] == 128  # the longest cell's images
    for c in plan.cells:
        cfg = json.loads(sweep.config_path(c.cell_id).read_text())
        assert cfg["data"]["path"] == str(sweep.data_path.resolve())
    from convscale.data import build_source

    # the cache serves exactly the images the generator makes
    cached = next(iter(build_source(study.data.replace(path=str(sweep.data_path))).train_batches(32, start_step=3)))
    fresh = next(iter(build_source(study.data).train_batches(32, start_step=3)))
    assert all((a == b).all() for a, b in zip(cached, fresh))
    stamp = (sweep.data_path / "meta.json").stat().st_mtime_ns
    sweep.ensure_shared_data(plan, log=lambda *a, **k: None)  # already there: not regenerated
    assert (sweep.data_path / "meta.json").stat().st_mtime_ns == stamp


def test_executor_registry_builds_each_executor_from_its_json_config(fake):
    import dataclasses

    from convscale.cli.sweep import register
    from convscale.sweep.executors import EXECUTORS, build_executor, executor_config

    sweep, ids, cmd, behave, calls = fake
    slurm = executor_config("slurm", {"partition": "gpu", "gpus_per_node": 2, "timeout_minutes": 90})
    back = executor_config("slurm", json.loads(json.dumps(dataclasses.asdict(slurm))))
    assert back == slurm
    ex = build_executor("slurm", back)
    assert (ex.partition, ex.gpus_per_node, ex.timeout_minutes, ex.cpus_per_task) == ("gpu", 2, 90, 4)
    with pytest.raises(UserError, match=r"no option\(s\) \['partitoin'\]; valid: .*'partition'"):
        executor_config("slurm", {"partitoin": "gpu"})
    with pytest.raises(UserError, match="unknown executor 'k8s'; choose one of local, slurm"):
        build_executor("k8s")
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        build_executor("local", {"jobs": 0})
    seen = []
    local = build_executor("local", {"jobs": 2, "threads": 1, "gpus": 0}, train_command=cmd,
                           on_outcome=lambda o, i, n: seen.append((o.cell_id, i, n)))
    out = local.run(sweep.root, ids[:2])
    assert sorted(o.cell_id for o in out) == sorted(ids[:2]) and all(o.status == "done" for o in out)
    assert sorted(seen) == sorted([(out[0].cell_id, 1, 2), (out[1].cell_id, 2, 2)])
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    run_parser = parser._subparsers._group_actions[0].choices["sweep"]._subparsers._group_actions[0].choices["run"]
    choices = next(a.choices for a in run_parser._actions if a.dest == "executor")
    assert list(choices) == list(EXECUTORS)


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
def test_submitit_local_executor_runs_cells(fake):
    sweep, ids, cmd, behave, calls = fake
    behave(**{ids[1]: "crash"})
    ex = SlurmExecutor(cluster="local", cpus_per_task=1, timeout_minutes=2, train_command=cmd)
    out = {o.cell_id: o for o in ex.run(sweep.root, ids[:2])}
    assert out[ids[0]].status == "done" and out[ids[1]].status == "failed"
    assert sweep.state(ids[0]) == "done" and sweep.state(ids[1]) == "failed"
    assert (sweep.root / "submitit").is_dir()


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_plan_and_collect(tmp_path, capsys):
    from convscale.cli.main import main

    p = tmp_path / "s.toml"
    p.write_text(STUDY.replace("{budgets}", "train_flops = [3e9]"))
    assert main(["sweep", "plan", str(p), "--no-probe", "--dir", str(tmp_path / "sw"), "--commands"]) == 0
    out = capsys.readouterr().out
    assert "nfnet-w0.03125-d1.1.1" in out and "vit-tiny" in out and "h100-hours" in out and "tpu-v4-core-hours" in out
    assert f"--run-dir {tmp_path / 'sw' / 'runs' / 'nfnet-w0.03125-d1.1.1__C3e+09__lr0.1'}" in out
    assert main(["sweep", "collect", str(tmp_path / "nothing")]) == 2
    assert "convscale sweep run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# one real sweep: 4 cells of `convscale train` subprocesses (tiny models, digits, 2-4 steps each)

REAL_STUDY = """
name = "real"
[data]
kind = "digits"
resolution = 16
[train]
batch_size = 32
precision = "fp32"
[[family]]
name = "nfnet"
models = ["nfnet-tiny"]
optimizer = "sgd_agc"
lrs = [0.2]
[[family]]
name = "vit"
models = ["vit-w16-d2-p4"]
optimizer = "adamw"
lrs = [0.004]
[budgets]
images = [64, 128]
"""


@pytest.mark.slow  # ~25 s on 2 idle cores (4 subprocesses, mostly torch import); ~50 s on a loaded machine
def test_real_end_to_end_sweep(tmp_path, capsys):
    from convscale.cli.main import main

    p = tmp_path / "real.toml"
    p.write_text(REAL_STUDY)
    d = tmp_path / "sw"
    assert main(["sweep", "run", str(p), "--dir", str(d), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 to run" in out and "[4/4]" in out
    df = collect(d)
    assert len(df) == 4 and (df["status"] == "done").all(), df[["cell_id", "status", "error"]]
    assert sorted(df["images_seen"].tolist()) == [64, 64, 128, 128]
    # the run's own FLOP count agrees with the plan (3 x forward FLOPs x images seen)
    assert (df["train_flops"] == 3 * df["flops_per_image"] * df["images_seen"]).all()
    assert (df["loss"] > 0).all() and df["top1"].between(0, 1).all()
    cores_per_job = max(1, (os.cpu_count() or 1) // 2)  # 2 jobs share the machine's cores
    assert ((df["device_hours"] - cores_per_job * df["wall_hours"]).abs() < 1e-12).all()
    assert (d / "results.parquet").is_file() and (d / "runs" / "vit-w16-d2-p4__I128__lr0.004" / "metrics.jsonl").is_file()
    # the table's parameter count is the trained model's: a ViT at 16 px has a 16-px position grid
    trained = {r["cell_id"]: json.loads((d / "runs" / r["cell_id"] / "result.json").read_text())["params"]
               for _, r in df.iterrows()}
    assert df.set_index("cell_id")["params"].to_dict() == trained
    block = 4 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16)  # 2 LNs, qkv, proj, MLP
    patch, grid, cls, norm, head = 4 * 4 * 3 * 16 + 16, ((16 // 4) ** 2 + 1) * 16, 16, 2 * 16, 16 * 10 + 10
    assert df.loc[df["family"] == "vit", "params"].iloc[0] == patch + grid + cls + 2 * block + norm + head == 7834
    # a second run of the same study finds everything finished and starts nothing
    assert main(["sweep", "run", str(p), "--dir", str(d)]) == 0
    assert "4 finished, 0 to run" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# conventions: SAM's second pass, N without the classifier, the paper preset's resolutions and
# fine-tuning regularisation

SAM_STUDY = """
name = "sam"
[data]
kind = "procedural"
resolution = 16
num_classes = 10
heldout_images = 16
[train]
batch_size = 8
precision = "fp32"
sam_rho = {rho}
threads = 1
checkpoint_every_seconds = 0
[[family]]
name = "vit"
models = ["vit-w8-d4-p4"]
optimizer = "adamw"
lrs = [0.004]
[budgets]
train_flops = [{budget!r}]
"""


def test_planner_charges_sams_second_pass_as_the_run_records_it(tmp_path):
    from convscale.models import get_config
    from convscale.sweep.planner import cell_train_config
    from convscale.train.loop import run

    fwd = get_config("vit-w8-d4-p4", num_classes=10, image_size=16).forward_flops(16)
    budget = 8 * 8 * 3 * fwd  # 8 steps of 8 images without SAM
    sam, plain = (plan_study(study_from(tmp_path, text=SAM_STUDY.format(rho=rho, budget=budget), budgets=""))
                  for rho in (0.05, 0.0))
    (cell,), (plain_cell,) = sam.cells, plain.cells
    assert plain_cell.steps == 8 and plain_cell.train_flops == budget
    # IsoFLOP: SAM's two forward-backward passes per step leave half the steps for the same FLOPs
    assert cell.steps == 4 and cell.images == 32 and cell.train_flops == 2 * 3 * fwd * 32 == budget
    result = run(cell_train_config(sam.study, cell, str(tmp_path / "run")))
    assert result["status"] == "done" and result["forward_backward_passes_per_step"] == 2
    assert result["steps"] == cell.steps and result["images_seen"] == cell.images
    assert result["train_flops"] == cell.train_flops


def test_cells_and_results_table_carry_params_without_head_and_old_plans_still_read(fake):
    from convscale.models import config_at_resolution, count_params

    sweep, ids, cmd, behave, calls = fake
    study, cells = sweep.load()
    for c in cells:
        mcfg = config_at_resolution(c.model, 16, num_classes=10)
        assert c.params_without_head == count_params(mcfg, include_head=False) == c.params - mcfg.head_params
        assert c.eval_resolution == 16  # no eval_resolution set: held out at the training resolution
    LocalExecutor(jobs=1, threads=1, train_command=cmd).run(sweep.root, ids[:1])
    df = collect(sweep.root).set_index("cell_id")
    assert df["params_without_head"].to_dict() == {c.cell_id: c.params_without_head for c in cells}
    assert (df["eval_resolution"] == 16).all()
    # a plan.json written before these fields: still read, the columns are missing values
    plan = json.loads(sweep.plan_path.read_text())
    for c in plan["cells"]:
        del c["params_without_head"], c["eval_resolution"]
    sweep.plan_path.write_text(json.dumps(plan))
    old = collect(sweep.root)
    assert old["params_without_head"].isna().all() and old["eval_resolution"].isna().all()
    assert old.set_index("cell_id").loc[ids[0], "loss"] == 1.5 and (old["params"] > 0).all()
    write_results(sweep.root, old)  # missing integers survive parquet and CSV


PUBLISHED_DROPOUT = {"nfnet-f0": 0.2, "nfnet-f1": 0.3, "nfnet-f3": 0.4, "nfnet-f3+": 0.4, "nfnet-f7": 0.5,
                     "nfnet-f7+": 0.5}


def _pretrained_from_cell(study, cell, tmp_path):
    """A finished pre-training run as finetune_config sees it, made from a planned cell's config
    (F-variant cells are far too big to train here)."""
    from convscale.models import config_at_resolution, config_to_dict
    from convscale.sweep.planner import cell_train_config
    from convscale.train.finetune import PretrainedRun

    cfg = cell_train_config(study, cell, str(tmp_path / cell.cell_id))
    mcfg = config_at_resolution(cfg.model, cfg.data.resolution, num_classes=study.data.num_classes,
                                **cfg.model_overrides)
    return cfg, mcfg, PretrainedRun(Path(cfg.run_dir), cell.steps, Path(cfg.run_dir) / "model.safetensors",
                                    {"train": cfg.to_dict(), "model": config_to_dict(mcfg)}, {"status": "done"})


def test_paper_preset_pretrains_at_224_evaluates_at_256_and_finetunes_with_each_variants_dropout(tmp_path):
    from convscale.data.config import DataConfig
    from convscale.models import config_at_resolution
    from convscale.sweep.presets import finetune_recipe, preset
    from convscale.train.finetune import finetune_config

    study = StudyConfig.from_dict(preset("paper"))
    plan = plan_study(study)
    first = {}
    for c in plan.cells:
        first.setdefault(c.model, c)
    assert set(first) == set(PUBLISHED_DROPOUT)
    assert all(c.resolution == 224 and c.eval_resolution == 256 for c in plan.cells)
    # N without the classifier: at 30k classes F0's head (3073 x 30000) is 57 % of its parameters
    f0 = first["nfnet-f0"]
    assert f0.params_without_head == 68_416_284 and f0.params - f0.params_without_head == 3073 * 30_000
    for model, cell in first.items():
        cfg, pre_mcfg, pre = _pretrained_from_cell(study, cell, tmp_path)
        assert cfg.data.resolution == 224 and cfg.finetune.eval_resolution == 256
        assert pre_mcfg.drop_rate == 0.0 and pre_mcfg.drop_path_rate == 0.0  # pre-training: none (A.3)
        ft = finetune_config(pre, str(tmp_path / "ft" / model), DataConfig(kind="procedural", resolution=224,
                             num_classes=1000), overrides=finetune_recipe("paper"))
        assert ft.data.resolution == 384 and ft.finetune.eval_resolution == 480 and ft.finetune.sam_rho == 0.05 and ft.epochs == 50
        mcfg = config_at_resolution(ft.model, ft.data.resolution, num_classes=1000, **ft.model_overrides)
        assert (mcfg.drop_rate, mcfg.drop_path_rate) == (PUBLISHED_DROPOUT[model], 0.25), model
        assert mcfg.name == model
        # an explicit rate still wins over the variant's
        ft = finetune_config(pre, str(tmp_path / "ft2" / model), DataConfig(resolution=384), dropout=0.1)
        assert config_at_resolution(ft.model, 384, **ft.model_overrides).drop_rate == 0.1


def test_vit_finetune_keeps_its_own_regularisation_not_the_pretraining_runs(tmp_path):
    from convscale.data.config import DataConfig
    from convscale.models import config_at_resolution
    from convscale.train.finetune import finetune_config

    text = STUDY.replace('lrs = [0.004]', 'lrs = [0.004]\n[family.train]\nmodel_overrides = { dropout = 0.3 }')
    study = study_from(tmp_path, text=text)
    cell = next(c for c in plan_study(study).cells if c.family == "vit")
    cfg, pre_mcfg, pre = _pretrained_from_cell(study, cell, tmp_path)
    assert pre_mcfg.dropout == 0.3
    ft = finetune_config(pre, str(tmp_path / "ft"), DataConfig(resolution=32))
    assert ft.optim.optimizer == "adamw" and "dropout" not in ft.model_overrides
    assert config_at_resolution(ft.model, 32, **ft.model_overrides).dropout == 0.0  # vit-tiny's own
    ft = finetune_config(pre, str(tmp_path / "ft2"), DataConfig(resolution=32), dropout=0.2, drop_path_rate=0.1)
    assert ft.model_overrides == {"dropout": 0.2, "drop_path_rate": 0.1}


def test_local_cells_take_the_inherited_gpus_and_no_launcher_variables(monkeypatch):
    from convscale.sweep.executors import LocalExecutor, Resources, SlurmExecutor
    from convscale.sweep.executors.slurm import _SlurmGpuResources

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    ex = LocalExecutor(jobs=4, gpus=4, threads=2)
    assert [ex.resources(s).gpu for s in range(5)] == ["4", "5", "6", "7", "4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    assert LocalExecutor(jobs=2, gpus=2).resources(1).gpu == "GPU-b"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert LocalExecutor(jobs=2, gpus=2).resources(1).gpu == "1"
    assert Resources(threads=3).env()["OMP_NUM_THREADS"] == "3"
    # Slurm: N GPUs per cell are N processes of one torchrun, and N device-hours
    eight = SlurmExecutor(gpus_per_node=8).cell_command()
    assert eight[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert eight[-3:] == ["-m", "convscale", "train"]
    assert SlurmExecutor(gpus_per_node=1).cell_command()[1:] == ["-m", "convscale", "train"]
    assert _SlurmGpuResources(threads=4, gpus=8).devices == 8


def test_a_cell_started_from_a_torchrun_rank_is_one_process(fake, tmp_path, monkeypatch):
    """A sweep run inside a torchrun/srun step must not hand its rank variables to its cells."""
    from convscale.sweep.executors import run_cell

    sweep, ids, _, _, _ = fake
    cell = ids[0]
    probe = tmp_path / "env.txt"
    cmd = [sys.executable, "-c", f"import os, sys; open({str(probe)!r}, 'w').write(os.environ.get('RANK', '-') + "
                                 f"os.environ.get('SLURM_STEP_NUM_TASKS', '-')); sys.exit(1)"]
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}.items():
        monkeypatch.setenv(k, v)
    run_cell(sweep.root, cell, train_command=cmd)
    assert probe.read_text() == "--"


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_paper_preset_steps_in_micro_batches_with_checkpointing():
    """F7 at batch 4096 in one step (no accumulation, no checkpointing) and a held-out batch of
    4096 ran out of memory before the first step; the preset now steps 512 images per micro-batch
    (64 per process on 8 GPUs), checkpointed, and evaluates one micro-batch at a time."""
    from convscale.sweep.planner import cell_train_config
    from convscale.sweep.presets import preset
    from convscale.sweep.study import parse_study

    study = parse_study(preset("paper"))
    plan = plan_study(study)
    f7 = next(c for c in plan.cells if c.model == "nfnet-f7+")
    cfg = cell_train_config(study, f7, "runs/x")
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.runtime.activation_checkpointing) == (4096, 8, True)
    assert cfg.resolved_eval_batch_size() == 512 and cfg.batch_size % (8 * cfg.grad_accum_steps) == 0
    assert TrainConfig().resolved_eval_batch_size() == 128  # the default: one micro-batch = the batch
