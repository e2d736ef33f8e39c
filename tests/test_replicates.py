"""Fine-tune replicates: which fine-tunes stand for a family, and the Welch interval of the
difference of two families' mean top-1 (convscale/report/replicates.py). No training, no torch."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from convscale.report.inputs import read_finetunes
from convscale.report.replicates import ReplicateGroup, mean_interval, replicate_group, welch_difference


def group(top1, n=10**9, family="f", own_splits=True) -> ReplicateGroup:
    return ReplicateGroup(family=family, model="m", pretrain_flops=1e12, top1=tuple(top1),
                          n_images=(n,) * len(top1), names=tuple(f"r{i}" for i in range(len(top1))), pretrain_runs=1,
                          own_splits=own_splits)


def test_welch_interval_is_scipys_when_the_runs_vary_more_than_their_test_images():
    a, b = [0.81, 0.78, 0.84, 0.80], [0.74, 0.79, 0.71]
    d, lo, hi, df = welch_difference(group(a), group(b))
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert 3 < df < 5


def test_identical_replicates_keep_their_test_images_binomial_noise():
    # three fine-tunes with the same top-1 on 400 images: zero sample spread, but each run's top-1
    # still has variance p(1-p)/n from its held-out sampling; the interval must not collapse
    g = group([0.8, 0.8, 0.8], n=400)
    assert g.spread == pytest.approx(0, abs=1e-12) and g.mean_variance() == (0.0, pytest.approx(0.8 * 0.2 / 400 / 3))
    d, lo, hi, df = welch_difference(g, group([0.8, 0.8, 0.8], n=400))
    # that floor is a known variance, not an estimate: normal quantiles (infinite degrees of freedom)
    half = stats.norm.ppf(0.975) * math.sqrt(2 * 0.8 * 0.2 / 400 / 3)
    assert d == 0 and df == math.inf and (lo, hi) == (pytest.approx(-half), pytest.approx(half))
    lo1, hi1 = mean_interval(g)
    assert hi1 - lo1 == pytest.approx(2 * stats.norm.ppf(0.975) * math.sqrt(0.8 * 0.2 / 400 / 3))


def test_a_shared_test_set_adds_its_sampling_undivided():
    # three fine-tunes on one shared test set of 400 images: their spread shows the runs only, and
    # the test set's sampling (binomial sd 2 pp) is common to all three: the mean's variance is
    # s^2/3 + p(1-p)/n, with Satterthwaite's df from the estimated part alone
    top1 = [0.80, 0.83, 0.77]
    g = group(top1, n=400, own_splits=False)
    s2 = np.var(top1, ddof=1)
    est, known = g.mean_variance()
    assert est == pytest.approx(s2 / 3) and known == pytest.approx(0.8 * 0.2 / 400)
    assert g.mean_df() == pytest.approx((s2 / 3 + 0.8 * 0.2 / 400) ** 2 / ((s2 / 3) ** 2 / 2))
    own = group(top1, n=400)  # own splits: the spread (3 pp sd) already holds the sampling
    assert own.mean_variance() == (pytest.approx(s2 / 3), 0.0)
    se2 = 2 * (s2 / 3 + 0.8 * 0.2 / 400)
    df = se2 ** 2 / (2 * (s2 / 3) ** 2 / 2)
    assert welch_difference(g, g)[2:] == (pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(se2)), pytest.approx(df))
    assert welch_difference(g, g)[2] > welch_difference(own, own)[2]


def test_one_replicate_claims_no_interval():
    d, lo, hi, _ = welch_difference(group([0.8]), group([0.7, 0.72]))
    assert d == pytest.approx(0.09) and math.isnan(lo) and math.isnan(hi)
    assert all(map(math.isnan, mean_interval(group([0.8]))))


@pytest.mark.parametrize("run_sd, shared", [(0.0, False), (0.03, False), (0.001, True), (0.01, True)])
def test_interval_covers_the_true_difference_about_as_often_as_it_claims(run_sd, shared):
    # each replicate: a run effect (sd run_sd) on 359 held-out images; 3 per family, equal true
    # accuracy. Own splits (the demo's): each replicate's own binomial draw. Shared: one test set per
    # family, whose difficulty (sd of the binomial) every replicate sees. The 95 % interval covers 0
    # in 93-99 % of 3000 studies (counting the own-split floor as an estimated variance covered
    # 99.8 % with run_sd 0; dividing a shared set's sampling by k would leave 1.96 / sqrt(3) standard
    # errors, about 74 % coverage with run_sd 0.001)
    rng = np.random.default_rng(0)
    n, k, sims, covered = 359, 3, 3000, 0
    for _ in range(sims):
        g = []
        for fam in "ab":
            p = np.clip(0.72 + run_sd * rng.standard_normal(k), 0.01, 0.99)
            if shared:
                top1 = p + rng.normal(0.0, math.sqrt(0.72 * 0.28 / n))
            else:
                top1 = rng.binomial(n, p) / n
            g.append(group(top1, n=n, family=fam, own_splits=not shared))
        _, lo, hi, _ = welch_difference(*g)
        covered += lo <= 0 <= hi
    assert 0.93 <= covered / sims <= 0.99, covered / sims


def rec(name, model, flops, top1, *, loss=2.0, run="pre", seed=math.nan, data_seed=math.nan, n=359):
    return {"name": name, "model": model, "pretrain_flops": flops, "heldout_top1": top1, "pretrain_loss": loss,
            "pretrain_run_dir": run, "seed": seed, "data_seed": data_seed, "split_seed": data_seed, "heldout_images": n}


def test_replicates_are_one_model_at_the_top_compute_chosen_without_looking_at_top1():
    recs = [
        rec("small", "m1", 1e11, 0.99),  # less compute: never a replicate of the top
        rec("a0", "m2", 1e12, 0.60, loss=2.0, run="p2", seed=0, data_seed=0),
        rec("a1", "m2", 1.005e12, 0.62, loss=2.0, run="p2", seed=1, data_seed=1),  # within 1 %: the same compute
        rec("b0", "m3", 1e12, 0.90, loss=1.5, run="p3", seed=0, data_seed=0),
        rec("b1", "m3", 1e12, 0.91, loss=1.5, run="p3", seed=1, data_seed=1),
        rec("b1-again", "m3", 1e12, 0.91, loss=1.5, run="p3", seed=1, data_seed=1),  # the same fine-tune twice
        rec("failed", "m3", 1e12, math.nan),
    ]
    # m2 and m3 have two distinct replicates each: the lower pre-training loss (m3) stands for the family
    g = replicate_group("f", recs)
    assert (g.model, g.names, g.top1, g.pretrain_runs, g.own_splits) == ("m3", ("b0", "b1"), (0.90, 0.91), 1, True)
    # a third replicate of m2 makes it the better-measured model, whatever its accuracy
    g = replicate_group("f", recs + [rec("a2", "m2", 1e12, 0.55, run="p2b", seed=2, data_seed=2)])
    assert (g.model, g.k, g.pretrain_runs) == ("m2", 3, 2)
    # fine-tunes without recorded seeds are taken as distinct runs, on one shared test set
    unknown = replicate_group("f", [rec("x", "m", 1e12, 0.5), rec("y", "m", 1e12, 0.5)])
    assert unknown.k == 2 and not unknown.own_splits
    assert replicate_group("f", [rec("failed", "m", 1e12, math.nan)]) is None


def test_read_finetunes_reads_each_fine_tunes_seeds(tmp_path):
    results = pd.DataFrame([{"family": "nfnet", "model": "m", "params": 1e4, "train_flops": 1e12, "budget_flops": 1e12,
                             "loss": 2.0, "top1": 0.3, "epochs": 1.0, "lr": 0.1, "seed": 4,
                             "run_dir": str(tmp_path / "runs" / "cell")}])
    for i in range(2):
        d = tmp_path / "finetune" / f"ft__s{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"status": "done", "heldout_top1": 0.5 + i / 10, "heldout_images": 359,
                                                   "pretrain_run_dir": str(tmp_path / "runs" / "cell")}))
        (d / "config.json").write_text(json.dumps({"train": {"seed": i, "data": {"seed": 10 + i, "kind": "digits",
                                                                                  "heldout_fraction": 0.2}}}))
    fixed = tmp_path / "finetune" / "fixed-test-set"  # a held-out folder: the data seed does not re-split it
    fixed.mkdir()
    (fixed / "result.json").write_text(json.dumps({"status": "done", "heldout_top1": 0.5}))
    (fixed / "config.json").write_text(json.dumps({"train": {"seed": 3, "data": {
        "seed": 3, "kind": "folder", "heldout_path": "/data/val", "heldout_fraction": 0.01}}}))
    (tmp_path / "finetune" / "old").mkdir()  # written before seeds were read: no config
    (tmp_path / "finetune" / "old" / "result.json").write_text(json.dumps({"status": "done", "heldout_top1": 0.4}))
    ft = read_finetunes(tmp_path, results).set_index("name")
    assert ft.loc["ft__s0", ["seed", "data_seed", "split_seed", "pretrain_seed"]].tolist() == [0.0, 10.0, 10.0, 4.0]
    assert ft.loc["ft__s1", ["seed", "data_seed", "split_seed"]].tolist() == [1.0, 11.0, 11.0]
    assert ft.loc["fixed-test-set", ["seed", "data_seed"]].tolist() == [3.0, 3.0]
    assert math.isnan(ft.loc["fixed-test-set", "split_seed"])
    assert ft.loc["old", ["seed", "data_seed", "split_seed", "pretrain_seed"]].isna().all()
