"""The sweep command line speaks the config: `sweep run --set KEY=VALUE` reaches every cell, and
`--smoke` shrinks any study to a quick check of the whole path, in a directory of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import SWEEP_STUDY, by_name

from convscale.errors import UserError
from convscale.sweep.smoke import SMOKE_BATCH, smoke_study
from convscale.sweep.study import load_study

# the tiny models' study with 128 held-out images (the smoke run keeps 64)
STUDY = SWEEP_STUDY.replace("{budgets}", "images = [64, 128]").replace("heldout_images = 64", "heldout_images = 128")


@pytest.fixture
def study_file(tmp_path) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(STUDY)
    return p


def configs(root: Path) -> dict[str, dict]:
    return {p.stem: by_name(json.loads(p.read_text())) for p in sorted((root / "configs").glob("*.json"))}


def test_set_reaches_every_cells_config(study_file, tmp_path, cli):
    root = tmp_path / "sw"
    rc, out, err = cli(["sweep", "run", study_file, "--dir", root, "--dry-run", "--set", "warmup_fraction=0.25",
                        "--set", "agc_exempt_scalar_gains=false", "--set", "data.seed=7",
                        "--set", "model_overrides.drop_path_rate=0.1", "--set", "batch_size=16"])
    assert rc == 0, err
    cells = configs(root)
    assert len(cells) == 2 * (2 + 1)  # 2 budgets x (2 + 1 lrs): the grid itself is unchanged
    for cfg in cells.values():
        assert cfg["warmup_fraction"] == 0.25 and cfg["data"]["seed"] == 7 and cfg["batch_size"] == 16
        assert cfg["model_overrides"] == {"drop_path_rate": 0.1}
        assert cfg["agc_exempt_scalar_gains"] is False  # over the nfnet family's own [family.train] too
    # the plan is made with the new batch: 64 images are 4 steps of 16
    plan = {c["cell_id"]: c for c in json.loads((root / "plan.json").read_text())["cells"]}
    assert {c["steps"] for c in plan.values() if c["budget"] == 64} == {4}
    study = json.loads((root / "study.json").read_text())
    assert study["overrides"]["warmup_fraction"] == "0.25" and study["data"]["seed"] == 7
    # the sweep dir's study.json reads back as the same study
    assert load_study(root / "study.json").overrides == study["overrides"]


@pytest.mark.parametrize("item, needle", [
    ("lr=0.1", "sets ['lr'], which the sweep sets per cell"),
    ("images=10", "sets ['images'], which the sweep sets per cell"),
    ("bogus=1", "unknown field 'bogus'"),
    ("data.bogus=1", "unknown data field 'bogus'"),
    ("batch_size=abc", "batch_size='abc' is not a valid int"),
    ("warmup_fraction", "--set expects KEY=VALUE"),
])
def test_bad_set_is_one_line_naming_the_field(study_file, tmp_path, cli, item, needle):
    rc, out, err = cli(["sweep", "run", study_file, "--dir", tmp_path / "sw", "--set", item])
    assert rc == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "sw").exists()  # refused before anything is written


def test_a_changed_set_of_a_started_cell_is_refused(study_file, tmp_path, cli):
    root = tmp_path / "sw"
    assert cli(["sweep", "run", study_file, "--dir", root, "--dry-run"])[0] == 0
    (root / "runs" / next(iter(configs(root)))).mkdir(parents=True)  # a cell has started
    rc, _, err = cli(["sweep", "run", study_file, "--dir", root, "--dry-run", "--set", "warmup_fraction=0.5"])
    assert rc == 2 and "with different settings; use a new --dir" in err


def test_smoke_shrinks_the_study_and_keeps_models_and_data(study_file):
    study = load_study(study_file)
    smoke = smoke_study(study)
    assert smoke.name == "t-smoke" and smoke_study(smoke) is smoke
    assert [f.models for f in smoke.families] == [f.models for f in study.families]
    assert [f.learning_rates() for f in study.families] == [[0.1, 0.4], [0.004]]
    assert [f.learning_rates() for f in smoke.families] == [[0.4], [0.004]]  # the middle of each grid
    assert smoke.budgets.kind == "images" and smoke.budgets.values == (2 * SMOKE_BATCH, 4 * SMOKE_BATCH)
    assert smoke.data.resolution == 16 and smoke.data.heldout_images == 64 and smoke.data.num_classes == 10
    from convscale.sweep.planner import cell_train_config, plan_study

    plan = plan_study(smoke)
    assert sorted(c.steps for c in plan.cells) == [2, 2, 4, 4]
    cfg = cell_train_config(smoke, plan.cells[0], "r")
    assert cfg.batch_size == 8 and cfg.eval_every_steps == 0 and cfg.optim.agc_exempt_scalar_gains is True


def test_smoke_and_real_results_never_share_a_directory(study_file, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["sweep", "run", study_file, "--smoke", "--dry-run"])[0] == 0
    assert (tmp_path / "sweeps" / "t-smoke" / "plan.json").is_file()  # its own default directory
    rc, _, err = cli(["sweep", "run", study_file, "--dir", "sweeps/t-smoke", "--dry-run"])
    assert rc == 2 and "holds a smoke run" in err
    assert cli(["sweep", "run", study_file, "--dir", "real", "--dry-run"])[0] == 0
    rc, _, err = cli(["sweep", "run", study_file, "--dir", "real", "--smoke"])
    assert rc == 2 and "holds the real sweep of study 't'" in err


@pytest.mark.slow  # ~60 s on 2 cores: 33 `convscale train` subprocesses, then the fit and the report
def test_smoke_of_the_demo_study_runs_the_whole_path(tmp_path, cli):
    from convscale.sweep.presets import SCALES, preset, to_toml

    study = tmp_path / "demo.toml"
    study.write_text(to_toml(preset(SCALES["quick"])))
    root = tmp_path / "sw"
    rc, out, err = cli(["sweep", "run", study, "--smoke", "--dir", root, "--jobs", "2"])
    assert rc == 0, err
    # 11 models, each a cooldown trunk and a branch at each of the smoke's 2 budgets
    assert "33 cells, 0 finished, 33 to run" in out and "[33/33]" in out
    assert "results: " in out and "(33 done)" in out
    assert f"smoke check passed: report {root / 'report' / 'report.html'}" in out
    assert (root / "fit.json").is_file() and (root / "report" / "report.html").is_file()
    assert json.loads((root / "study.json").read_text())["name"] == "demo-smoke"


def test_an_overrides_table_in_the_study_file_acts_as_set(tmp_path):
    from convscale.sweep.planner import cell_train_config, plan_study

    p = tmp_path / "o.toml"
    p.write_text(STUDY + '\n[overrides]\nwarmup_fraction = 0.3\n"model_overrides.drop_path_rate" = 0.1\n')
    study = load_study(p)
    assert study.overrides == {"warmup_fraction": 0.3, "model_overrides.drop_path_rate": 0.1}
    for cell in plan_study(study).cells:
        cfg = cell_train_config(study, cell, "r")
        assert cfg.optim.warmup_fraction == 0.3 and cfg.model_overrides == {"drop_path_rate": 0.1}
    p.write_text(STUDY + '\n[overrides]\nlr = 0.3\n')
    with pytest.raises(UserError, match=r"overrides sets \[.lr.\]"):
        load_study(p)
