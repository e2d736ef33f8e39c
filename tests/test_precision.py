"""precision = "auto": bf16 only where the device computes it natively, resolved once per study."""

from __future__ import annotations

import pytest

from convscale.sweep.planner import cell_train_config, plan_study
from convscale.sweep.presets import preset
from convscale.sweep.study import parse_study
from convscale.train import precision as prec


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx2 fma", False),  # AVX2 only: bf16 autocast is emulated, ~4.5x slower than fp32
])
def test_cpu_flags_decide(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert prec.cpu_has_native_bf16(str(info)) is native
    assert prec.cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_explicit_precision_wins_and_auto_resolves(monkeypatch):
    assert prec.resolve_precision("fp32", "cpu") == "fp32" and prec.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: False)
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: True)
    assert prec.resolve_precision("auto", "cpu") == "bf16"


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_a_study_resolves_auto_once_for_every_cell(monkeypatch, native, expected):
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: native)
    raw = preset("demo")
    del raw["family"][0]["train"]["precision"]  # the demo's NFNets are fp32 (faster on every CPU kind measured)
    study = parse_study(raw)
    plan = plan_study(study)
    nfnet = [c for c in plan.cells if c.family == "nfnet"]
    vit = [c for c in plan.cells if c.family == "vit"]
    assert nfnet and all(c.precision == expected for c in nfnet)
    assert vit and all(c.precision == "fp32" for c in vit)  # set explicitly: it wins
    # the cell keeps the planned precision even when run on a machine that would resolve otherwise
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: not native)
    assert cell_train_config(study, nfnet[0], "/tmp/x").precision == expected


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch):
    import json

    from convscale.train.config import TrainConfig
    from convscale.train.loop import _precision_for

    monkeypatch.setattr(prec, "native_bf16", lambda device_type: False)
    cfg = TrainConfig(run_dir=str(tmp_path), model="vit-w8-d4-p4", steps=2)
    assert cfg.precision == "auto" and _precision_for(cfg, tmp_path, "cpu", False) == "fp32"
    (tmp_path / "config.json").write_text(json.dumps({"train": {"precision": "bf16"}, "model": {}, "steps": 2}))
    assert _precision_for(cfg, tmp_path, "cpu", False) == "bf16"  # started on a bf16 machine
    assert _precision_for(cfg, tmp_path, "cpu", True) == "fp32"  # --restart: a new run, this machine
    assert _precision_for(cfg.replace(precision="fp32"), tmp_path, "cpu", False) == "fp32"  # explicit wins
