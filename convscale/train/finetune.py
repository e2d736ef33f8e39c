"""Fine-tuning: a pre-trained run's final weights, a new classifier, the same training loop.

A fine-tune is an ordinary run (``TrainConfig`` + ``run()``) with ``init_from`` set to a finished
pre-training run directory, or to a timm checkpoint file (``dm_nfnet_f*`` / ``vit_*``, read without
pickle and mapped by models/timm_weights.py; the model is the one the file holds). ``run()`` then
builds the model for the downstream classes and calls ``load_pretrained_weights``: every body
tensor comes from the pre-trained run's final checkpoint (its EMA weights with ``init_from_ema``);
ViT learned position embeddings are resampled (bicubic, class token kept) to the fine-tuning grid;
NFNets need nothing, being fully convolutional.
The classifier is always new and ZERO-initialised (weight and bias, both families), as in
big_vision's transfer recipe: initial logits are 0 and the first updates move only the head.

The paper's fine-tuning recipe (Smith et al. 2023, §3) maps onto TrainConfig fields: SAM (``sam_rho``,
sam.py), stochastic depth and dropout (model overrides), a higher train resolution
(``data.resolution``) and a still higher held-out one (``eval_resolution``), and repeated
augmentation (``aug_repeats``, ``convscale.data.repeated.RepeatedAugmentSource``).

Dropout and stochastic depth are a phase's recipe, not the architecture (no weight depends on
them), so a fine-tune does not inherit the pre-training run's rates: it gets the model's own
(an NFNet-F variant's published dropout, 0.2 for F0 ... 0.5 for F7, and stochastic depth 0.25; a
ViT's or a scaled-down model's config defaults, 0) unless given. A pre-training study that turned
them off (the paper preset) thus fine-tunes with them on, as the paper does.

    from convscale.train.finetune import finetune_config
    from convscale.train import run
    cfg = finetune_config("runs/pre", "runs/ft", DataConfig(kind="digits", resolution=32,
                          heldout_fraction=0.2), epochs=10)
    result = run(cfg)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.models import ModelConfig, config_to_dict, family_traits, nfnet
from convscale.models.timm_weights import config_from_timm, from_timm, model_spec, read_state_dict
from convscale.train.checkpoint import list_checkpoints, verify_checkpoint_file
from convscale.train.config import BUDGET_FIELDS, TrainConfig, apply_overrides
from convscale.train.rundir import read_run_config, read_run_json

CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")

#: Per-family fine-tuning defaults are the family's ``traits.finetune_defaults`` (models/): optimizer
#: and peak lr (CPU-scale runs on digits), weight decay as in the NFNet fine-tuning recipe
#: (Smith et al. 2023, §3). NFNet features are not normalised: a demo-pretrained nfnet-w0.125-d1.1.1 gives
#: digits features of norm ~57, and with the new head zero-initialised, lr 0.1 (even 0.005 at the
#: start of warm-up) diverged within 10 steps; so the head runs at 0.05x the body's lr, with a long
#: warm-up (the reference fine-tune warms up for a third of its steps, Smith et al. 2023, §3). Measured on
#: digits at 32 px, 8 epochs, batch 32 (top-1): NFNet body lr 0.01 / 0.02 / 0.05 -> 0.38 / 0.49 /
#: 0.81 with SAM, 0.88 (0.02) / 0.94 (0.05) without (nfnet-w0.125-d1.1.1 pre-trained 1.6e12 FLOPs);
#: ViT AdamW lr 1e-3 / 3e-3 -> 0.62 / 0.74 (vit-w12-d4-p4 pre-trained 1.6e12 FLOPs).
#: settings of the pre-training run that a fine-tune keeps unless told otherwise (numerics and
#: clipping that the pre-trained weights were shaped by)
INHERITED_FIELDS = ("agc_clip", "agc_eps", "agc_exempt_scalar_gains", "precision", "channels_last",
                    "momentum", "beta2", "grad_clip_norm", "threads")
#: model config fields a fine-tune does not take from the pre-training run (see the module docstring)
#: (with the family's ``traits.dropout_field`` and ``traits.drop_path_field``)
NOT_INHERITED_MODEL_FIELDS = ("image_size", "num_classes")
DEFAULT_EPOCHS = 10.0
DEFAULT_SAM_RHO = 0.05  # the NFNet fine-tuning recipe (Smith et al. 2023, §3)
DEFAULT_BATCH_SIZE = 32  # digits (1438 training images): batch 64 reached 0.41 top-1 in 10 epochs, 32 reached 0.69
DIGITS_HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class PretrainedRun:
    """A finished pre-training run and the weights a fine-tune starts from."""

    run_dir: Path
    step: int  # the optimizer step of the checkpoint loaded (the run's last)
    weights_file: Path  # model.safetensors, or ema.safetensors with init_from_ema
    config: dict[str, Any]  # the run's config.json (for a timm file: its model, name and overrides)
    result: dict[str, Any]  # the run's result.json
    source: str = "run"  # "run": a convscale run directory; "timm": a timm checkpoint file (run_dir is it)
    ema: bool = False  # a timm file: take its state_dict_ema

    @property
    def family(self) -> str:
        return self.config["model"]["family"]

    def record(self) -> dict[str, Any]:
        """What a fine-tune's config.json stores under ``init_from``."""
        if self.source == "timm":
            return {"timm_file": str(self.run_dir), "ema": self.ema, "model": self.result.get("model"),
                    "resolution": self.config["train"]["data"]["resolution"], "train_flops": None}
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "weights": self.weights_file.name,
            "model": self.result.get("model"),
            "resolution": self.config["train"]["data"]["resolution"],
            "train_flops": self.result.get("train_flops"),
        }


