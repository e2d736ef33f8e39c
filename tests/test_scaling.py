"""Scaling fits recover known laws from noisy synthetic runs (numpy/scipy/pandas only)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from convscale.cli.main import main
from convscale.errors import UserError
from convscale.scaling import (
    StudyFit,
    extrapolation_check,
    fit_lr_trend,
    lr_optima,
    fit_parametric,
    fit_power_law,
    fit_table,
    format_text,
    frontier,
    prepare_table,
)

# The Chinchilla-like law the synthetic runs are drawn from, and its compute-optimal exponents.
E, A, B, ALPHA, BETA = 1.7, 400.0, 410.0, 0.34, 0.28
N_EXP, D_EXP = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # 0.4516, 0.5484
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
K = 6.0  # C = K * N * D in the synthetic tables
LR_EPOCH_SLOPE, LR_SIZE_SLOPE = -0.3, -0.1


def law(n, d):
    return E + A / n**ALPHA + B / d**BETA


def sweep_table(seed: int = 0, noise: float = 0.01, budgets=np.logspace(15, 19, 5)) -> pd.DataFrame:
    """A sweep-stage table: per budget 7 sizes around the optimum x 9 lrs (factors of 2).

    The loss grows quadratically in log(lr / lr_opt), lr_opt = 1.6 epochs^-0.3 (N/1e7)^-0.1.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_opt = G * (c / K) ** N_EXP
        for j in range(-3, 4):
            n = n_opt * 2.0**j
            d = c / (K * n)
            epochs = d / 1e9
            lr_opt = 1.6 * epochs**LR_EPOCH_SLOPE * (n / 1e7) ** LR_SIZE_SLOPE
            for i in range(9):
                lr = 0.05 * 2.0**i
                loss = law(n, d) * (1 + 0.05 * np.log(lr / lr_opt) ** 2) * np.exp(rng.normal(0, noise))
                rows.append(
                    dict(family="nfnet", model=f"m{n:.4g}", params=n, flops_per_image=K * n / 3, images_seen=d,
                         epochs=epochs, lr=lr, train_flops=c * (1 + rng.uniform(-0.01, 0.01)), wall_hours=1.0,
                         device_hours=1.0, loss=loss, top1=0.5, status="done", budget_flops=c)
                )
    return pd.DataFrame(rows)


