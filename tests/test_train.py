"""The training engine: budgets, schedule, SGD+AGC against a per-tensor reference, accumulation,
resume in-process, divergence, run-directory rules. Tiny models at 16 px, a few steps each."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from convscale.data.config import WHOLE, DataConfig, part_bounds
from convscale.errors import UserError
from convscale.models import get_config
from convscale.train.checkpoint import list_checkpoints, save_checkpoint
from convscale.train.config import (
    IMAGENET_TRAIN_IMAGES,
    TrainConfig,
    apply_overrides,
    budget_to_steps,
    build_schedule,
    cooldown_start_step,
    resolve_warmup_steps,
)
from convscale.train.evaluate import evaluate
from convscale.train.loop import EXIT_DIVERGED, run
from convscale.train.trainee import update_ema
from support import by_name
from convscale.train.metrics import read_metrics
from convscale.train.optim import SGDAGC, adaptive_grad_clip_, parameter_groups
from convscale.train.schedules import lr_at

torch.set_num_threads(1)


class TinySource:
    """A deterministic, learnable toy DataSource: class c = noise + a fixed random pattern."""

    def __init__(self, num_classes: int = 4, resolution: int = 16, seed: int = 0, heldout_images: int = 48,
                 fail_at_step: int | None = None):
        self.num_classes = num_classes
        self.num_train_images = None
        self.skipped_images = 0
        self.resolution = resolution
        self.seed = seed
        self.heldout_images = heldout_images
        self.fail_at_step = fail_at_step  # raise here, as if the process had been killed
        g = torch.Generator().manual_seed(seed + 12345)
        self.patterns = 2.0 * torch.randn(num_classes, 3, resolution, resolution, generator=g)

    def _batch(self, n: int, key: int):
        g = torch.Generator().manual_seed(key)
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        images = torch.randn(n, 3, self.resolution, self.resolution, generator=g) + self.patterns[labels]
        return images, labels

    # float images only: uint8=True is a request the contract lets a float source ignore
    def train_batches(self, batch_size: int, start_step: int = 0, part=WHOLE, uint8=False, pin_memory=False):
        k = start_step
        lo, hi = part_bounds(batch_size, part)
        while True:
            if self.fail_at_step is not None and k == self.fail_at_step:
                raise KeyboardInterrupt("simulated kill")
            x, y = self._batch(batch_size, 1_000_003 * self.seed + k)
            yield x[lo:hi], y[lo:hi]
            k += 1

    def heldout_batches(self, batch_size: int, part=WHOLE, uint8=False, pin_memory=False):
        images, labels = self._batch(self.heldout_images, -1)  # one fixed set, whatever the batch size
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            lo, hi = part_bounds(len(y), part)
            yield x[lo:hi], y[lo:hi]


def tiny_cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), model="nfnet-tiny", data=DataConfig(resolution=16, num_classes=4),
                batch_size=16, steps=12, lr=0.2, agc_exempt_scalar_gains=True, log_every_steps=2,
                checkpoint_every_seconds=0, threads=1, quiet=True)
    base.update(kw)
    return TrainConfig().replace(**base)


# ---------------------------------------------------------------------------------- config


def test_budget_to_steps_every_kind():
    fpi = 3 * 1_000_000.0  # training FLOPs per image
    cfg = TrainConfig(batch_size=100)
    assert budget_to_steps(cfg.replace(steps=7), fpi) == 7
    assert budget_to_steps(cfg.replace(images=1049), fpi) == 10  # 10.49 steps -> 10
    assert budget_to_steps(cfg.replace(images=1050), fpi) == 11  # 10.5 rounds half up
    assert budget_to_steps(cfg.replace(train_flops=3e6 * 2000), fpi) == 20
    # unlimited stream: an epoch is epoch_images (ImageNet-1k's 1,281,167 by default)
    assert budget_to_steps(cfg.replace(epochs=0.25), fpi) == round(0.25 * IMAGENET_TRAIN_IMAGES / 100) == 3203
    assert budget_to_steps(cfg.replace(epochs=0.5, epoch_images=10_000), fpi) == 50
    # real data: an epoch is the data's own size
    assert budget_to_steps(cfg.replace(epochs=2.0), fpi, num_train_images=1797) == 36
    with pytest.raises(UserError, match="less than one step"):
        budget_to_steps(cfg.replace(images=49), fpi)
    with pytest.raises(UserError, match="exactly one budget"):
        cfg.replace(steps=3, epochs=1.0).validate()
    with pytest.raises(UserError, match="exactly one budget"):
        cfg.validate()


def test_config_json_round_trip_and_overrides():
    cfg = TrainConfig().replace(model="vit-tiny", model_overrides={"depth": 2}, data=DataConfig(resolution=16, kind="digits"),
                      epochs=0.5, ema_decay=0.99)
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg and isinstance(again.data, DataConfig)
    out = apply_overrides(cfg, {"data.resolution": "24", "lr": "0.4", "warmup_steps": "none", "steps": "5",
                                "epochs": "null", "compile": "true", "model_overrides.width": "48"})
    assert out.data.resolution == 24 and out.data.kind == "digits"
    assert out.optim.lr == 0.4 and out.optim.warmup_steps is None and out.steps == 5 and out.epochs is None
    assert out.compile is True and out.model_overrides == {"depth": 2, "width": 48}
    with pytest.raises(UserError, match="unknown field 'nope'"):
        apply_overrides(cfg, {"nope": "1"})
    with pytest.raises(UserError, match="unknown data field"):
        apply_overrides(cfg, {"data.nope": "1"})
    with pytest.raises(UserError, match="not a valid int"):
        apply_overrides(cfg, {"batch_size": "12.5"})
    with pytest.raises(UserError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"lrr": 1.0})


def test_schedule_exact_values():
    # 10 steps, 2 warm-up: 0.5, 1.0, then cosine from the peak over 8 steps
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    for s in range(2, 10):
        assert lrs[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 2) / 8)), abs=1e-15)
    assert lrs[6] == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(10, 10, 2, 1.0) == pytest.approx(0.0)  # the curve ends at 0
    assert lr_at(0, 4, 0, 0.3) == 0.3  # no warm-up: first step at the peak
    cfg = TrainConfig(steps=100)
    assert resolve_warmup_steps(cfg, 100) == 5  # default 5 %
    assert resolve_warmup_steps(cfg.replace(warmup_steps=7), 100) == 7


# ------------------------------------------------------------------------------- optimizer


def reference_sgd_agc_step(named_params, grads, bufs, lr, mu, wd, clip, eps, no_clip, no_decay):
    """The DM reference rule written plainly, one tensor at a time."""
    for (name, p), g in zip(named_params, grads):
        g = g.clone()
        if name not in no_clip:
            if p.ndim >= 2:
                dims = tuple(range(1, p.ndim))
                p_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=True)
                g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            else:
                p_norm, g_norm = p.norm(), g.norm()
            max_norm = p_norm.clamp_min(eps) * clip
            clipped = g * (max_norm / g_norm.clamp_min(1e-6))
            g = torch.where(g_norm > max_norm, clipped, g)
        if name not in no_decay:
            g = g + wd * p
        bufs[name] = mu * bufs.get(name, torch.zeros_like(p)) + g
        g = g + mu * bufs[name]
        p.data -= lr * g


def test_sgd_agc_matches_per_tensor_reference():
    torch.manual_seed(0)
    cfg = get_config("nfnet-tiny", num_classes=5)
    model = cfg.build()
    ref = cfg.build()
    ref.load_state_dict(model.state_dict())
    groups = parameter_groups(model, weight_decay=1e-2, agc=True, agc_exempt_scalar_gains=False)
    opt = SGDAGC(groups, lr=0.3, momentum=0.9, agc_clip=0.01, agc_eps=1e-3)
    names = [n for n, _ in model.named_parameters()]
    no_decay = {n for n in names if n.endswith(("bias", "gain"))}
    bufs: dict = {}
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 5, (8,))
    clipped_somewhere = False
    for _ in range(4):
        model.zero_grad(set_to_none=False)  # grads kept in place: SGDAGC's cached unit views are used
        ref.zero_grad()
        for m in (model, ref):
            nn.functional.cross_entropy(m(x), y).backward()
        grads = [p.grad.clone() for p in ref.parameters()]
        opt.step()
        reference_sgd_agc_step(list(ref.named_parameters()), grads, bufs, 0.3, 0.9, 1e-2, 0.01, 1e-3,
                               {"classifier.weight"}, no_decay)
        clipped_somewhere |= any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert clipped_somewhere  # AGC really acted on this model


def test_agc_unit_rule_numbers():
    # conv weight, 2 output units: unit 0 clipped to 0.01 * |W_0|, unit 1 (small grad) unchanged
    w = torch.zeros(2, 1, 1, 2)
    w[0, 0, 0] = torch.tensor([3.0, 4.0])  # |W_0| = 5
    w[1, 0, 0] = torch.tensor([0.0, 1.0])  # |W_1| = 1
    g = torch.zeros_like(w)
    g[0, 0, 0] = torch.tensor([6.0, 8.0])  # |G_0| = 10 > 0.05 -> scaled to norm 0.05
    g[1, 0, 0] = torch.tensor([0.001, 0.0])  # 0.001 < 0.01 -> kept
    s = torch.tensor(0.0)  # zero scalar (a SkipInit gain): |W| floored at eps = 1e-3
    gs = torch.tensor(2.0)
    grads = [g, gs]
    adaptive_grad_clip_([w, s], grads, clip=0.01, eps=1e-3)
    assert g[0].norm().item() == pytest.approx(0.05)
    torch.testing.assert_close(g[0, 0, 0], torch.tensor([0.03, 0.04]))
    torch.testing.assert_close(g[1, 0, 0], torch.tensor([0.001, 0.0]))
    assert gs.item() == pytest.approx(1e-5)  # 0.01 * 1e-3: why short runs exempt scalar gains


def test_parameter_groups_by_name():
    nf = get_config("nfnet-tiny", num_classes=5).build()
    groups = parameter_groups(nf, 1e-5, agc=True, agc_exempt_scalar_gains=True, classifier_lr_scale=0.25)
    where = {n: g for g in groups for n in g["names"]}
    assert where["classifier.weight"]["agc"] is False and where["classifier.weight"]["lr_scale"] == 0.25
    assert where["classifier.bias"]["agc"] is True and where["classifier.bias"]["weight_decay"] == 0.0
    assert where["stages.0.0.skip_gain"]["agc"] is False  # exempt scalar gain
    assert where["stem.conv0.gain"]["agc"] is True  # a per-channel gain (1 channel here) is not scalar
    assert where["stages.0.0.conv1.weight"]["weight_decay"] == 1e-5
    assert where["stages.0.0.conv1.gain"]["weight_decay"] == 0.0
    assert where["stages.0.0.se.fc0.weight"]["agc"] is True
    clipped = {n: g for g in parameter_groups(nf, 1e-5, agc=True, agc_exempt_scalar_gains=True,
                                              classifier_lr_scale=0.25, clip_classifier=True) for n in g["names"]}
    assert clipped["classifier.weight"]["agc"] is True and clipped["classifier.weight"]["lr_scale"] == 0.25
    assert clipped["stages.0.0.skip_gain"]["agc"] is False  # still exempt
    # the run's config reaches the optimizer (TrainConfig field -> build_optimizer -> the group's agc)
    from convscale.train.config import OptimConfig
    from convscale.train.optim import build_optimizer

    for flag in (False, True):
        opt = build_optimizer(nf, OptimConfig(agc_exempt_scalar_gains=True, agc_clip_classifier=flag))
        agc_of = {n: g["agc"] for g in opt.param_groups for n in g["names"]}
        assert agc_of["classifier.weight"] is flag and agc_of["stages.0.0.skip_gain"] is False
    ref = parameter_groups(nf, 1e-5, agc=True, agc_exempt_scalar_gains=False)
    assert {n: g for g in ref for n in g["names"]}["stages.0.0.skip_gain"]["agc"] is True
    vit = get_config("vit-tiny", num_classes=5).build()
    vg = {n: g for g in parameter_groups(vit, 0.1, agc=False, agc_exempt_scalar_gains=False) for n in g["names"]}
    for n in ("cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert vg[n]["weight_decay"] == 0.0, n
    for n in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.weight", "classifier.weight"):
        assert vg[n]["weight_decay"] == 0.1, n


def test_ema_warmup_rule():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
    update_ema(a, b, decay=0.999, step=0)  # d = min(0.999, 1/10) = 0.1
    torch.testing.assert_close(a.weight, torch.full((1, 2), 0.9))


def test_evaluate_top1_top5():
    class Fixed(nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :6].float()  # logits are the first row of channel 0

    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [1, 5, 4, 3, 2, 0], [0, 1, 2, 3, 4, 5]])
    images = torch.zeros(3, 3, 6, 6)
    images[:, 0, 0, :] = logits
    labels = torch.tensor([0, 0, 0])  # hit top-1, top-5 only, miss
    out = evaluate(Fixed(), [(images, labels)], torch.device("cpu"))
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(2 / 3)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())


# ---------------------------------------------------------------------------------- the loop


def test_run_writes_run_dir_and_learns(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=20, eval_every_steps=10, ema_decay=0.9)
    result = run(cfg, source=TinySource())
    rd = Path(cfg.run_dir)
    conf = json.loads((rd / "config.json").read_text())
    assert conf["steps"] == 20 and conf["train"]["model"] == "nfnet-tiny" and conf["model"]["family"] == "nfnet"
    assert conf["flops_per_image"] == 3 * get_config("nfnet-tiny", num_classes=4).forward_flops(16)
    assert result["status"] == "done" and result["steps"] == 20 and result["images_seen"] == 320
    assert result["train_flops"] == 320 * conf["flops_per_image"]
    assert result["heldout_loss"] < math.log(4) - 0.2  # it learned something
    assert result["chance_loss"] == pytest.approx(math.log(4))  # what learning nothing would score
    assert "ema_heldout_loss" in result
    rows = read_metrics(rd / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(2, 21, 2))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [10, 20]
    assert train_rows[-1]["lr"] == pytest.approx(lr_at(19, 20, 1, 0.2))
    assert json.loads((rd / "result.json").read_text()) == result
    assert len(list_checkpoints(rd)) == 1
    # re-running a finished run reports its result; a different config is refused
    assert run(cfg, source=TinySource()) == result
    with pytest.raises(UserError, match="--restart"):
        run(cfg.replace(lr=0.1), source=TinySource())
    assert run(cfg.replace(quiet=False, checkpoint_every_steps=3), source=TinySource()) == result


def test_heldout_metrics_are_measured_at_eval_resolution(tmp_path):
    from safetensors.torch import load_file

    from convscale.data import build_source

    data = DataConfig(kind="procedural", resolution=16, num_classes=4, heldout_images=32)
    cfg = tiny_cfg(tmp_path, data=data, steps=3, precision="fp32", eval_resolution=32, channels_last=False)
    result = run(cfg)
    assert result["heldout_resolution"] == 32 and result["status"] == "done"
    conf = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    assert conf["flops_per_image"] == 3 * get_config("nfnet-tiny", num_classes=4).forward_flops(16)  # train px
    model = get_config("nfnet-tiny", num_classes=4).build()
    model.load_state_dict(load_file(list_checkpoints(Path(cfg.run_dir))[-1] / "model.safetensors"))

    def loss_at(px: int) -> float:
        batches = build_source(data.replace(resolution=px)).heldout_batches(16)
        return evaluate(model, batches, torch.device("cpu"))["loss"]

    assert result["heldout_loss"] == pytest.approx(loss_at(32), abs=1e-6)
    assert abs(result["heldout_loss"] - loss_at(16)) > 1e-4  # not the training resolution's
    assert run(tiny_cfg(tmp_path, "plain", data=data, steps=1))["heldout_resolution"] == 16


def test_interrupted_run_resumes_bit_identical(tmp_path):
    full = run(tiny_cfg(tmp_path, "full", checkpoint_every_steps=4), source=TinySource())
    cfg = tiny_cfg(tmp_path, "killed", checkpoint_every_steps=4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, source=TinySource(fail_at_step=9))  # dies after the step-8 checkpoint
    rd = Path(cfg.run_dir)
    assert [p.name for p in list_checkpoints(rd)] == ["step-00000008"]
    # leftovers of a write killed midway: a temporary checkpoint dir and a torn metrics line
    (rd / "checkpoints" / ".tmp-junk").mkdir()
    with open(rd / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 10, "lo')
    resumed = run(cfg, source=TinySource())
    for key in ("heldout_loss", "heldout_top1", "heldout_top5", "steps", "images_seen", "train_flops"):
        assert resumed[key] == full[key], key
    steps = [r["step"] for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(2, 13, 2))
    full_losses = [r["loss"] for r in read_metrics(Path(tmp_path / "full" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["loss"] for r in read_metrics(rd / "metrics.jsonl") if r["kind"] == "train"] == full_losses
    assert not (rd / "checkpoints" / ".tmp-junk").exists()


@pytest.mark.parametrize("schedule, options", [
    ("cosine", {}), ("linear", {}), ("rsqrt", {"timescale_steps": 3, "cooldown_fraction": 0.25}),
    ("wsd", {"cooldown_fraction": 0.5, "cooldown_shape": "linear"}),
])
def test_each_schedule_trains_with_its_own_lrs(tmp_path, schedule, options):
    cfg = tiny_cfg(tmp_path, steps=8, warmup_steps=2, schedule=schedule, schedule_options=options)
    result = run(cfg, source=TinySource())
    assert result["status"] == "done" and result["steps"] == 8
    expected = build_schedule(cfg, 8)
    rows = [r for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["lr"] for r in rows] == [expected.lr(r["step"] - 1) for r in rows]  # each row: its last step's lr
    conf = json.loads((Path(cfg.run_dir) / "config.json").read_text())
    assert conf["train"]["optim"]["schedule"] == schedule and conf["train"]["optim"]["schedule_options"] == options
    assert conf.get("cooldown_start_step") == expected.cooldown_start_step


def test_wsd_run_killed_mid_cooldown_resumes_bit_identical(tmp_path):
    # 12 steps, 50 % cooldown from step 6; killed at step 9, after the step-8 checkpoint
    wsd = dict(schedule="wsd", schedule_options={"cooldown_fraction": 0.5}, checkpoint_every_steps=4)
    full = run(tiny_cfg(tmp_path, "full", **wsd), source=TinySource())
    cfg = tiny_cfg(tmp_path, "killed", **wsd)
    assert cooldown_start_step(cfg, 12) == 6
    with pytest.raises(KeyboardInterrupt):
        run(cfg, source=TinySource(fail_at_step=9))
    resumed = run(cfg, source=TinySource())
    for key in ("heldout_loss", "heldout_top1", "heldout_top5", "steps", "train_flops"):
        assert resumed[key] == full[key], key
    rows = {name: [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
                   if r["kind"] == "train"] for name in ("full", "killed")}
    assert rows["killed"] == rows["full"]


def test_a_run_dir_of_an_older_version_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=6, checkpoint_every_steps=4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, source=TinySource(fail_at_step=5))
    path = Path(cfg.run_dir) / "config.json"
    conf = json.loads(path.read_text())
    # as versions before the groups and the schedules wrote it: flat, no schedule fields
    conf["train"] = {k: v for k, v in by_name(conf["train"]).items()
                     if k not in ("optim", "finetune", "runtime", "schedule", "schedule_options")}
    assert "lr" in conf["train"] and "quiet" in conf["train"]
    path.write_text(json.dumps(conf))
    # not refused as "a different config"; runtime-only fields may still differ
    assert run(cfg.replace(threads=2), source=TinySource())["steps"] == 6
    with pytest.raises(UserError, match="differs in train.optim.schedule"):
        run(cfg.replace(schedule="linear"), source=TinySource())


#: config.json "train" of a run before TrainConfig had groups (written by convscale 25a20a4)
OLD_FLAT_TRAIN = {
    "activation_checkpointing": False, "agc_clip": 0.01, "agc_eps": 0.001, "agc_exempt_scalar_gains": True,
    "aug_repeats": 1, "batch_size": 16, "beta2": 0.999, "channels_last": None, "checkpoint_every_seconds": 0,
    "checkpoint_every_steps": 0, "classifier_lr_scale": 1.0, "compile": False,
    "data": {"device": "cpu", "heldout_fraction": 0.01, "heldout_images": 2048, "heldout_path": None,
             "kind": "procedural", "num_classes": 4, "path": None, "resolution": 16, "seed": 0, "strict": False,
             "workers": -1},
    "divergence_loss_factor": 3.0, "ema_decay": 0.9, "epoch_images": 1281167, "epochs": None, "eval_batch_size": 0,
    "eval_every_steps": 0, "eval_resolution": 24, "grad_accum_steps": 1, "grad_clip_norm": 1.0, "images": None,
    "init_from": None, "init_from_ema": False, "label_smoothing": 0.0, "log_every_steps": 2, "loss": "softmax",
    "lr": 0.2, "model": "nfnet-tiny", "model_overrides": {}, "momentum": 0.9, "optimizer": "sgd_agc",
    "parallel": "ddp", "precision": "fp32", "quiet": True, "run_dir": "runs/r", "sam_rho": 0.05, "seed": 0,
    "steps": 12, "threads": 1, "train_flops": None, "warmup_fraction": 0.05, "warmup_steps": None,
    "weight_decay": 2e-05,
}


def test_an_old_flat_config_is_read_into_the_groups():
    cfg = TrainConfig.from_dict(OLD_FLAT_TRAIN)
    assert (cfg.optim.lr, cfg.optim.ema_decay, cfg.optim.agc_exempt_scalar_gains) == (0.2, 0.9, True)
    assert (cfg.finetune.sam_rho, cfg.finetune.eval_resolution) == (0.05, 24)
    assert (cfg.runtime.quiet, cfg.runtime.threads, cfg.runtime.checkpoint_every_seconds) == (True, 1, 0)
    assert (cfg.steps, cfg.batch_size, cfg.data.num_classes, cfg.precision) == (12, 16, 4, "fp32")
    assert cfg.optim.schedule == "cosine"  # added since: its default is what that run used
    nested = cfg.to_dict()
    assert nested["optim"]["lr"] == 0.2 and "lr" not in nested and TrainConfig.from_dict(nested) == cfg
    assert by_name(nested) | OLD_FLAT_TRAIN == by_name(nested)  # every old field kept its value
    with pytest.raises(UserError, match=r"unknown TrainConfig field\(s\) \['lrr'\]"):
        TrainConfig.from_dict({**OLD_FLAT_TRAIN, "lrr": 0.1})
    with pytest.raises(UserError, match="unknown TrainConfig.optim field"):
        TrainConfig.from_dict({"optim": {"quiet": True}})


def test_overrides_take_flat_legacy_names_and_dotted_group_names():
    cfg = TrainConfig(steps=3)
    a = apply_overrides(cfg, {"lr": "0.3", "quiet": "true", "sam_rho": "0.1"})
    b = apply_overrides(cfg, {"optim.lr": "0.3", "runtime.quiet": "true", "finetune.sam_rho": "0.1"})
    c = apply_overrides(cfg, {"optim": {"lr": 0.3}, "runtime": {"quiet": True}, "finetune": {"sam_rho": 0.1}})
    assert a == b == c == cfg.replace(lr=0.3, quiet=True, sam_rho=0.1)
    assert (a.optim.lr, a.runtime.quiet, a.finetune.sam_rho) == (0.3, True, 0.1)
    assert apply_overrides(cfg, {"optim.schedule_options.cooldown_fraction": "0.5"}).optim.schedule_options == {
        "cooldown_fraction": 0.5}
    with pytest.raises(UserError, match="unknown field 'optim.nope'|unknown field 'nope'"):
        apply_overrides(cfg, {"optim.nope": "1"})
    with pytest.raises(UserError, match="must be a table of optim fields"):
        apply_overrides(cfg, {"optim": "7"})


def test_grad_accumulation_equals_big_batch_fp32(tmp_path):
    common = dict(precision="fp32", steps=3, batch_size=16, weight_decay=1e-3, log_every_steps=1)
    big = run(tiny_cfg(tmp_path, "big", **common), source=TinySource())
    acc = run(tiny_cfg(tmp_path, "acc", grad_accum_steps=4, **common), source=TinySource())
    assert acc["heldout_loss"] == pytest.approx(big["heldout_loss"], rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(list_checkpoints(tmp_path / "acc")[-1] / "model.safetensors")
    wb = load_file(list_checkpoints(tmp_path / "big")[-1] / "model.safetensors")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_adamw_vit_sigmoid_label_smoothing(tmp_path):
    cfg = tiny_cfg(tmp_path, model="vit-tiny", optimizer="adamw", lr=3e-3, weight_decay=0.05, loss="sigmoid",
                   label_smoothing=0.1, steps=10)
    result = run(cfg, source=TinySource())
    assert result["status"] == "done" and result["heldout_loss"] < math.log(4)
    assert result["heldout_sigmoid_loss"] > 0  # the training objective is reported too


def test_divergence_stops_with_its_status(tmp_path):
    cfg = tiny_cfg(tmp_path, lr=1e5, steps=40, agc_clip=0.0, weight_decay=0.0)
    result = run(cfg, source=TinySource())
    assert result["status"] == "diverged" and result["steps"] <= 10 and result["heldout_loss"] is None
    assert json.loads((Path(cfg.run_dir) / "result.json").read_text())["status"] == "diverged"
    assert EXIT_DIVERGED == 3


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown model"):
        run(tiny_cfg(tmp_path, model="convnet-xyz"), source=TinySource())
    with pytest.raises(UserError, match="less than one step"):
        run(tiny_cfg(tmp_path, steps=None, images=4), source=TinySource())
    with pytest.raises(UserError, match="grad_accum_steps"):
        run(tiny_cfg(tmp_path, grad_accum_steps=3), source=TinySource())


def test_checkpoint_keeps_only_newest(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model, opt, {"first_loss": 1.0})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_cli_train_exit_codes(tmp_path, capsys):
    from convscale.cli.main import main

    common = ["--model", "nfnet-tiny", "--data", "digits", "--resolution", "16", "--batch-size", "32",
              "--threads", "1", "--quiet"]
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--steps", "3", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "done" and result["steps"] == 3
    assert main(["train", "--run-dir", str(tmp_path / "a"), "--steps", "4", *common]) == 2
    assert main(["train", "--run-dir", str(tmp_path / "b"), "--steps", "30", "--lr", "1e5",
                 "--set", "agc_clip=0", "--set", "log_every_steps=2", *common]) == EXIT_DIVERGED
    assert main(["train", "--run-dir", str(tmp_path / "c"), "--steps", "3", "--set", "data.nope=1", *common]) == 2
    capsys.readouterr()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"lr": 0.05, "epochs": 1.0, "data": {"resolution": 24}}))
    assert main(["train", "--run-dir", str(tmp_path / "d"), "--config", str(cfg_file), "--steps", "2",
                 "--print-config", "--set", "seed=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.05 and printed["steps"] == 2 and printed["epochs"] is None
    assert printed["data"]["resolution"] == 24 and printed["seed"] == 3


def test_sgd_agc_equals_torch_sgd_after_per_tensor_agc_in_float64():
    """SGDAGC against benchmarks/agc_step.py's reference (one vector_norm AGC per tensor, then
    torch.optim.SGD(foreach, nesterov)) on nfnet-tiny in float64: 3 steps, clipping acting."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("agc_step", Path(__file__).parents[1] / "benchmarks" / "agc_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(lr=0.1, weight_decay=2e-5, agc_clip=0.01, exempt_scalar_gains=False)
    torch.manual_seed(0)
    model = get_config("nfnet-tiny", num_classes=10).build()
    assert bench.max_difference(args, model) < 1e-12
    # the case exercises the clip: some tensors' gradients are clipped, others are not
    base = copy.deepcopy(model).double()
    bench.set_grads(base, seed=100)
    grads = [p.grad.clone() for p in base.parameters()]
    bench.reference_agc_(list(base.parameters()), [p.grad for p in base.parameters()], 0.01, 1e-3)
    clipped = sum(not torch.equal(g, p.grad) for g, p in zip(grads, base.parameters()))
    assert 0 < clipped < len(grads)