def find_pretrained(run_dir: str | Path, use_ema: bool = False) -> PretrainedRun:
    """The finished run at ``run_dir`` and its final checkpoint (or a timm checkpoint file, see
    ``timm_pretrained``); UserError if there is none."""
    rd = Path(run_dir).expanduser().resolve()
    if rd.is_file():
        return timm_pretrained(rd, use_ema)
    if not (rd / "config.json").is_file():
        raise UserError(f"--from {run_dir} is not a run directory (no config.json); pass a pre-training --run-dir")
    result_path = rd / "result.json"
    if not result_path.is_file():
        raise UserError(f"--from {run_dir} has not finished (no result.json); finish it with `convscale train` first")
    config, result = read_run_config(rd), read_run_json(result_path)
    if result.get("status") != "done":
        raise UserError(f"--from {run_dir} ended as {result.get('status')!r}, not 'done'; pick a finished run")
    checkpoints = list_checkpoints(rd)
    if not checkpoints:
        raise UserError(f"--from {run_dir} has no checkpoint to load; re-run it (checkpoints/ was removed)")
    final = checkpoints[-1]
    step = int(final.name.split("-", 1)[1])
    if step != result.get("steps"):
        raise UserError(f"--from {run_dir}: its last checkpoint is step {step}, not the final step "
                        f"{result.get('steps')}; resume that run to its end first")
    weights = final / ("ema.safetensors" if use_ema else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"--from {run_dir} has no EMA weights (it ran with ema_decay=0); drop --use-ema"
                        if use_ema else f"--from {run_dir}: {weights} is missing; re-run that run")
    return PretrainedRun(rd, step, weights, config, result)


def timm_pretrained(path: Path, use_ema: bool = False) -> PretrainedRun:
    """A timm checkpoint file as a pre-trained "run": the convscale model its shapes are
    (``config_from_timm``), at the resolution it was most likely trained at (a state dict does not
    say): a ViT's position grid, a named NFNet-F's published train size, else timm's 224 px."""
    cfg = config_from_timm(read_state_dict(path, ema=use_ema))
    name, overrides = model_spec(cfg)
    variant = nfnet.F_VARIANTS.get(name.removeprefix("nfnet-")) if cfg.family == "nfnet" else None
    resolution = cfg.image_size if cfg.family == "vit" else (variant["train_px"] if variant else 224)
    config = {"model": config_to_dict(cfg),
              "train": {"model": name, "model_overrides": overrides, "data": {"resolution": resolution}}}
    return PretrainedRun(path, 0, path, config, {"model": name, "status": "done"}, source="timm", ema=use_ema)


