"""Fine-tuning: init from a pre-trained run (body loaded, new zero head, ViT posemb resampled),
SAM against a hand-computed step, repeated augmentation, higher eval resolution, resume after a
kill, bad input, the CLI. Tiny models pre-trained for a few steps at 16 px, fine-tuned on digits."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from convscale.data.arrays import DigitsSource
from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.models import get_config
from convscale.models.base import train_flops_per_image
from convscale.models.vit_posemb import resample_pos_embed
from convscale.train.checkpoint import list_checkpoints
from convscale.train.config import TrainConfig
from convscale.train.evaluate import training_loss
from convscale.data.repeated import RepeatedAugmentSource
from convscale.train.finetune import (
    default_data,
    find_pretrained,
    finetune_config,
    load_pretrained_weights,
)
from convscale.train.loop import run
from convscale.train.metrics import read_metrics
from convscale.train.optim import build_optimizer
from convscale.train.sam import sam_ascend_, sam_epsilon, sam_restore_
from support import by_name

torch.set_num_threads(1)

COMMON = dict(checkpoint_every_seconds=0, threads=1, quiet=True, log_every_steps=5)


def _pretrain(root: Path, name: str, model: str, **kw) -> Path:
    cfg = TrainConfig().replace(run_dir=str(root / name), model=model, batch_size=32, steps=6,
                      data=DataConfig(kind="procedural", resolution=16, num_classes=10, heldout_images=32),
                      agc_exempt_scalar_gains=True, **COMMON, **kw)
    assert run(cfg)["status"] == "done"
    return Path(cfg.run_dir)


@pytest.fixture(scope="module")
def pre_nfnet(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("pre"), "nfnet", "nfnet-tiny", lr=0.2, ema_decay=0.9)


@pytest.fixture(scope="module")
def pre_vit(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("pre"), "vit", "vit-tiny", optimizer="adamw", lr=3e-3)


def _digits(resolution: int) -> DataConfig:
    return default_data("digits", None, resolution)


# ------------------------------------------------------------------------- init from a run


def test_nfnet_body_loaded_head_new(pre_nfnet):
    pre = find_pretrained(pre_nfnet)
    assert pre.step == 6 and pre.weights_file.name == "model.safetensors"
    saved = load_file(pre.weights_file)
    torch.manual_seed(123)
    model = get_config("nfnet-tiny", num_classes=10).build()
    loaded = load_pretrained_weights(model, pre)
    state = model.state_dict()
    assert "classifier.weight" not in loaded and len(loaded) == len(saved) - 2
    for k in loaded:
        assert torch.equal(state[k], saved[k]), k
    assert not torch.equal(saved["classifier.weight"], torch.zeros_like(saved["classifier.weight"]))
    assert torch.count_nonzero(model.classifier.weight) == 0 and torch.count_nonzero(model.classifier.bias) == 0
    ema = find_pretrained(pre_nfnet, use_ema=True)
    assert ema.weights_file.name == "ema.safetensors"
    load_pretrained_weights(model, ema)
    assert torch.equal(model.stem.conv0.weight, load_file(ema.weights_file)["stem.conv0.weight"])
    assert not torch.equal(model.stem.conv0.weight, saved["stem.conv0.weight"])  # EMA differs from raw


def test_vit_posemb_resampled_and_runs_at_higher_eval_resolution(pre_vit, tmp_path):
    pre = find_pretrained(pre_vit)
    saved = load_file(pre.weights_file)
    assert saved["pos_embed"].shape == (1, 1 + 4 * 4, 32)  # 16 px, patch 4
    model = get_config("vit-tiny", num_classes=10, image_size=32).build()
    load_pretrained_weights(model, pre)
    expected = resample_pos_embed(saved["pos_embed"], (8, 8), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=0)
    assert torch.equal(model.pos_embed.data[:, 0], saved["pos_embed"][:, 0])  # class token kept
    state = model.state_dict()
    for k in saved:
        if k not in ("pos_embed", "classifier.weight", "classifier.bias"):
            assert torch.equal(state[k], saved[k]), k
    assert torch.count_nonzero(model.classifier.weight) == 0
    # the whole fine-tune: train at 32 px, held-out at 48 px, adamw by default for ViTs
    cfg = finetune_config(pre_vit, str(tmp_path / "ft"), _digits(32), steps=8, batch_size=32, sam_rho=0.0,
                          eval_resolution=48, **COMMON)
    assert cfg.optim.optimizer == "adamw" and cfg.finetune.init_from == str(pre.run_dir)
    result = run(cfg)
    conf = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert conf["model"]["image_size"] == 32 and conf["init_from"]["step"] == 6
    mcfg = get_config("vit-tiny", num_classes=10, image_size=32)
    assert result["flops_per_image"] == train_flops_per_image(mcfg.forward_flops(32))  # train res, no SAM
    assert result["status"] == "done" and result["heldout_images"] == 359
    assert result["heldout_loss"] < math.log(10)  # learned something in 8 steps from a zero head


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_nfnet_finetune_on_digits_learns_and_reports(pre_nfnet, tmp_path):
    pre_result = json.loads((pre_nfnet / "result.json").read_text())
    cfg = finetune_config(pre_nfnet, str(tmp_path / "ft"), _digits(16), epochs=3, batch_size=32, sam_rho=0.0,
                          lr=0.1, overrides={"agc_clip": "0.1"}, **COMMON)
    assert cfg.optim.optimizer == "sgd_agc" and cfg.optim.agc_exempt_scalar_gains  # family default; inherited
    result = run(cfg)
    assert result["status"] == "done"
    assert result["heldout_top1"] > 0.3  # chance is 0.1; measured 0.47 after 3 epochs from a 6-step pre-train
    assert result["heldout_top5"] > result["heldout_top1"] and result["heldout_loss"] < math.log(10)
    steps = round(3 * 1438 / 32)  # 1797 digits, 20 % held out
    fpi = train_flops_per_image(get_config("nfnet-tiny", num_classes=10).forward_flops(16))
    assert result["steps"] == steps and result["finetune_flops"] == result["train_flops"] == steps * 32 * fpi
    assert result["pretrain_run_dir"] == str(pre_nfnet.resolve()) and result["pretrain_step"] == 6
    assert result["pretrain_train_flops"] == pre_result["train_flops"]
    conf = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert conf["init_from"]["run_dir"] == str(pre_nfnet.resolve()) and conf["train"]["finetune"]["init_from"]
    assert conf["num_classes"] == 10 and conf["train"]["finetune"]["eval_resolution"] is None


# ----------------------------------------------------------------------------------- SAM


def test_sam_rho_zero_is_a_plain_step():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(8, 5)
    w0 = [p.detach().clone() for p in model.parameters()]
    model(x).square().sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    perturbation = sam_ascend_(model, 0.0)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    model(x).square().sum().backward()
    sam_restore_(perturbation)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g0))
    eps = sam_epsilon([torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])], rho=0.5)
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.0]))  # 0.5 * g / 5
    torch.testing.assert_close(eps[1], torch.tensor([[0.4]]))


def _sam_cfg(tmp_path: Path, name: str, rho: float) -> TrainConfig:
    return TrainConfig().replace(run_dir=str(tmp_path / name), model="nfnet-tiny", data=DataConfig(kind="digits", resolution=16),
                       batch_size=16, steps=1, lr=0.3, precision="fp32", channels_last=False, sam_rho=rho,
                       weight_decay=1e-3, **COMMON)


def test_sam_step_equals_hand_computed(tmp_path):
    rho = 0.05
    result = run(_sam_cfg(tmp_path, "sam", rho))
    plain = run(_sam_cfg(tmp_path, "plain", 0.0))
    assert result["forward_backward_passes_per_step"] == 2 and result["train_flops"] == 2 * plain["train_flops"]
    # by hand: g at w, w + rho g/|g|, gradient there, back to w, the project's SGD+AGC on that gradient
    cfg = _sam_cfg(tmp_path, "hand", rho)
    images, labels = next(DigitsSource(cfg.data).train_batches(16))
    torch.manual_seed(cfg.seed)
    model = get_config("nfnet-tiny", num_classes=10).build()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(training_loss(model(images), labels, "softmax", 0.0), params)
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(rho * t / norm)
    g_sam = torch.autograd.grad(training_loss(model(images), labels, "softmax", 0.0), params)
    with torch.no_grad():
        for p, w, t in zip(params, w0, g_sam):
            p.copy_(w)
            p.grad = t.clone()
    build_optimizer(model, cfg.optim).step()  # lr = peak: one step, no warm-up
    got = load_file(list_checkpoints(tmp_path / "sam")[-1] / "model.safetensors")
    plain_w = load_file(list_checkpoints(tmp_path / "plain")[-1] / "model.safetensors")
    differs = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        differs += not torch.allclose(got[name], plain_w[name], rtol=1e-5, atol=1e-6)
    assert differs > 10  # the SAM step is not the plain one


# ------------------------------------------------------------------ repeated augmentation


def test_repeated_augmentation_batches():
    src = DigitsSource(DataConfig(kind="digits", resolution=16, heldout_fraction=0.2))
    rep = RepeatedAugmentSource(src, 4)
    for step in (0, 3, 200):  # 1438 training digits, 8 distinct a step: step 200 is in the 2nd pass
        plan = rep.train_plan(step, 32)
        refs = [s.ref for s in plan.samples]
        distinct = [s.ref for s in src.train_plan(step, 8).samples]
        assert len(refs) == 32 and len(set(refs)) == 8 and refs == distinct * 4
        assert len({s.seed for s in plan.samples}) == 32  # every copy its own augmentation
    images, labels = next(rep.train_batches(32, start_step=3))
    assert images.shape == (32, 3, 16, 16) and torch.equal(labels, labels[:8].repeat(4))
    assert not torch.equal(images[:8], images[8:16])  # same images, other crops
    # an epoch of steps (1438 / 32 ~ 45 steps of 32 slots) visits only 45 * 8 = 360 distinct images
    seen = {s.ref for k in range(45) for s in rep.train_plan(k, 32).samples}
    assert len(seen) == 45 * 8
    with pytest.raises(UserError, match="multiple of aug_repeats"):
        next(rep.train_batches(30))


class _KilledDigits(DigitsSource):
    """Digits whose training stream dies at one step, as if the process had been killed."""

    def __init__(self, cfg: DataConfig, fail_at_step: int):
        super().__init__(cfg)
        self.fail_at_step = fail_at_step

    def train_plan(self, step, batch_size):
        if step == self.fail_at_step:
            raise KeyboardInterrupt("simulated kill")
        return super().train_plan(step, batch_size)


def test_killed_finetune_resumes_identically(pre_nfnet, tmp_path):
    def cfg(name):  # SAM, repeated augmentation and dropout all on, so resume must restore all of them
        return finetune_config(pre_nfnet, str(tmp_path / name), _digits(16), steps=10, batch_size=16, aug_repeats=2,
                               dropout=0.2, checkpoint_every_steps=4, **{**COMMON, "log_every_steps": 2})

    full = run(cfg("full"))
    killed = cfg("killed")
    with pytest.raises(KeyboardInterrupt):
        run(killed, source=_KilledDigits(killed.data, fail_at_step=6))
    assert [p.name for p in list_checkpoints(killed.run_dir)] == ["step-00000004"]
    resumed = run(killed)
    for key in ("heldout_loss", "heldout_top1", "steps", "train_flops", "finetune_flops"):
        assert resumed[key] == full[key], key
    losses = [[r["loss"] for r in read_metrics(Path(c.run_dir) / "metrics.jsonl") if r["kind"] == "train"]
              for c in (cfg("full"), killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    assert full["forward_backward_passes_per_step"] == 2


# --------------------------------------------------------------------------- bad input, CLI


def test_bad_input_is_one_line_user_error(pre_nfnet, pre_vit, tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        find_pretrained(tmp_path)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((pre_nfnet / "config.json").read_text())
    with pytest.raises(UserError, match="has not finished"):
        find_pretrained(unfinished)
    (unfinished / "result.json").write_text((pre_nfnet / "result.json").read_text())
    with pytest.raises(UserError, match="no checkpoint"):
        find_pretrained(unfinished)
    with pytest.raises(UserError, match="no EMA weights"):
        find_pretrained(pre_vit, use_ema=True)
    with pytest.raises(UserError, match="not a multiple of patch_size 4"):
        run(finetune_config(pre_vit, str(tmp_path / "a"), _digits(18), steps=1, **COMMON))
    with pytest.raises(UserError, match="multiple of vit-tiny's patch size 4"):
        run(finetune_config(pre_vit, str(tmp_path / "b"), _digits(16), steps=1, eval_resolution=30, **COMMON))
    with pytest.raises(UserError, match="does not match the pre-trained run"):
        run(finetune_config(pre_vit, str(tmp_path / "c"), _digits(16), steps=1,
                            overrides={"model_overrides.width": "64"}, **COMMON))
    with pytest.raises(UserError, match="indexed data source"):
        run(TrainConfig().replace(run_dir=str(tmp_path / "d"), model="nfnet-tiny", steps=1, batch_size=8, aug_repeats=2,
                        data=DataConfig(resolution=16, num_classes=4, heldout_images=8), **COMMON))
    with pytest.raises(UserError, match="multiple of aug_repeats"):
        TrainConfig().replace(batch_size=10, aug_repeats=4, steps=1).validate()
    with pytest.raises(UserError, match="sam_rho"):
        TrainConfig().replace(sam_rho=-1, steps=1).validate()


def test_cli_finetune(pre_nfnet, tmp_path, capsys):
    from convscale.cli import finetune as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())

    def call(*argv):
        args = parser.parse_args(["finetune", *argv])
        return args.func(args)

    base = ["--from", str(pre_nfnet), "--data", "digits", "--threads", "1", "--quiet"]
    assert call("--run-dir", str(tmp_path / "p"), *base, "--resolution", "24", "--eval-resolution", "32",
                "--steps", "4", "--set", "steps=9", "--set", "agc_clip=0.1", "--dropout", "0.25",
                "--drop-path-rate", "0.1", "--aug-repeats", "4", "--print-config") == 0
    printed = by_name(json.loads(capsys.readouterr().out))
    assert printed["steps"] == 4 and printed["epochs"] is None and printed["agc_clip"] == 0.1
    assert printed["sam_rho"] == 0.05 and printed["optimizer"] == "sgd_agc" and printed["aug_repeats"] == 4
    assert printed["model_overrides"] == {"drop_rate": 0.25, "drop_path_rate": 0.1}
    assert printed["data"]["resolution"] == 24 and printed["eval_resolution"] == 32
    assert printed["data"]["heldout_fraction"] == 0.2 and printed["init_from"] == str(pre_nfnet.resolve())
    assert call("--run-dir", str(tmp_path / "r"), *base, "--steps", "3", "--batch-size", "16") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["pretrain_step"] == 6 and result["forward_backward_passes_per_step"] == 2
    with pytest.raises(UserError, match="not a run directory"):
        call("--run-dir", str(tmp_path / "x"), "--from", str(tmp_path), "--steps", "1")


def test_cli_finetune_recipe(pre_nfnet, tmp_path, capsys):
    from convscale.cli import finetune as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())

    def printed(*argv):
        args = parser.parse_args(["finetune", "--from", str(pre_nfnet), "--run-dir", str(tmp_path / "p"),
                                  "--print-config", *argv])
        assert args.func(args) == 0
        return by_name(json.loads(capsys.readouterr().out))

    paper = printed("--recipe", "paper")  # Smith et al. 2023, §3: 50 epochs, SAM, 384 px, held-out 480 px
    assert paper["data"]["resolution"] == 384 and paper["eval_resolution"] == 480
    assert paper["epochs"] == 50 and paper["sam_rho"] == 0.05 and paper["batch_size"] == 2048
    assert paper["optimizer"] == "sgd_agc" and paper["classifier_lr_scale"] == 1.0
    # lowest first: defaults < recipe < --set < flags
    mine = printed("--recipe", "paper", "--resolution", "24", "--set", "lr=0.02", "--steps", "5")
    assert mine["data"]["resolution"] == 24 and mine["eval_resolution"] == 480 and mine["lr"] == 0.02
    assert mine["steps"] == 5 and mine["epochs"] is None
    with pytest.raises(UserError, match="unknown fine-tuning recipe 'papr'; choose one of paper"):
        printed("--recipe", "papr")
