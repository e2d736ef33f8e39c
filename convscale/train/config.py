"""TrainConfig: everything that determines a pre-training run, and the budget -> steps conversion.

A run's length is given as exactly one of ``epochs``, ``steps``, ``images`` or ``train_flops``
and converted to optimizer steps by ``budget_to_steps`` (the one place that does it). Training
FLOPs follow the project convention (models/base.py): 3 x forward FLOPs per image, at the
training resolution ``data.resolution``, doubled with SAM (``sam_rho > 0``: two forward-backward
passes per step); ``TrainConfig.train_flops_per_image`` is that per-image cost, charged by both the
training loop and the sweep planner. An epoch counts image SLOTS: with repeated augmentation (``aug_repeats = k``)
a run of E epochs takes the same steps and compute as without, but sees each distinct image only
about E / k times (Smith et al. 2023, §3: fewer passes, same compute).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from convscale.data.config import DataConfig
from convscale.errors import UserError
from convscale.train.schedules import Schedule, schedule_config

#: Images in one "epoch" of an unlimited stream (procedural data): ImageNet-1k's training set
#: size, so that "0.25 epochs" means the same number of images as in the papers' ImageNet terms.
#: Real data sources use their own ``num_train_images`` instead.
IMAGENET_TRAIN_IMAGES = 1_281_167

BUDGET_FIELDS = ("epochs", "steps", "images", "train_flops")
#: Bounds that no run reaches on purpose; past them a typo would try to allocate terabytes.
MAX_RESOLUTION = 8192  # px
MAX_CLASSES = 1_000_000  # JFT-4B has ~30k
OPTIMIZERS = ("sgd_agc", "adamw")
LOSSES = ("softmax", "sigmoid")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL_MODES = ("ddp", "fsdp")  # == convscale.train.distributed.PARALLEL_MODES (no torch import here)

@dataclass
class OptimConfig:
    """The optimizer, its learning-rate schedule and the weight average."""

    optimizer: str = "sgd_agc"  # "sgd_agc" (NFNets) | "adamw" (ViTs)
    lr: float = 0.1  # peak learning rate
    warmup_fraction: float = 0.05  # linear warm-up over this share of the steps ...
    warmup_steps: Optional[int] = None  # ... or over exactly this many steps (wins when set)
    schedule: str = "cosine"  # after warm-up: "cosine" (the paper's) | "linear" | "rsqrt" | "wsd" (train/schedules/)
    schedule_options: dict[str, Any] = field(default_factory=dict)  # that schedule's options, e.g. cooldown_fraction
    momentum: float = 0.9  # SGD: Nesterov momentum; AdamW: beta1
    beta2: float = 0.999  # AdamW only
    weight_decay: float = 2e-5  # SGD: coupled L2; AdamW: decoupled (torch convention, x lr)
    agc_clip: float = 0.01  # lambda; 0 disables AGC
    agc_eps: float = 1e-3
    agc_exempt_scalar_gains: bool = False  # True: scalar gains (SkipInit) unclipped; short runs need it
    agc_clip_classifier: bool = False  # True: AGC clips classifier.weight too (the reference leaves it unclipped)
    grad_clip_norm: float = 1.0  # AdamW only: global-norm clipping; 0 disables
    classifier_lr_scale: float = 1.0  # multiplies lr for classifier.weight/bias
    ema_decay: float = 0.0  # 0 = off; else EMA weights are also evaluated


@dataclass
class FinetuneConfig:
    """Fine-tuning (train/finetune.py); the defaults leave pre-training unchanged."""

    init_from: Optional[str] = None  # a finished run dir: start from its final weights, new classifier
    init_from_ema: bool = False  # load that run's EMA weights instead of its raw ones
    sam_rho: float = 0.0  # SAM ascent radius; > 0 costs 2 forward-backward passes per step
    aug_repeats: int = 1  # repeated augmentation: each batch is batch_size/k images seen k times
    eval_resolution: Optional[int] = None  # held-out resolution in px; None = data.resolution


@dataclass
class RuntimeConfig:
    """How a run executes, not what it computes (the memory format only at float round-off,
    through other conv kernels): a run directory may be resumed with other values."""

    # NFNets in NHWC; None: on the CPU (faster there, benchmarks/RESULTS.md) but not on CUDA (timm
    # measured NFNets 2.4x slower in NHWC on a GPU; benchmarks/gpu_check.sh times both); ViTs: ignored
    channels_last: Optional[bool] = None
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, same numbers
    checkpoint_every_steps: int = 0  # 0: by time only
    checkpoint_every_seconds: float = 600.0  # 0: by steps only
    threads: int = 0  # torch intra-op threads; 0 = torch default
    quiet: bool = False  # one line per evaluation instead of a progress bar
    parallel: str = "ddp"  # under torchrun/srun with > 1 process: "ddp" | "fsdp" (FSDP2, sharded)
    # experiment trackers beside metrics.jsonl (train/loggers): "tensorboard" | "wandb" | "mlflow"
    log: list[str] = field(default_factory=list)
    log_options: dict[str, Any] = field(default_factory=dict)  # per tracker: {"wandb": {"project": "p"}}


#: TrainConfig's groups. Every field name is unique across TrainConfig and its groups, so a field
#: may be named alone (``lr``, as flat configs before the groups did) or with its group (``optim.lr``).
GROUPS: dict[str, type] = {"optim": OptimConfig, "finetune": FinetuneConfig, "runtime": RuntimeConfig}
FIELD_GROUP: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
#: Fields that do not change a run's numbers: a run directory may be resumed with other values.
RUNTIME_ONLY_FIELDS = frozenset({"run_dir", *(f.name for f in dataclasses.fields(RuntimeConfig))})
#: DataConfig fields of the same kind (worker processes build the very batches of in-process loading)
RUNTIME_ONLY_DATA_FIELDS = frozenset({"workers"})


@dataclass
class TrainConfig:
    """One pre-training run. Defaults are the NFNet reference recipe where one exists (Brock et al. 2021, §4, §6.1 and App. A)."""

    run_dir: str = "runs/default"
    model: str = "nfnet-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 128  # global batch (images per optimizer step)
    grad_accum_steps: int = 1  # micro-batches per step; batch_size must divide evenly
    # budget: exactly one of these is set
    epochs: Optional[float] = None
    steps: Optional[int] = None
    images: Optional[int] = None
    train_flops: Optional[float] = None
    epoch_images: int = IMAGENET_TRAIN_IMAGES  # images per epoch of an unlimited stream
    # loss and numerics
    label_smoothing: float = 0.0
    loss: str = "softmax"  # "softmax" | "sigmoid" (one-hot targets, bias init -log(classes))
    # autocast dtype for activations (params stay fp32); "auto": bf16 where the device computes it
    # natively, else fp32 (train/precision.py), resolved when the run (or its study) starts; a
    # resumed run keeps the precision it started with
    precision: str = "auto"
    compile: bool = False
    # bookkeeping
    seed: int = 0  # model init and any training randomness (data order is data.seed)
    eval_every_steps: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = 0  # global held-out batch; 0: one micro-batch (batch_size / grad_accum_steps)
    log_every_steps: int = 10
    divergence_loss_factor: float = 3.0  # stop if loss > factor x first-step loss; 0 = NaN/inf only
    # stop as diverged a run that learned and then sat back at its first-step loss for this share of
    # its steps (a collapse: train/divergence.py); 0 = off
    collapse_patience_fraction: float = 0.05
    # cooldown branches (sweep/planner.py): a trunk trains its schedule's prefix, a branch its cooldown
    stop_at_step: Optional[int] = None  # a trunk: stop after this many steps of the budget's schedule
    keep_checkpoint_steps: list[int] = field(default_factory=list)  # checkpoints never rotated away
    branch_from: Optional[str] = None  # a trunk's run dir: start from its checkpoint at this run's cooldown start
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Read ``to_dict``'s nested form, or the flat one of versions before the groups (the
        config.json of older run dirs and sweep cells): a group's fields may stand at the top."""
        flat = _flatten(d)
        data = flat.pop("data", {})
        if isinstance(data, dict):
            _check_fields(DataConfig, data, "DataConfig")
            data = DataConfig(**data)
        return cls(data=data).replace(**flat)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **kw) -> "TrainConfig":
        """``dataclasses.replace`` that also takes a group's fields by name: ``replace(lr=0.1, quiet=True)``."""
        top = {k: v for k, v in kw.items() if k not in FIELD_GROUP}
        for group in GROUPS:
            fields = {k: v for k, v in kw.items() if FIELD_GROUP.get(k) == group}
            if fields:
                top[group] = dataclasses.replace(top.get(group, getattr(self, group)), **fields)
        return dataclasses.replace(self, **top)

    def value(self, name: str) -> Any:
        """A field by its own name, in whichever group it lives: ``value("lr") == optim.lr``."""
        group = FIELD_GROUP.get(name)
        return getattr(getattr(self, group) if group else self, name)

    @property
    def passes_per_step(self) -> int:
        """Forward-backward passes per optimizer step: 2 with SAM (its ascent pass), else 1."""
        return 2 if self.finetune.sam_rho > 0 else 1

    def train_flops_per_image(self, forward_flops_per_image: float) -> float:
        """Training FLOPs one image costs in this run: 3 x forward FLOPs (models/base.py) per
        forward-backward pass, ``passes_per_step`` passes."""
        from convscale.models.base import train_flops_per_image  # lazy: this module stays torch-free

        return train_flops_per_image(forward_flops_per_image) * self.passes_per_step

    def resolved_eval_batch_size(self) -> int:
        """Global held-out batch: ``eval_batch_size`` or one training micro-batch (which fits
        wherever training fits; the global batch of a run with accumulation may not)."""
        return self.eval_batch_size or self.batch_size // self.grad_accum_steps

    def validate(self) -> None:
        """Raise UserError for settings no run can use."""
        check_field_types(self, "")
        check_field_types(self.data, "data.")
        for group in GROUPS:
            check_field_types(getattr(self, group), f"{group}.")
        given = [f for f in BUDGET_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise UserError(
                f"give exactly one budget of --epochs/--steps/--images/--train-flops (got {given or 'none'})"
            )
        if not 0.0 <= self.data.heldout_fraction < 1.0:
            raise UserError(f"data.heldout_fraction must be in [0, 1), not {self.data.heldout_fraction}")
        budget = given[0]
        if not getattr(self, budget) > 0:
            raise UserError(f"--{budget.replace('_', '-')} must be positive, not {getattr(self, budget)}")
        for name, low, high in _RANGES:
            v = self.value(name)
            if v is not None and not low <= v <= high:
                raise UserError(f"{name} must be in [{low:g}, {high:g}], not {v}")
        for name, low, high in _DATA_RANGES:
            v = getattr(self.data, name)
            if v is not None and not low <= v <= high:
                raise UserError(f"data.{name} must be in [{low:g}, {high:g}], not {v}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("loss", LOSSES), ("precision", PRECISIONS),
                              ("parallel", PARALLEL_MODES)):
            if self.value(name) not in allowed:
                raise UserError(f"{name} must be one of {list(allowed)}, not {self.value(name)!r}")
        if self.batch_size < 1 or self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise UserError(
                f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum_steps "
                f"({self.grad_accum_steps})"
            )
        o = self.optim
        if not 0.0 <= o.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), not {o.ema_decay}")
        if not 0.0 <= o.warmup_fraction < 1.0:
            raise UserError(f"warmup_fraction must be in [0, 1), not {o.warmup_fraction}")
        if o.lr <= 0:
            raise UserError(f"lr must be positive, not {o.lr}")
        options = schedule_config(o.schedule, o.schedule_options)
        check_field_types(options, "schedule_options.")
        options.validate()
        from convscale.train.loggers import check_log  # torch-free, imports no tracker

        check_log(self.runtime.log, self.runtime.log_options)
        if self.finetune.sam_rho < 0:
            raise UserError(f"sam_rho must be >= 0 (0 turns SAM off), not {self.finetune.sam_rho}")
        repeats = self.finetune.aug_repeats
        if repeats < 1 or self.batch_size % repeats:
            raise UserError(f"batch_size ({self.batch_size}) must be a multiple of aug_repeats ({repeats} >= 1)")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise UserError(f"stop_at_step must be >= 1 (or unset), not {self.stop_at_step}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.keep_checkpoint_steps):
            raise UserError(f"keep_checkpoint_steps must be whole step numbers >= 1, not {self.keep_checkpoint_steps}")
        if self.branch_from is not None and build_schedule(self, 1000).cooldown_start_step is None:
            raise UserError(f"branch_from needs a schedule with a cooldown (schedule=wsd), not {o.schedule!r}")


#: (field, lowest, highest) of numeric fields whose range the checks in validate() do not cover
_RANGES = (
    ("momentum", 0.0, 1.0), ("beta2", 0.0, 1.0), ("weight_decay", 0.0, math.inf), ("agc_clip", 0.0, math.inf),
    ("agc_eps", 0.0, math.inf), ("grad_clip_norm", 0.0, math.inf), ("classifier_lr_scale", 0.0, math.inf),
    ("label_smoothing", 0.0, 1.0), ("divergence_loss_factor", 0.0, math.inf),
    ("collapse_patience_fraction", 0.0, 1.0),
    ("checkpoint_every_seconds", 0.0, math.inf), ("epoch_images", 1, math.inf), ("warmup_steps", 0, math.inf),
    ("eval_every_steps", 0, math.inf), ("eval_batch_size", 0, math.inf), ("log_every_steps", 1, math.inf),
    ("checkpoint_every_steps", 0, math.inf), ("threads", 0, 4096), ("eval_resolution", 8, MAX_RESOLUTION),
)
_DATA_RANGES = (
    ("resolution", 8, MAX_RESOLUTION), ("num_classes", 1, MAX_CLASSES), ("heldout_images", 1, math.inf),
    ("workers", -1, 1024),  # -1: auto (data.config.resolve_workers)
)


def check_field_types(obj: Any, prefix: str) -> None:
    """UserError unless every field of the dataclass ``obj`` holds its annotated type (a JSON or
    TOML file can hold "16" where 16 belongs) and every float is finite (NaN and inf are never a
    setting: a NaN learning rate would only show up later as a "diverged" run)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, annotation = getattr(obj, f.name), hints[f.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            if value is None:
                continue
            annotation = args[0]
        if annotation is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise UserError(f"{prefix}{f.name} must be a finite number, not {value}")
        elif annotation is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif annotation in (str, bool):
            ok = isinstance(value, annotation)
        else:
            ok = isinstance(value, typing.get_origin(annotation) or annotation)
        if not ok:
            name = getattr(annotation, "__name__", str(annotation))
            raise UserError(f"{prefix}{f.name} must be a {name}, not {value!r}; fix the value")


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict with every group's table spread into fields by their own names (a field
    also given at the top wins); UserError for a name no TrainConfig field has."""
    flat: dict[str, Any] = {}
    for group, cls in GROUPS.items():
        table = d.get(group, {})
        if isinstance(table, dict):
            _check_fields(cls, table, f"TrainConfig.{group}")
            flat.update(table)
        else:
            flat.update(dataclasses.asdict(table))
    flat.update({k: v for k, v in d.items() if k not in GROUPS})
    valid = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in GROUPS} | set(FIELD_GROUP)
    unknown = sorted(set(flat) - valid)
    if unknown:
        raise UserError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(valid | set(GROUPS))}")
    return flat