@torch.no_grad()
def load_pretrained_weights(model: nn.Module, pretrained: PretrainedRun,
                            model_cfg: Optional[ModelConfig] = None) -> list[str]:
    """Load the pre-trained body into ``model`` and zero its classifier; returns the loaded names.

    A ViT's ``_load_from_state_dict`` resamples a learned position grid of another size.
    Any other mismatch (another architecture) is a UserError naming the first tensors.
    A timm file needs ``model_cfg`` (the config ``model`` was built from): the mapping checks that
    the two compute the same function.
    """
    if pretrained.source == "timm":
        if model_cfg is None:
            raise ValueError("load_pretrained_weights needs model_cfg to load a timm checkpoint")
        _, weights = from_timm(read_state_dict(pretrained.weights_file, ema=pretrained.ema), model_cfg)
    else:
        weights = read_run_weights(pretrained)
    state = {k: v for k, v in weights.items() if k not in CLASSIFIER_KEYS}
    try:
        res = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: another width/depth than the pre-trained run
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"the model does not match the pre-trained run {pretrained.run_dir} ({first}); "
                        "keep its model and model_overrides") from None
    missing = [k for k in res.missing_keys if k not in CLASSIFIER_KEYS]
    if missing or res.unexpected_keys:
        raise UserError(f"the model does not match the pre-trained run {pretrained.run_dir} "
                        f"(missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}); keep its model and overrides")
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return sorted(state)


def read_run_weights(pretrained: PretrainedRun) -> dict[str, torch.Tensor]:
    """The tensors of a run's checkpoint file (verified against its recorded checksum)."""
    try:
        verify_checkpoint_file(Path(pretrained.weights_file))
        return load_file(pretrained.weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{pretrained.weights_file} is damaged ({type(e).__name__}); re-run the pre-training "
                        f"run {pretrained.run_dir} from its previous checkpoint, or pick another --from") from None


def finetune_config(
    pretrain_run_dir: str | Path | PretrainedRun,
    run_dir: str,
    data: DataConfig,
    *,
    use_ema: bool = False,
    drop_path_rate: Optional[float] = None,
    dropout: Optional[float] = None,
    overrides: Optional[dict[str, Any]] = None,
    **fields: Any,
) -> TrainConfig:
    """The TrainConfig of a fine-tune of ``pretrain_run_dir`` (or a ``find_pretrained`` result) on ``data``.

    Model: the pre-trained run's name and overrides, less ``NOT_INHERITED_MODEL_FIELDS`` (a ViT is
    built for ``data.resolution``; dropout and stochastic depth are the model's own), plus
    stochastic depth / dropout rates if given. Optimizer, lr and
    weight decay: ``FAMILY_DEFAULTS``; numerics and clipping: the pre-trained run's; budget
    ``DEFAULT_EPOCHS`` epochs, SAM rho ``DEFAULT_SAM_RHO``. ``overrides`` (dotted ``--set`` keys)
    and then ``fields`` (TrainConfig fields; None = not given) win over all of these.
    """
    pre = pretrain_run_dir if isinstance(pretrain_run_dir, PretrainedRun) else find_pretrained(pretrain_run_dir, use_ema)
    ptrain = pre.config["train"]
    traits = family_traits(pre.family)
    not_inherited = {*NOT_INHERITED_MODEL_FIELDS, traits.dropout_field, traits.drop_path_field}
    model_overrides = {k: v for k, v in ptrain.get("model_overrides", {}).items() if k not in not_inherited}
    if drop_path_rate is not None:
        model_overrides[traits.drop_path_field] = drop_path_rate
    if dropout is not None:
        model_overrides[traits.dropout_field] = dropout
    base: dict[str, Any] = dict(traits.finetune_defaults)
    base.update({k: ptrain[k] for k in INHERITED_FIELDS if k in ptrain})
    base.update(epochs=DEFAULT_EPOCHS, sam_rho=DEFAULT_SAM_RHO, batch_size=DEFAULT_BATCH_SIZE,
                checkpoint_every_seconds=120.0)
    cfg = TrainConfig(run_dir=run_dir, model=ptrain["model"], model_overrides=model_overrides, data=data,
                      init_from=str(pre.run_dir), init_from_ema=use_ema, **base)
    for given in (overrides or {}), {k: v for k, v in fields.items() if v is not None}:
        if any(k in BUDGET_FIELDS for k in given):  # a budget replaces the default (or earlier) one
            cfg = cfg.replace(**{k: None for k in BUDGET_FIELDS})
        cfg = apply_overrides(cfg, given)
    cfg.validate()
    return cfg


def default_data(kind: str, path: Optional[str], resolution: int) -> DataConfig:
    """A downstream DataConfig; digits hold out ``DIGITS_HELDOUT_FRACTION`` (18 images at the default 1 %
    would make top-1 meaningless)."""
    kw: dict[str, Any] = dict(kind=kind, path=path, resolution=resolution)
    if kind == "digits":
        kw["heldout_fraction"] = DIGITS_HELDOUT_FRACTION
    return DataConfig(**kw)
