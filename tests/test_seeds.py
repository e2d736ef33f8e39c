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
    # every replicate redraws the seeds' deviations: the point moves around its data, never stays put
    assert abs(np.median(np.log(rep.loss[:, small])) - np.log(r["loss"])) < 0.05
    assert len(np.unique(np.round(rep.loss[:, small], 9))) >= 50


def _two_seed_table(rng, role=None, trunk_sd=0.0, run_sd=0.05):
    """3 IsoFLOP budgets x 6 sizes x 1 lr x 2 seeds; ``trunk_sd``: one offset per (model, seed)."""
    rows = []
    trunk = {(m, s): rng.normal(0, trunk_sd) for m in range(6) for s in range(2)}
    for b in (1e12, 4e12, 1.6e13):
        for m in range(6):
            n = 1e4 * 2.0 ** m
            for seed in range(2):
                loss = 3.0 * np.exp(rng.normal(0, run_sd) + trunk[m, seed])
                rows.append(dict(family="f", model=f"m{m}", params=n, images_seen=b / (6 * n), train_flops=b,
                                 lr=0.1, epochs=b / (6 * n) / 1e6, budget_flops=b, loss=loss, seed=seed,
                                 **({"role": role} if role else {})))
    return pd.DataFrame(rows)


def test_seed_replicates_give_each_cell_mean_the_spread_its_seeds_measure_across_the_model():
    """With 2 seeds a cell's own redraw gives its mean half its variance; the pooled deviations give
    every cell the variance s^2 / 2 of the pooled seed spread (a cell's mean of 2 runs)."""
    from convscale.scaling.design import build_points

    df = _two_seed_table(np.random.default_rng(3))
    pts = build_points(df, "isoflop")
    rep = pts.replicates(4000, np.random.default_rng(0))
    log_rep = np.log(rep.loss)
    # the pooled per-run variance: sum over cells of their squared deviations over their dof (1 each)
    x = np.log(df.sort_values(["model", "budget_flops", "seed"])["loss"].to_numpy()).reshape(-1, 2)
    pooled_var = float(np.mean((x[:, 0] - x[:, 1]) ** 2 / 2))
    sd = log_rep.std(axis=0)
    assert np.allclose(sd, np.sqrt(pooled_var / 2), rtol=0.06)
    # centred on each cell's own seed mean
    assert np.allclose(log_rep.mean(axis=0), np.log(pts.loss), atol=4 * np.sqrt(pooled_var / 2 / 4000))


def test_seeded_cooldown_branches_of_one_trunk_keep_their_shared_deviation_in_replicates():
    """Every budget of a (model, lr, seed) is a branch of one trunk: its luck is shared across the
    model's budgets, so a seeded branch study redraws the seed means' deviations from the smooth
    surface with each model's shared part apart (measured to cover; see design.MIN_SEED_DOF)."""
    from convscale.scaling.design import RUNS, SEEDS, build_points, smooth_surface

    branched = build_points(_two_seed_table(np.random.default_rng(5), role="branch", trunk_sd=0.08, run_sd=0.01),
                            "isoflop")
    plain = build_points(_two_seed_table(np.random.default_rng(5), trunk_sd=0.08, run_sd=0.01), "isoflop")
    assert (branched.resampling, plain.resampling) == (RUNS, SEEDS)

    def budget_corr(pts):
        surface = smooth_surface(pts) if pts.resampling == RUNS else None
        log_rep = np.log(pts.replicates(3000, np.random.default_rng(1), surface).loss)
        i = [j for j in range(pts.n) if pts.model[j] == "m2"]
        return np.corrcoef(log_rep[:, i[0]], log_rep[:, i[-1]])[0, 1]

    # the budgets of one model share its trunks' luck as branches, and not as separate runs
    assert budget_corr(branched) > 0.7
    assert abs(budget_corr(plain)) < 0.1