def grid_csv(seed: int = 0, noise: float = 0.01) -> pd.DataFrame:
    """A generic CSV: a 7 x 7 grid of (params, data) with only the columns params, data, loss."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.logspace(6, 9, 7), np.logspace(8, 11, 7)))
    return pd.DataFrame({"params": n, "data": d, "loss": law(n, d) * np.exp(rng.normal(0, noise, n.size))})


@pytest.fixture(scope="module")
def sweep() -> pd.DataFrame:
    df = sweep_table()
    df.loc[3, "status"] = "diverged"
    df.loc[[4, 5], "status"] = "failed"
    return df


@pytest.fixture(scope="module")
def sweep_fit(sweep) -> StudyFit:
    return fit_table(sweep, bootstrap=30, seed=0)


def test_power_law_recovers_pure_law():
    rng = np.random.default_rng(1)
    c = np.logspace(12, 20, 10)
    loss = 5.0 * c**-0.1 * np.exp(rng.normal(0, 0.01, c.size))
    fit = fit_power_law(c, loss, bootstrap_count=100, rng=rng)
    assert fit.a.contains(0.1) and fit.A.contains(5.0), fit
    assert abs(fit.a.value - 0.1) < 0.003 and fit.r2_log > 0.99
    assert fit.a.high - fit.a.low < 0.01  # intervals are informative, not just wide


def test_power_law_with_irreducible_term_recovers_E():
    rng = np.random.default_rng(2)
    c = np.logspace(10, 22, 13)
    loss = (1.5 + 30.0 * c**-0.15) * np.exp(rng.normal(0, 0.005, c.size))
    fit = fit_power_law(c, loss, irreducible=True, bootstrap_count=60, rng=rng)
    assert fit.E.contains(1.5) and fit.a.contains(0.15), fit
    assert abs(fit.E.value - 1.5) < 0.1
    # the pure power law cannot bend towards E: its log-space fit is clearly worse
    assert fit_power_law(c, loss, bootstrap_count=0).r2_log < fit.r2_log


def test_frontier_picks_best_run_per_budget(sweep, sweep_fit):
    done = prepare_table(sweep).done
    rows, method = frontier(done)
    assert method == "budget"
    assert list(rows["compute_flops"]) == sorted(sweep["budget_flops"].unique())
    for r in rows.itertuples():
        same = done[done["budget_flops"] == r.compute_flops]
        assert r.loss == same["loss"].min() and r.runs_in_budget == len(same)
    fam = sweep_fit.families["nfnet"]
    assert [f["loss"] for f in fam.frontier] == list(rows["loss"])


def test_frontier_pareto_set_without_budgets():
    df = pd.DataFrame(
        {"params": [1, 2, 3, 4, 5], "data": [1, 1, 1, 1, 1], "flops": [10, 20, 30, 40, 50],
         "loss": [3.0, 3.5, 2.0, 2.5, 1.0]}
    )
    rows, method = frontier(prepare_table(df).done)
    assert method == "pareto"
    assert list(rows["compute_flops"]) == [10, 30, 50] and list(rows["loss"]) == [3.0, 2.0, 1.0]


def test_failed_runs_excluded_but_counted(sweep_fit):
    assert sweep_fit.status_counts == {"diverged": 1, "done": 312, "failed": 2}
    fam = sweep_fit.families["nfnet"]
    assert (fam.n_runs, fam.n_done) == (315, 312)
    assert any("1 diverged, 2 failed" in n for n in sweep_fit.notes)


def test_parametric_recovers_law_and_optimal_exponents():
    pts = grid_csv(seed=3).rename(columns={"data": "images_seen"})
    fit = fit_parametric(pts, flops_per_param_sample=K, bootstrap_count=30, rng=np.random.default_rng(3))
    for name, true in (("E", E), ("A", A), ("B", B), ("alpha", ALPHA), ("beta", BETA)):
        assert getattr(fit, name).contains(true), (name, getattr(fit, name))
    assert fit.n_opt_exponent.contains(N_EXP) and fit.d_opt_exponent.contains(D_EXP)
    assert fit.G.contains(G)
    assert abs(fit.n_opt_exponent.value + fit.d_opt_exponent.value - 1) < 1e-12
    # the closed form N_opt minimises L along C = K N D
    c = 1e20
    n = fit.optimal_params(c) * np.array([0.8, 1.0, 1.25])
    along = fit.predict(n, c / (K * n))
    assert along[1] < along[0] and along[1] < along[2]


def test_compute_optimal_exponents_from_isoflop_sweep(sweep_fit):
    fam = sweep_fit.families["nfnet"]
    # approach 2 (parabolas) is close but slightly biased by the law's asymmetry and lr grid
    assert abs(fam.optimal_params_parabola.exponent.value - N_EXP) < 0.02
    assert abs(fam.optimal_images_parabola.exponent.value - D_EXP) < 0.02
    # approach 1: the best run per budget is only +-1 grid step from the optimum
    assert fam.optimal_params_frontier_runs.exponent.contains(N_EXP)
    assert fam.flops_per_param_sample == pytest.approx(K, rel=0.01)


def test_lr_trend_recovers_planted_slopes(sweep_fit, sweep):
    t = sweep_fit.families["nfnet"].lr_trend
    assert t.duration_column == "epochs"
    assert t.slope_duration.contains(LR_EPOCH_SLOPE) and t.slope_params.contains(LR_SIZE_SLOPE), t
    assert (t.sign_duration, t.sign_params) == ("decreasing", "decreasing")
    # a planted positive slope without a size term
    one_size = sweep.assign(params=1e7, lr=sweep["lr"] * sweep["epochs"] ** 0.5)
    t2 = fit_lr_trend(prepare_table(one_size).done, bootstrap_count=30, rng=np.random.default_rng(0))
    assert t2.slope_params is None and t2.sign_duration == "increasing"


def test_extrapolation_small_on_clean_data():
    rng = np.random.default_rng(4)
    c = np.logspace(12, 18, 7)
    loss = 5.0 * c**-0.1 * np.exp(rng.normal(0, 0.003, c.size))
    x = extrapolation_check(c, loss, bootstrap_count=50, rng=rng)
    assert x.held_out_compute_flops == 1e18 and x.n_fit_points == 6
    assert abs(x.relative_error) < 0.01
    assert x.predicted.low < x.actual_loss < x.predicted.high


def test_generic_csv_with_params_data_loss_only():
    fit = fit_table(grid_csv(seed=5), bootstrap=10, seed=0)
    assert fit.compute_source == "6*N*D" and any("6*N*D" in n for n in fit.notes)
    fam = fit.families["all"]
    assert fam.frontier_method == "pareto" and fam.flops_per_param_sample == pytest.approx(6.0)
    assert fam.parametric is not None and abs(fam.parametric.alpha.value - ALPHA) < 0.03
    assert fam.power_law is not None and fam.power_law.a.value > 0
    assert "lr_trend" in fam.skipped and "optimal_params_parabola" in fam.skipped


def test_fit_is_deterministic_under_seed_and_round_trips(sweep):
    small = sweep[sweep["lr"].isin([0.2, 0.4, 0.8])]
    a = fit_table(small, bootstrap=8, seed=7).to_dict()
    assert a == fit_table(small, bootstrap=8, seed=7).to_dict()
    assert a != fit_table(small, bootstrap=8, seed=8).to_dict()
    text = json.dumps(a, allow_nan=False)
    assert StudyFit.from_dict(json.loads(text)).to_dict() == a


@pytest.mark.parametrize(
    "df, message",
    [
        (pd.DataFrame(columns=["params", "data", "loss"]), "the results table is empty"),
        (pd.DataFrame({"params": [1.0], "loss": [2.0]}), "missing column(s) images_seen (or data)"),
        (
            pd.DataFrame({"params": [1.0], "data": [1.0], "loss": [2.0], "status": ["failed"]}),
            "no runs with status 'done'",
        ),
    ],
)
def test_bad_input_is_a_user_error(df, message):
    with pytest.raises(UserError) as e:
        fit_table(df, bootstrap=0)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_few_budgets_is_a_user_error(sweep):
    # 2 budgets x 3 sizes x 1 lr: too few for every item (L(N, D) needs 8 points)
    two = sweep[sweep["budget_flops"].isin([1e15, 1e16]) & (sweep["lr"] == 0.4)].groupby("budget_flops").head(3)
    assert two["budget_flops"].nunique() == 2
    with pytest.raises(UserError, match=r"need >= 3 distinct compute budgets per family .*; got 2"):
        fit_table(two, bootstrap=0)


def test_cli_json_and_text(tmp_path, capsys, sweep):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    sweep[sweep["lr"].isin([0.2, 0.4, 0.8, 1.6])].to_csv(sweep_dir / "results.csv", index=False)
    out = tmp_path / "fit.json"
    rc = main(["fit", str(sweep_dir), "--format", "json", "--bootstrap", "5", "--seed", "1", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    pl = printed["families"]["nfnet"]["power_law"]
    assert set(pl["a"]) == {"value", "low", "high"} and pl["a"]["low"] <= pl["a"]["value"] <= pl["a"]["high"]
    assert set(printed["families"]["nfnet"]["parametric"]["alpha"]) == {"value", "low", "high"}
    assert main(["fit", str(sweep_dir), "--bootstrap", "5"]) == 0
    text = capsys.readouterr().out
    assert "nfnet: L = " in text and "(a in [" in text and "N_opt ~ C^" in text


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"params": [1.0], "loss": [2.0]}).to_csv(bad, index=False)
    assert main(["fit", str(bad)]) == 2
    assert "missing column(s)" in capsys.readouterr().err


def test_format_text_names_skipped_items():
    fit = fit_table(grid_csv(seed=6), bootstrap=0, seed=0)
    text = format_text(fit)
    assert "all: lr_trend not fitted:" in text and "[no interval]" in text
    assert math.isnan(fit.families["all"].power_law.a.low)


def test_load_results_reads_parquet_sweep_dir(tmp_path, sweep):
    from convscale.scaling import load_results

    sweep.to_parquet(tmp_path / "results.parquet")
    pd.DataFrame({"params": [1.0]}).to_csv(tmp_path / "results.csv", index=False)  # parquet wins
    got = load_results(tmp_path)
    assert len(got) == len(sweep) and got["loss"].tolist() == sweep["loss"].tolist()
    with pytest.raises(UserError, match="holds no results.parquet or results.csv"):
        (tmp_path / "empty").mkdir()
        load_results(tmp_path / "empty")


def test_a_diverged_larger_lr_bounds_the_optimum_from_above():
    # one cell grid (model m, budget 1e12): lr 0.1 < 0.2 (best done) < 0.4 (diverged)
    done = pd.DataFrame({"family": "f", "model": "m", "params": 1e5, "images_seen": 1e6, "train_flops": 1e12,
                         "budget_flops": 1e12, "epochs": 1.0, "lr": [0.1, 0.2], "loss": [3.0, 2.5], "top1": 0.5})
    alone = lr_optima(done, "epochs")
    assert bool(alone["at_edge"].iloc[0]) and alone["lr_opt"].iloc[0] == 0.2  # nothing said above 0.2
    diverged = done.iloc[:1].assign(lr=0.4, loss=np.nan)
    bounded = lr_optima(done, "epochs", diverged)
    assert not bool(bounded["at_edge"].iloc[0]) and bounded["lr_opt"].iloc[0] == 0.2
    # a divergence of another budget or model says nothing about this grid
    for other in (diverged.assign(budget_flops=1e13), diverged.assign(model="m2")):
        assert bool(lr_optima(done, "epochs", other)["at_edge"].iloc[0])
    # through the whole fit: a results table with the diverged row marks the optimum as bracketed
    table = pd.concat([done.assign(status="done"), diverged.assign(status="diverged")], ignore_index=True)
    assert len(prepare_table(table).diverged) == 1


def test_isoflop_with_three_sizes_per_budget_gets_an_n_opt_interval():
    """3 sizes per budget: per-budget parabolas leave no deviations, so the bootstrap draws them from
    the fitted L(N, D); redrawing points within budgets gave no N_opt interval at all."""
    import numpy as np

    from convscale.scaling import fit_table
    from convscale.scaling.planted import Law, planted_study

    law = Law(A=60.0, alpha=0.34, B=400.0, beta=0.34)
    covered = 0
    for s in range(3):
        df = planted_study(law, "isoflop", sizes=np.geomspace(3e5, 2e7, 3), budgets=np.geomspace(1e15, 1e17, 5),
                           noise=0.02, rng=np.random.default_rng(s))
        fam = next(iter(fit_table(df, bootstrap=200, seed=s).families.values()))
        _, n_fit, _ = fam.allocation()
        e = n_fit.exponent
        assert np.isfinite(e.low) and np.isfinite(e.high) and e.high - e.low < 0.3
        covered += e.low <= 0.5 <= e.high
    assert covered >= 2


def test_leverage_and_modified_residuals():
    """The hat matrix's diagonal of a line through x = -1, 0, 1 is 5/6, 1/3, 5/6; a residual is
    divided by sqrt(1 - h) and the set centred; a point its surface passes through (h = 1) has none."""
    from convscale.scaling.design import leverage, modified_residuals

    np.testing.assert_allclose(leverage(np.vander([-1.0, 0.0, 1.0], 2)), [5 / 6, 1 / 3, 5 / 6])
    out = modified_residuals(np.array([0.1, -0.1, 0.2, 0.0]), np.array([0.75, 0.75, 0.0, 1.0]), 2)
    assert np.isnan(out[3])
    raw = np.array([0.1 / 0.5, -0.1 / 0.5, 0.2])
    np.testing.assert_allclose(out[:3], raw - raw.mean())


def test_isoflop_bootstrap_surface_follows_the_skewed_loss():
    """The loss along an IsoFLOP is skewed in log N: a parabola through 7 sizes misfits noise-free runs
    of a planted law by ~0.005 in log loss, as much as the noise the bootstrap should redraw. Budgets
    with >= 6 sizes are smoothed by a cubic (4 parameters each), which misfits them < 0.002."""
    from convscale.scaling.design import build_points, smooth_surface
    from convscale.scaling.planted import Law, planted_study
    from convscale.scaling.table import prepare_table

    law = Law(A=60.0, alpha=0.34, B=400.0, beta=0.34)
    df = planted_study(law, "isoflop", noise=0.0, rng=np.random.default_rng(0), lrs_per_cell=1,
                       sizes=np.geomspace(3e5, 2e7, 7), budgets=np.geomspace(1e15, 1e17, 5))
    pts = build_points(prepare_table(df).done, "isoflop")
    surface, n_params, lev = smooth_surface(pts)
    assert n_params == 5 * 4
    assert np.sqrt(np.mean((np.log(pts.loss) - surface) ** 2)) < 0.002
    np.testing.assert_allclose(lev.sum(), n_params)
