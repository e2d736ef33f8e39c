"""Seeds per cell: a study's ``seeds = N`` plans N runs of every (model, budget, lr), each with its
own TrainConfig seed; the results table carries the seed, the fits resample seeds within cells and
the frontier shows the seeds' spread."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from convscale.errors import UserError
from convscale.sweep import SweepDir, collect, load_study, plan_study
from convscale.sweep.planner import Plan, cell_train_config
from convscale.sweep.study import StudyConfig

STUDY = """
name = "s"
{top}
[data]
kind = "procedural"
resolution = 16
num_classes = 10
heldout_images = 64
[train]
batch_size = 32
precision = "fp32"
seed = 7
[[family]]
name = "nfnet"
models = ["nfnet-tiny"]
optimizer = "sgd_agc"
lrs = [0.1, 0.2]
{family}
[[family]]
name = "vit"
models = ["vit-tiny"]
optimizer = "adamw"
lrs = [0.004]
[budgets]
images = [64, 128]
"""


def study(tmp_path, top: str = "", family: str = "") -> StudyConfig:
    p = tmp_path / "study.toml"
    p.write_text(STUDY.format(top=top, family=family))
    return load_study(p)


def test_seeds_plan_one_run_per_seed_with_its_own_seed_and_id(tmp_path):
    s = study(tmp_path, top="seeds = 3", family="seeds = 2")  # the family's own count wins
    assert s.seeds == 3 and s.seeds_of(s.families[0]) == 2 and s.seeds_of(s.families[1]) == 3
    assert StudyConfig.from_json(s.to_json()) == s
    plan = plan_study(s)
    nf = [c for c in plan.cells if c.family == "nfnet"]
    vit = [c for c in plan.cells if c.family == "vit"]
    assert len(nf) == 2 * 2 * 2 and len(vit) == 2 * 1 * 3  # budgets x lrs x seeds
    assert sorted({c.seed for c in nf}) == [7, 8] and sorted({c.seed for c in vit}) == [7, 8, 9]
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)
    one = next(c for c in vit if c.seed == 9)
    assert one.cell_id.endswith("__s2")
    cfg = cell_train_config(s, one, str(tmp_path / "run"))
    assert cfg.seed == 9 and cfg.data.seed == s.data.seed  # the init changes, the data stream does not
    # the plan file round-trips the seed; a plan from before seeds reads with seed None
    again = [type(one).from_dict(d) for d in json.loads(Plan(s, plan.cells).to_json())["cells"]]
    assert again == plan.cells
    old = {k: v for k, v in one.to_dict().items() if k != "seed"}
    assert type(one).from_dict(old).seed is None


def test_one_seed_keeps_the_ids_of_plans_before_seeds(tmp_path):
    plan = plan_study(study(tmp_path))
    assert len(plan.cells) == 2 * 3
    assert all("__s" not in c.cell_id for c in plan.cells) and {c.seed for c in plan.cells} == {7}
    assert plan.cells[0].cell_id == "nfnet-w0.03125-d1.1.1__I64__lr0.1"  # nfnet-tiny's canonical name


@pytest.mark.parametrize("value", ["0", "1.5", "true", "1000"])
def test_bad_seed_counts_are_user_errors(tmp_path, value):
    with pytest.raises(UserError, match="seeds must be a whole number of runs per cell from 1 to 100"):
        study(tmp_path, top=f"seeds = {value}")
    with pytest.raises(UserError, match="seeds must be a whole number"):
        study(tmp_path, family=f"seeds = {value}")


def test_results_table_carries_each_cells_seed(tmp_path):
    s = study(tmp_path, top="seeds = 2")
    sweep = SweepDir(tmp_path / "sweep")
    sweep.prepare(plan_study(s))
    df = collect(sweep.root)
    assert len(df) == 12 and sorted(df["seed"].unique().tolist()) == [7, 8]
    assert (df.groupby(["model", "budget", "lr"])["seed"].nunique() == 2).all()


def test_seeded_frontier_is_the_best_lrs_seed_mean_with_its_range_and_fits_resample_seeds():
    from convscale.scaling.design import SEEDS, build_points
    from convscale.scaling.frontier import frontier_table

    rows = []
    # two sizes at one budget; the small model's lr 0.2 has the better seed mean (geometric)
    losses = {("small", 0.1): [2.0, 2.6], ("small", 0.2): [2.1, 2.3], ("big", 0.1): [2.5, 2.7],
              ("big", 0.2): [2.9, 3.1]}
    params = {"small": 1e4, "big": 4e4}
    for (model, lr), ls in losses.items():
        for seed, loss in enumerate(ls):
            images = 1e12 / (6.0 * params[model])
            rows.append(dict(family="nfnet", model=model, params=params[model], images_seen=images,
                             train_flops=1e12, lr=lr, epochs=images / 1e6, budget_flops=1e12, loss=loss,
                             top1=0.5 - 0.01 * seed, seed=seed))
    runs = pd.DataFrame(rows)
    pts = build_points(runs, "isoflop")
    assert pts.resampling == SEEDS
    fr = frontier_table(pts, runs)
    assert len(fr) == 1
    r = fr.iloc[0]
    assert r["model"] == "small" and r["lr"] == 0.2  # 0.1's best single run (2.0) does not decide
    assert r["loss"] == pytest.approx(math.sqrt(2.1 * 2.3))
    assert (r["seeds"], r["seed_loss_min"], r["seed_loss_max"]) == (2, 2.1, 2.3)
    rep = pts.replicates(200, np.random.default_rng(0))
    small = pts.model.index("small")
    # every replicate's loss is a redraw of seeds: between the lowest and highest possible seed means
    assert rep.loss[:, small].min() >= 2.0 - 1e-12 and rep.loss[:, small].max() <= 2.3 + 1e-12
    assert len(np.unique(np.round(rep.loss[:, small], 9))) >= 3
