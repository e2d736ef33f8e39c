"""Learning-rate schedules: hand-computed values at known steps for each, cosine bit-identical to
the formula runs used before the registry, WSD's cooldown start, and how a run or study picks one."""

from __future__ import annotations

import json
import math

import pytest

from convscale.errors import UserError
from convscale.sweep.planner import cell_train_config, plan_study
from convscale.sweep.study import StudyConfig, parse_study
from convscale.train.config import TrainConfig, apply_overrides, build_schedule, cooldown_start_step, resolve_warmup_steps
from convscale.train.schedules import SCHEDULES, lr_at


def old_lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """convscale/train/schedule.py before the registry, verbatim: every run so far used it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def lrs(total_steps: int, schedule: str = "cosine", peak_lr: float = 1.0, warmup_steps: int = 2, **options):
    cfg = TrainConfig(steps=total_steps, lr=peak_lr, warmup_steps=warmup_steps, schedule=schedule,
                      schedule_options=options)
    cfg.validate()
    s = build_schedule(cfg, total_steps)
    return [s.lr(step) for step in range(total_steps)]


def test_cosine_is_bit_identical_to_the_old_formula():
    for total in (1, 2, 7, 100, 1001):
        for warmup in (0, 1, 3, total // 3):
            for peak in (0.1, 0.2, 3e-3, 1.7):
                cfg = TrainConfig(steps=total, lr=peak, warmup_steps=warmup)  # the default schedule
                s = build_schedule(cfg, total)
                assert s.warmup_steps == resolve_warmup_steps(cfg, total)  # what the loop passed to lr_at
                for step in range(total + 1):
                    assert s.lr(step) == old_lr_at(step, total, s.warmup_steps, peak)
                    assert lr_at(step, total, warmup, peak) == old_lr_at(step, total, warmup, peak)
    assert TrainConfig().schedule == "cosine" and TrainConfig().schedule_options == {}


def test_linear_exact_values():
    # 10 steps, 2 warm-up: 0.5, 1.0, then 1 - (step - 2) / 8
    assert lrs(10, "linear") == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_rsqrt_exact_values_big_vision_convention():
    # peak 0.8, warm-up 2, timescale 4: peak / sqrt(1 + (step - 2) / 4)
    v = lrs(20, "rsqrt", peak_lr=0.8, timescale_steps=4)
    assert v[:3] == [0.4, 0.8, 0.8]
    assert v[6] == pytest.approx(0.8 / math.sqrt(2), abs=1e-15)  # one timescale after warm-up
    assert v[14] == pytest.approx(0.4, abs=1e-15)  # 3 timescales: half the peak
    assert v[19] == pytest.approx(0.8 / math.sqrt(1 + 17 / 4), abs=1e-15)  # no cooldown by default
    # a 25 % linear cooldown: the last 5 of 20 steps times 1, 0.8, 0.6, 0.4, 0.2
    c = lrs(20, "rsqrt", peak_lr=0.8, timescale_steps=4, cooldown_fraction=0.25)
    assert c[:15] == v[:15]
    assert c[18] == pytest.approx(0.8 / math.sqrt(5) * 0.4, abs=1e-15) == pytest.approx(0.143108350559987)
    assert build_schedule(TrainConfig(schedule="rsqrt", schedule_options={"cooldown_fraction": 0.25}),
                          20).cooldown_start_step == 15


def test_wsd_exact_values_and_cooldown_start():
    # 100 steps, 5 warm-up, 20 % cooldown: steps 80..99 cool down
    lin = lrs(100, "wsd", warmup_steps=5, cooldown_fraction=0.2, cooldown_shape="linear")
    assert lin[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lin[5:81] == [1.0] * 76  # stable, and the first cooldown step is still the peak
    assert lin[90] == 0.5 and lin[99] == pytest.approx(0.05, abs=1e-15)
    sqrt = lrs(100, "wsd", warmup_steps=5, cooldown_fraction=0.2)  # the default shape: 1-sqrt
    assert sqrt[:81] == lin[:81]
    assert sqrt[85] == 0.5  # 1 - sqrt(5 / 20)
    assert sqrt[96] == pytest.approx(1 - math.sqrt(0.8), abs=1e-15) == pytest.approx(0.105572809000084)
    cfg = TrainConfig(schedule="wsd", warmup_steps=5)
    assert cooldown_start_step(cfg, 100) == 80  # default 20 %
    assert cooldown_start_step(cfg, 13) == 10  # round(2.6) = 3 cooldown steps
    assert cooldown_start_step(cfg.replace(schedule_options={"cooldown_fraction": 0.9}), 10) == 5  # not in warm-up
    assert cooldown_start_step(cfg.replace(schedule_options={"cooldown_fraction": 0.0}), 10) == 10  # no cooldown
    with pytest.raises(UserError, match="has no cooldown"):
        cooldown_start_step(TrainConfig(), 100)


def test_wsd_runs_of_any_length_share_the_trunk_before_their_cooldown():
    # fixed warm-up steps: every update before a run's cooldown start is that of a longer run
    short, long = lrs(100, "wsd", warmup_steps=5), lrs(400, "wsd", warmup_steps=5)
    assert short[:80] == long[:80] and long[80:320] == [1.0] * 240


def test_schedule_selected_by_overrides_and_round_trips():
    cfg = apply_overrides(TrainConfig(steps=10), {"schedule": "wsd", "schedule_options.cooldown_fraction": "0.1",
                                                  "schedule_options.cooldown_shape": "linear"})
    assert cfg.schedule == "wsd" and cfg.schedule_options == {"cooldown_fraction": 0.1, "cooldown_shape": "linear"}
    cfg.validate()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["schedule_options"] == {"cooldown_fraction": 0.1, "cooldown_shape": "linear"}
    # a whole table (a study's [train]) replaces the options; dotted keys then edit it, in any order
    again = apply_overrides(cfg, {"schedule_options.cooldown_shape": "1-sqrt", "schedule_options": {"cooldown_fraction": 0.3}})
    assert again.schedule_options == {"cooldown_fraction": 0.3, "cooldown_shape": "1-sqrt"}
    assert sorted(SCHEDULES) == ["cosine", "linear", "rsqrt", "wsd"]


@pytest.mark.parametrize("overrides, message", [
    ({"schedule": "step"}, "schedule must be one of"),
    ({"schedule": "wsd", "schedule_options.cooldown_frac": "0.1"}, "unknown schedule_options"),
    ({"schedule_options.cooldown_fraction": "0.1"}, "for schedule 'cosine'"),
    ({"schedule": "wsd", "schedule_options.cooldown_fraction": "1.5"}, r"must be in \[0, 1\]"),
    ({"schedule": "wsd", "schedule_options.cooldown_fraction": "nan"}, "must be a float"),
    ({"schedule": "wsd", "schedule_options.cooldown_shape": "cosine"}, "must be one of"),
    ({"schedule": "rsqrt", "schedule_options.timescale_steps": "0"}, ">= 1"),
    ({"schedule": "rsqrt", "schedule_options.timescale_steps": "1e4"}, "must be a int"),
    ({"schedule_options": "7"}, "must be a table"),
])
def test_bad_schedule_settings_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        apply_overrides(TrainConfig(steps=10), overrides).validate()
    assert "\n" not in str(e.value)


STUDY = {
    "name": "sched",
    "data": {"kind": "procedural", "resolution": 16, "num_classes": 10, "heldout_images": 64},
    "train": {"batch_size": 32, "precision": "fp32", "schedule": "wsd",
              "schedule_options": {"cooldown_fraction": 0.1, "cooldown_shape": "linear"}},
    "family": [
        {"name": "nfnet", "models": ["nfnet-tiny"], "optimizer": "sgd_agc", "lrs": [0.2]},
        {"name": "vit", "models": ["vit-tiny"], "optimizer": "adamw", "lrs": [0.004],
         "train": {"schedule": "rsqrt", "schedule_options": {"timescale_steps": 100}}},
    ],
    "budgets": {"images": [64, 128]},
}


def test_a_study_sets_the_schedule_per_study_and_per_family_and_each_cell_records_it():
    study = parse_study(STUDY)
    assert StudyConfig.from_json(study.to_json()) == study
    plan = plan_study(study)
    by_family = {c.family: cell_train_config(study, c, "/tmp/x") for c in plan.cells}
    nf, vit = by_family["nfnet"], by_family["vit"]
    assert (nf.schedule, nf.schedule_options) == ("wsd", {"cooldown_fraction": 0.1, "cooldown_shape": "linear"})
    assert (vit.schedule, vit.schedule_options) == ("rsqrt", {"timescale_steps": 100})
    assert json.loads(nf.to_json())["schedule"] == "wsd"  # what `convscale train --config` receives
    bad = {**STUDY, "train": {**STUDY["train"], "schedule_options": {"cooldown_fraction": 2.0}}}
    with pytest.raises(UserError, match="cooldown_fraction"):
        parse_study(bad)


def test_train_cli_selects_a_schedule_with_set(cli, tmp_path):
    rc, out, err = cli(["train", "--run-dir", tmp_path / "r", "--steps", 10, "--set", "schedule=wsd",
                        "--set", "schedule_options.cooldown_shape=linear", "--print-config"])
    assert rc == 0, err
    printed = json.loads(out)
    assert printed["schedule"] == "wsd" and printed["schedule_options"] == {"cooldown_shape": "linear"}
    rc, out, err = cli(["train", "--run-dir", tmp_path / "r", "--steps", 10, "--set", "schedule=cosnie"])
    assert rc == 2 and "schedule must be one of ['cosine', 'linear', 'rsqrt', 'wsd']" in err
