"""timm checkpoints in and out, against timm itself (imported through benchmarks/timm_shim.py):
the same input gives logits equal to 1e-5 relative (a) for a timm model and the convscale model its
state dict is mapped onto, (b) for a convscale run and its export loaded by
``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``; variants that compute another
function are refused by name; files are read without unpickling code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.models import get_config
from convscale.models.timm_weights import config_from_timm, from_timm, read_state_dict, timm_key, to_timm
from convscale.train.config import TrainConfig
from convscale.train.finetune import find_pretrained, load_pretrained_weights
from convscale.train.loop import run
from support import REPO, env

sys.path.insert(0, str(REPO / "benchmarks"))
from timm_shim import import_timm, unavailable_reason  # noqa: E402

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (bash scripts/install.sh --test installs it)", allow_module_level=True)
timm = import_timm()
assert timm is not None, f"timm is installed but does not load through the shim: {unavailable_reason()}"

torch.set_num_threads(1)
TOL = 1e-5  # max |logit difference| / max |logit|
# scaled-down architectures timm builds with kwargs: convscale's nfnet-w0.125-d1.1.1 and vit-w64-d2-p8
TIMM_NFNET = dict(depths=(1, 1, 1), channels=(32, 64, 192), stem_chs=16, group_size=16, num_features=384)
TIMM_VIT = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` (eval mode) with every parameter moved off its init: timm zero-inits SkipInit gains
    and the last conv's gain, which would make every NFNet block the identity and hide a mapping bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gain", "skipinit_gain", "skip_gain")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def timm_nfnet(**kw) -> torch.nn.Module:
    return perturbed(timm.create_model("dm_nfnet_f0", num_classes=10, **{**TIMM_NFNET, **kw}))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------- timm -> convscale

def test_dm_nfnet_maps_onto_the_same_convscale_nfnet():
    tm = timm_nfnet()
    cfg, sd = from_timm(tm.state_dict())
    assert (cfg.name, cfg.activation, cfg.num_classes) == ("nfnet-w0.125-d1.1.1", "gelu_erf", 10)
    model = cfg.build()
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 37, 37, generator=torch.Generator().manual_seed(1))  # odd size: TF "SAME" padding
    ref = logits(tm, x)
    assert rel_diff(logits(model, x), ref) < TOL  # measured 3.4e-7
    # what the mapping folds in matters at this tolerance: timm's gains taken as they are (its
    # weight-standardisation eps ignored) give 1.6e-3; the tanh GELU of convscale's default 1.3e-4
    raw = {k: (tm.state_dict()[timm_key("nfnet", k)].reshape(-1) if k.endswith(".gain") else v) for k, v in sd.items()}
    model.load_state_dict(raw)
    assert rel_diff(logits(model, x), ref) > 10 * TOL
    tanh = dataclasses.replace(cfg, activation="gelu").build()
    tanh.load_state_dict(sd)
    assert rel_diff(logits(tanh, x), ref) > 10 * TOL


def test_vit_maps_onto_the_same_convscale_vit():
    tm = perturbed(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_VIT))
    cfg, sd = from_timm(tm.state_dict())
    assert (cfg.name, cfg.image_size, cfg.num_heads, cfg.pool) == ("vit-w64-d2-p8", 32, 2, "token")
    model = cfg.build()
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert rel_diff(logits(model, x), logits(tm, x)) < TOL  # measured 0.0


@pytest.mark.slow
def test_full_size_dm_nfnet_f0_and_vit_base_map_exactly():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for name, kw, ours in (("dm_nfnet_f0", {}, "nfnet-f0"), ("vit_base_patch16_224", {"img_size": 64}, "vit-b16")):
        tm = perturbed(timm.create_model(name, **kw), seed=3)
        cfg, sd = from_timm(tm.state_dict())
        assert cfg.name == ours
        model = cfg.build()
        model.load_state_dict(sd)
        ref = logits(tm, x)
        assert rel_diff(logits(model, x), ref) < TOL  # measured 2.2e-6 (F0), 0.0 (B/16)
        export = to_timm(cfg, model.state_dict())  # and back: the entry point itself, no shape kwargs
        assert (export.model_name, export.kwargs) == (name, kw)
        back = timm.create_model(name, **kw)
        back.load_state_dict(export.state_dict)
        assert rel_diff(logits(back, x), ref) < TOL


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("make, says", [
    (lambda: timm.create_model("nfnet_f0", num_classes=10, **TIMM_NFNET), "symmetrically"),
    (lambda: timm.create_model("nf_resnet26", num_classes=10), "NF-ResNet"),
    (lambda: timm.create_model("vit_tiny_patch16_224", reg_tokens=4, **TIMM_VIT), "register tokens"),
    (lambda: timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **TIMM_VIT), "fc_norm"),
    (lambda: timm.create_model("vit_tiny_patch16_224", init_values=1e-5, **TIMM_VIT), "LayerScale"),
], ids=["nfnet_f0", "nf_resnet26", "vit_registers", "vit_avg_pool", "vit_layerscale"])
def test_variants_that_compute_another_function_are_refused(make, says):
    with pytest.raises(UserError, match=says):
        from_timm(make().state_dict())


def test_timm_nfnet_into_a_tanh_gelu_model_is_refused_and_export_too():
    sd = timm_nfnet().state_dict()
    tanh = get_config("nfnet-w0.125-d1.1.1", num_classes=10)  # convscale's default activation
    with pytest.raises(UserError, match="model_overrides.activation=gelu_erf"):
        from_timm(sd, tanh)
    with pytest.raises(UserError, match="--allow-gelu-mismatch"):
        to_timm(tanh, tanh.build().state_dict())
    with pytest.raises(UserError, match="stem widths"):  # timm's stem is (s/8, s/4, s/2, s): no '+' widths
        plus = get_config("nfnet-w0.125+-d1.1.1", activation="gelu_erf")
        to_timm(plus, plus.build().state_dict())


def test_weights_of_another_shape_are_refused():
    sd = perturbed(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_VIT)).state_dict()
    with pytest.raises(UserError, match=r"do not fit vit-w32-d2-p8: cls_token has shape \(1, 1, 64\)"):
        from_timm(sd, get_config("vit-w32-d2-p8"))
    with pytest.raises(UserError, match=r"missing \['blocks.2"):
        from_timm(sd, get_config("vit-w64-d3-p8"))


def test_allow_gelu_mismatch_exports_a_tanh_nfnet_that_timm_computes_with_exact_gelu():
    cfg = get_config("nfnet-w0.125-d1.1.1", num_classes=10)
    model = perturbed(cfg.build())
    export = to_timm(cfg, model.state_dict(), allow_gelu_mismatch=True)
    tm = timm.create_model(export.model_name, num_classes=10, **export.kwargs)
    tm.load_state_dict(export.state_dict)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert 10 * TOL < rel_diff(logits(tm, x), logits(model, x)) < 1e-2  # the GELU forms' difference only


# ------------------------------------------------------------------------------------- files

class _Touch:
    """Unpickling this object would create ``path``: proof of whether a loader runs pickled code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_files_are_read_without_unpickling_code(tmp_path):
    sd = timm_nfnet().state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "train.pth.tar")  # a timm training checkpoint
    save_file(sd, tmp_path / "w.safetensors")
    for path in (tmp_path / "train.pth.tar", tmp_path / "w.safetensors"):
        assert config_from_timm(read_state_dict(path)).name == "nfnet-w0.125-d1.1.1"
    marker = tmp_path / "ran"
    torch.save({**sd, "payload": _Touch(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="pickled objects"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(UserError, match="no EMA weights"):
        read_state_dict(tmp_path / "train.pth.tar", ema=True)


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_convscale_never_imports_timm():
    code = ("import sys, convscale.models.timm_weights, convscale.train.export, convscale.cli.export; "
            "print(any(m.split('.')[0] == 'timm' for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


# ------------------------------------------------------------------------ finetune / train / export

COMMON = dict(checkpoint_every_seconds=0, threads=1, quiet=True, batch_size=8, steps=2,
              data=DataConfig(kind="procedural", resolution=16, num_classes=10, heldout_images=8))


def test_finetune_from_a_timm_file_starts_from_its_body(tmp_path, cli):
    tm = timm_nfnet()
    save_file(tm.state_dict(), tmp_path / "dm.safetensors")
    pre = find_pretrained(tmp_path / "dm.safetensors")
    assert (pre.source, pre.config["train"]["model"], pre.config["train"]["model_overrides"]) == (
        "timm", "nfnet-w0.125-d1.1.1", {"activation": "gelu_erf"})
    rc, out, err = cli(["finetune", "--from", tmp_path / "dm.safetensors", "--run-dir", tmp_path / "ft",
                        "--resolution", 16, "--print-config"])
    assert rc == 0, err
    printed = json.loads(out)
    assert printed["model"] == "nfnet-w0.125-d1.1.1" and printed["model_overrides"]["activation"] == "gelu_erf"
    # the body loaded as timm computes it, the head new and zero (so logits are 0)
    cfg = get_config(printed["model"], num_classes=3, **printed["model_overrides"])
    model = cfg.build()
    load_pretrained_weights(model, pre, cfg)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(model.eval().forward_features(x), tm.forward_head(tm.forward_features(x), pre_logits=True)) < TOL
        assert not model.classifier.weight.any()


def test_train_init_from_a_timm_vit_file(tmp_path, cli):
    tm = perturbed(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_VIT))
    save_file(tm.state_dict(), tmp_path / "vit.safetensors")
    rc, out, err = cli(["train", "--run-dir", tmp_path / "run", "--model", "vit-w64-d2-p8", "--steps", 1,
                        "--batch-size", 8, "--resolution", 16, "--num-classes", 10, "--threads", 1, "--quiet",
                        "--init-from", tmp_path / "vit.safetensors", "--set", "data.heldout_images=8"])
    assert rc == 0, err
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["init_from"]["timm_file"] == str((tmp_path / "vit.safetensors").resolve())
    rc, _, err = cli(["train", "--run-dir", tmp_path / "bad", "--model", "nfnet-w0.125-d1.1.1", "--steps", 1,
                      "--resolution", 16, "--init-from", tmp_path / "vit.safetensors"])
    assert rc == 2 and "timm vit" in err


@pytest.mark.parametrize("model, overrides", [("nfnet-w0.125-d1.1.1", {"activation": "gelu_erf"}),
                                              ("vit-w32-d2-p4", {})], ids=["nfnet", "vit"])
def test_export_loads_in_timm_with_the_same_logits(tmp_path, cli, model, overrides):
    cfg = TrainConfig().replace(run_dir=str(tmp_path / "run"), model=model, model_overrides=overrides, lr=0.05,
                      agc_exempt_scalar_gains=True, ema_decay=0.5, **COMMON)
    assert run(cfg)["status"] == "done"
    out = tmp_path / "out" / "w.safetensors"
    rc, printed, err = cli(["export", tmp_path / "run", "--timm", out, "--use-ema"])
    assert rc == 0, err
    call = printed.splitlines()[-1].strip()
    assert call.startswith("timm.create_model(") and "num_classes=10" in call
    tm = eval(call, {"timm": timm})  # the printed line, as a user would paste it
    step = find_pretrained(tmp_path / "run", use_ema=True)
    ours = get_config(model, num_classes=10, image_size=16, **overrides) if model.startswith("vit") else \
        get_config(model, num_classes=10, **overrides)
    mine = ours.build()
    mine.load_state_dict(load_file(step.weights_file))
    assert mine.classifier.weight.abs().sum() > 0  # trained: a dropped head would show
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert rel_diff(logits(tm, x), logits(mine, x)) < TOL
    rc, _, err = cli(["export", tmp_path / "run", "--timm", tmp_path / "w.pth"])
    assert rc == 2 and ".safetensors" in err