def test_channels_last_keeps_1x1_weights_in_the_layout_of_their_gradients():
    from convscale.train.trainee import to_channels_last

    model = to_channels_last(get_config("nfnet-tiny", num_classes=5).build())
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    convs = [(n, p) for n, p in model.named_parameters() if p.dim() == 4]
    assert any(p.shape[2:] == (1, 1) for _, p in convs) and any(p.shape[2:] != (1, 1) for _, p in convs)
    for n, p in convs:
        if p.shape[2:] == (1, 1):
            assert p.stride() == p.grad.stride() == p.contiguous().stride(), n  # DDP's bucket views match
        else:
            assert p.is_contiguous(memory_format=torch.channels_last), n


def test_list_fields_take_comma_lists_with_spaces_and_json():
    from convscale.train.config import apply_overrides

    cfg = apply_overrides(TrainConfig(), {"log": "tensorboard, wandb", "keep_checkpoint_steps": "16, 32"})
    assert cfg.runtime.log == ["tensorboard", "wandb"] and cfg.keep_checkpoint_steps == [16, 32]
    assert apply_overrides(TrainConfig(), {"keep_checkpoint_steps": "[8, 24]"}).keep_checkpoint_steps == [8, 24]
    with pytest.raises(UserError, match="is not a valid int"):
        apply_overrides(TrainConfig(), {"keep_checkpoint_steps": "16, x"})