def numbers_part(train: dict[str, Any]) -> dict[str, Any]:
    """The part of a TrainConfig dict (written now or by an older version, nested or flat) that
    changes a run's numbers, in this version's form: fields added since appear at their defaults
    (which reproduce the old behaviour); run_dir, the runtime group and ``data.workers`` are left out."""
    try:
        d = TrainConfig.from_dict(train).to_dict()
    except (UserError, TypeError):  # not one this version can read: compared as it is
        d = dict(train)
    d = {k: v for k, v in d.items() if k not in RUNTIME_ONLY_FIELDS and k != "runtime"}
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k not in RUNTIME_ONLY_DATA_FIELDS}
    return d


def _check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(names)}")


def budget_to_steps(
    cfg: TrainConfig, train_flops_per_image: float, num_train_images: Optional[int] = None
) -> int:
    """Optimizer steps for the run's budget (rounded to the nearest step).

    ``train_flops_per_image``: ``cfg.train_flops_per_image(forward FLOPs at the training resolution)``.
    ``num_train_images``: images in one epoch of real data; ``None`` for an unlimited stream,
    whose epoch is ``cfg.epoch_images``.
    """
    if cfg.steps is not None:
        steps = int(cfg.steps)
    else:
        if cfg.epochs is not None:
            images = cfg.epochs * (num_train_images or cfg.epoch_images)
        elif cfg.images is not None:
            images = float(cfg.images)
        elif cfg.train_flops is not None:
            images = cfg.train_flops / train_flops_per_image
        else:
            raise UserError("give one budget: --epochs, --steps, --images or --train-flops")
        steps = int(math.floor(images / cfg.batch_size + 0.5))
    if steps < 1:
        raise UserError(
            f"the budget is less than one step of {cfg.batch_size} images; raise the budget or lower --batch-size"
        )
    return steps


def resolve_warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Warm-up steps: ``warmup_steps`` if set, else ``round(warmup_fraction * total_steps)``."""
    if cfg.optim.warmup_steps is not None:
        return min(int(cfg.optim.warmup_steps), total_steps)
    return int(round(cfg.optim.warmup_fraction * total_steps))


def build_schedule(cfg: TrainConfig, total_steps: int) -> Schedule:
    """The run's learning-rate schedule over ``total_steps`` updates (warm-up included)."""
    options = schedule_config(cfg.optim.schedule, cfg.optim.schedule_options)
    return options.build(total_steps, resolve_warmup_steps(cfg, total_steps), cfg.optim.lr)


def cooldown_start_step(cfg: TrainConfig, total_steps: int) -> int:
    """First update of the cooldown of a run of ``total_steps`` updates (``wsd``, or ``rsqrt``
    with a cooldown): a run stopped here is the trunk its cooldown branches start from."""
    start = build_schedule(cfg, total_steps).cooldown_start_step
    if start is None:
        raise UserError(f"schedule {cfg.optim.schedule!r} has no cooldown; use schedule=wsd (or rsqrt with "
                        f"schedule_options.cooldown_fraction > 0)")
    return start


# ---------------------------------------------------------------------------------------------
# "key=value" overrides (CLI --set and config files share them)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a CLI string (or JSON value) into the field's type."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if not isinstance(value, str):
        if annotation is float and isinstance(value, int):
            return float(value)
        return value
    if typing.get_origin(annotation) is list:  # "[16, 32]" or "16,32"
        text = value.strip()
        items = _parse_json_or_str(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(items, list):
            raise UserError(f"{key}={value!r} is not a list; write {key}=16,32")
        (item_type,) = typing.get_args(annotation) or (str,)
        return [_coerce(v if isinstance(v, str) else str(v), item_type, key) for v in items]
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if annotation is float:
            return float(value)
    except ValueError:
        raise UserError(f"{key}={value!r} is not a valid {annotation.__name__}") from None
    return value


def _parse_json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set fields by dotted name: ``lr`` or ``optim.lr``, ``data.resolution``, ``model_overrides.width``,
    ``schedule_options.cooldown_fraction``; a group as a whole table (``optim = {lr = 0.1}``).

    String values (from the command line) are converted to each field's type.
    """
    items: list[tuple[str, Any]] = []
    for key, value in overrides.items():  # a group's name in front of its field is optional
        head, _, rest = key.partition(".")
        if head in GROUPS and rest:
            items.append((rest, value))
        elif head in GROUPS and isinstance(value, dict):
            items.extend(value.items())
        elif head in GROUPS:
            raise UserError(f"{key} must be a table of {head} fields, not {value!r}")
        else:
            items.append((key, value))
    top: dict[str, Any] = {}
    data_kw: dict[str, Any] = {}
    tables = {"model_overrides": dict(cfg.model_overrides), "schedule_options": dict(cfg.optim.schedule_options)}
    hints = {name: hint for cls in (TrainConfig, *GROUPS.values()) for name, hint in typing.get_type_hints(cls).items()
             if name not in ("data", *GROUPS)}
    data_hints = typing.get_type_hints(DataConfig)
    for key, value in sorted(items, key=lambda kv: "." in kv[0]):  # whole tables before dotted keys
        head, _, rest = key.partition(".")
        if head == "data" and rest:
            if rest not in data_hints:
                raise UserError(f"unknown data field {rest!r} in {key!r}; valid: {sorted(data_hints)}")
            data_kw[rest] = _coerce(value, data_hints[rest], key)
        elif head == "log_options" and rest:  # log_options.wandb.project=p
            name, _, option = rest.partition(".")
            if not option:
                raise UserError(f"{key!r}: give log_options.<logger>.<field>=value")
            from convscale.train.loggers import logger_module  # torch-free, imports no tracker

            option_hints = typing.get_type_hints(logger_module(name).Options)
            if option not in option_hints:
                raise UserError(f"unknown field {option!r} in {key!r}; valid: {sorted(option_hints)}")
            log_kw = top.setdefault("log_options", {**cfg.runtime.log_options})
            log_kw[name] = {**log_kw.get(name, {}), option: _coerce(value, option_hints[option], key)}
        elif head in tables:
            value = _parse_json_or_str(value) if isinstance(value, str) else value
            if rest:
                tables[head][rest] = value
            elif isinstance(value, dict):  # a whole table (a study's [train]) replaces the one before
                tables[head] = dict(value)
            else:
                raise UserError(f"{key} must be a table of fields, not {value!r}")
        elif head in hints and not rest:
            top[head] = _coerce(value, hints[head], key)
        else:
            raise UserError(f"unknown field {key!r}; use a TrainConfig field (optionally after its group: "
                            f"{', '.join(f'{g}.' for g in GROUPS)}), data.<field>, model_overrides.<field> "
                            f"or schedule_options.<field>")
    return cfg.replace(data=cfg.data.replace(**data_kw), **tables, **top)
