"""The training loop: one run from a TrainConfig to result.json, resumable from its run directory.

Run directory:
  config.json     resolved TrainConfig + model config + steps + flops_per_image (written first)
  metrics.jsonl   one row per log step ("kind": "train") and per evaluation ("kind": "eval")
  checkpoints/    the latest checkpoint (see checkpoint.py)
  result.json     written last: status "done" | "diverged" and the final held-out metrics
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from convscale import __version__, signals
from convscale.data import build_source
from convscale.data.config import DataSource, resolve_workers
from convscale.data.feed import DeviceFeed
from convscale.errors import UserError
from convscale.models import config_at_resolution, get_config
from convscale.models.base import config_to_dict
from convscale.train.checkpoint import (
    atomic_write_json,
    is_main_process,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from convscale.train.distributed import (
    all_reduce_sum,
    all_reduce_sums,
    fsdp_shard,
    gradient_sync,
    init_distributed,
    is_distributed,
    local_part,
    rank,
    rank_seed,
    resolve_parallel,
    run_on_main,
    shutdown,
    world_size,
    wrap_model,
)
from convscale.train.config import TrainConfig, budget_to_steps, resolve_warmup_steps
from convscale.train.evaluate import autocast, heldout_sums, means, training_loss
from convscale.train.finetune import RepeatedAugmentSource, find_pretrained, load_pretrained_weights
from convscale.train.memory import enable_activation_checkpointing, peak_memory_bytes, physical_memory_bytes
from convscale.train.loggers import open_loggers
from convscale.train.metrics import Progress
from convscale.train.precision import resolve_precision
from convscale.train.rundir import RESULT_FILE, lock_run_dir, prepare_run_dir, read_run_json
from convscale.train.optim import build_optimizer, clip_global_norm_, set_lr
from convscale.train.sam import sam_ascend_, sam_restore_
from convscale.train.schedule import lr_at

EXIT_DIVERGED = 3  # `convscale train` exit code of a run that diverged (0 done, 2 user error)
def _precision_for(cfg: TrainConfig, run_dir: Path, device_type: str, restart: bool) -> str:
    """The run's precision: an explicit one, else (``auto``) the one the run was started with when
    it resumes (its numerics stay those of its first machine), else what this device does natively."""
    if cfg.precision == "auto" and not restart and (run_dir / "config.json").is_file():
        stored = read_run_json(run_dir / "config.json").get("train", {}).get("precision")
        if stored in ("bf16", "fp32"):
            return stored
    return resolve_precision(cfg.precision, device_type)


def configure_cuda() -> None:
    """cuDNN picks the fastest conv algorithm per shape (shapes are fixed in a run); fp32 matmuls
    outside autocast (fp32 runs, the loss) use TF32 tensor cores, as cuDNN convs already do."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")




def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC parameters, except 1x1 conv weights: ``.to(channels_last)`` gives those strides that
    their gradients never have, and DDP then copies every such gradient into its bucket (it warns
    "Grad strides do not match bucket view strides"); a 1x1 weight is the same matrix either way."""
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.shape[2:] == (1, 1):
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA of the weights with the NFNet reference warm-up: min(decay, (1 + t) / (10 + t))."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    ema_p = [p for p in ema_model.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
    for eb, b in zip(ema_model.buffers(), model.buffers()):
        eb.copy_(b)


def run(cfg: TrainConfig, restart: bool = False, source: Optional[DataSource] = None) -> dict[str, Any]:
    """Train (or resume, or just report) the run ``cfg`` describes; returns the result dict.

    ``source``: an already built data source for ``cfg.data`` (a sweep can share one); else built
    here. ``restart``: wipe the run directory first. Raises ``UserError`` for bad input.
    Under torchrun/srun (distributed.py) every process calls this; it joins the process group
    for the run and leaves it afterwards, once the run's modules are released.
    """
    owns_group = init_distributed()
    ok = False
    locks: list = []  # the run directory's lock, held (by rank 0) until the run ends
    try:
        result = _run(cfg, restart, source, locks)
        ok = True
        return result
    finally:
        for lock in locks:
            lock.release()
        if owns_group:
            shutdown(barrier=ok)


def _run(cfg: TrainConfig, restart: bool, source: Optional[DataSource], locks: list) -> dict[str, Any]:
    cfg.validate()
    if cfg.batch_size % (world_size() * cfg.grad_accum_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be a multiple of processes ({world_size()}) "
                        f"x grad_accum_steps ({cfg.grad_accum_steps}); change --batch-size")
    batch_bytes = cfg.batch_size * 3 * cfg.data.resolution**2 * 4  # one float32 global batch (every rank builds it)
    if batch_bytes > physical_memory_bytes():
        raise UserError(f"one batch of {cfg.batch_size} images at {cfg.data.resolution} px takes "
                        f"{batch_bytes / 2**30:.3g} GiB, more than this machine's memory; lower --batch-size")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        configure_cuda()
    run_dir = Path(cfg.run_dir)
    cfg = cfg.replace(precision=_precision_for(cfg, run_dir, device.type, restart))  # "auto" -> bf16 | fp32
    part = local_part()  # this rank builds only its share of every batch
    pin = device.type == "cuda"

    # ---- resolve: data, model, budget -----------------------------------------------------
    get_config(cfg.model, **cfg.model_overrides)  # a bad model name fails before data is loaded
    pretrained = find_pretrained(cfg.init_from, cfg.init_from_ema) if cfg.init_from else None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    data_cfg = cfg.data.replace(workers=resolve_workers(cfg.data, device.type, local_processes))
    source = source if source is not None else build_source(data_cfg)
    if cfg.aug_repeats > 1:
        source = RepeatedAugmentSource(source, cfg.aug_repeats)
    model_cfg = config_at_resolution(cfg.model, cfg.data.resolution, num_classes=source.num_classes,
                                     **cfg.model_overrides)
    model_cfg.check_resolution(cfg.data.resolution)
    eval_source = source  # held-out images at eval_resolution come from a second source
    if cfg.eval_resolution is not None and cfg.eval_resolution != cfg.data.resolution:
        model_cfg.check_resolution(cfg.eval_resolution)
        eval_source = build_source(data_cfg.replace(resolution=cfg.eval_resolution))
    for src in {id(source): source, id(eval_source): eval_source}.values():
        if getattr(src, "num_heldout_images", None) == 0:  # found now, not by the final evaluation
            raise UserError(f"the data holds no held-out images (heldout_fraction {cfg.data.heldout_fraction} "
                            f"of {src.num_train_images} images); raise data.heldout_fraction or set data.heldout_path")
    sam_passes = cfg.passes_per_step  # SAM: two forward-backward passes per step
    flops_per_image = cfg.train_flops_per_image(model_cfg.forward_flops(cfg.data.resolution))
    steps = budget_to_steps(cfg, flops_per_image, source.num_train_images)
    warmup_steps = resolve_warmup_steps(cfg, steps)
    eval_batch_size = cfg.resolved_eval_batch_size()
    resolved = {
        "train": cfg.to_dict(),
        "model": config_to_dict(model_cfg),
        "model_name": model_cfg.name,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "flops_per_image": flops_per_image,  # training FLOPs per image (3 x forward, x2 with SAM)
        "train_flops": flops_per_image * cfg.batch_size * steps,
        "num_classes": source.num_classes,
        "num_train_images": source.num_train_images,
        "convscale_version": __version__,
    }
    if pretrained is not None:
        resolved["init_from"] = pretrained.record()
    progress = Progress(steps, cfg.quiet, stream=None if is_main_process() else io.StringIO())
    def prepare() -> Optional[dict[str, Any]]:
        locks.append(lock_run_dir(run_dir))  # a second `convscale train` on this directory stops here
        return prepare_run_dir(run_dir, resolved, restart)

    finished = run_on_main(prepare)  # one rank touches files
    if finished is not None:
        progress.message(f"{run_dir}: already finished ({finished['status']}); result: {json.dumps(finished)}")
        return finished

    # ---- model, optimizer, state ----------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = model_cfg.build().to(device)
    if pretrained is not None:
        load_pretrained_weights(model, pretrained)
    if cfg.loss == "sigmoid":  # start at the prior p = 1/C per class instead of 0.5
        with torch.no_grad():
            model.classifier.bias.fill_(-math.log(source.num_classes))
    channels_last = model_cfg.traits.channels_last(cfg.channels_last, device.type)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = to_channels_last(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    # before the optimizer: FSDP2 replaces ``model``'s parameters by sharded ones (DDP wraps it)
    param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # FSDP2 all-gathers in bf16
    train_model = wrap_model(model, cfg.parallel, device, param_dtype)
    if ema_model is not None and resolve_parallel(cfg.parallel) == "fsdp":
        # sharded like model: EMA updates stay local (and evaluation gathers what training does)
        fsdp_shard(ema_model, average_replicated_grads=False, param_dtype=param_dtype)
    optimizer = build_optimizer(model, cfg)
    state: dict[str, Any] = {"images_seen": 0, "wall_seconds": 0.0, "first_loss": None, "step": 0}
    if is_main_process():
        remove_partial_checkpoints(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, ema_model)
        progress.message(f"{run_dir}: resuming from step {state['step']}/{steps}")
    start_step = state["step"]
    # metrics.jsonl and the trackers cfg.log names (train/loggers), on the process that writes files
    metrics = open_loggers(cfg, run_dir, resolved, start_step) if is_main_process() else None
    train_model = torch.compile(train_model) if cfg.compile else train_model

    def log(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(row)

    def heldout() -> dict[str, Any]:
        # one pass: the EMA model sees the images decoded for the live one; each rank evaluates its
        # share of every held-out batch and the sums are all-reduced
        models = {"": model, **({"ema_": ema_model} if ema_model is not None else {})}
        batches = DeviceFeed(eval_source.heldout_batches(eval_batch_size, part, uint8=True, pin_memory=pin),
                             device, getattr(eval_source, "normalize", None), memory_format)
        sums = heldout_sums(models, batches, device, cfg.precision, channels_last, sigmoid=cfg.loss == "sigmoid")
        out = {}
        for prefix, s in sums.items():
            out.update({f"{prefix}heldout_{k}": v for k, v in means(all_reduce_sums(s)).items()})
        return out

    def position(step: int) -> dict[str, Any]:
        return {"step": step, "images_seen": step * cfg.batch_size,
                "train_flops": step * cfg.batch_size * flops_per_image,
                "wall_seconds": state["wall_seconds"] + time.monotonic() - t_start}

    # ---- the loop -------------------------------------------------------------------------
    model.train()
    micro_batches = cfg.grad_accum_steps
    batches = DeviceFeed(source.train_batches(cfg.batch_size, start_step, part, uint8=True, pin_memory=pin),
                         device, getattr(source, "normalize", None), memory_format)
    t_start = t_log = t_ckpt = time.monotonic()
    # a log row averages the steps since the last one, also when a resume falls between them
    loss_sum = torch.tensor(float(state.get("loss_sum_since_log", 0.0)), device=device)
    steps_since_log = int(state.get("steps_since_log", 0))
    steps_timed = 0  # steps since t_log in this process (images/s)
    status = "done"
    step = start_step
    for step in range(start_step, steps):
        signals.check()  # a SIGTERM whose interrupt a library swallowed still stops the run here
        images, labels = next(batches)  # this rank's share of global batch k, on the device
        if is_distributed():  # every rank its own dropout / drop-path masks, a function of the step
            torch.manual_seed(rank_seed(cfg.seed, rank(), step))
        lr = lr_at(step, steps, warmup_steps, cfg.lr)
        set_lr(optimizer, lr)
        for passes in range(sam_passes):  # SAM (sam.py): the same micro-batches again at w + eps
            if passes == 1:
                perturbation = sam_ascend_(model, cfg.sam_rho)
            for i, (x, y) in enumerate(zip(images.chunk(micro_batches), labels.chunk(micro_batches))):
                # gradients cross ranks once per pass, after its last micro-batch
                with gradient_sync(train_model, model, enabled=i == micro_batches - 1):
                    with autocast(device.type, cfg.precision):
                        logits = train_model(x)
                    # equal micro-batches: the mean of their mean losses is the full batch's mean loss
                    loss = training_loss(logits, y, cfg.loss, cfg.label_smoothing) / micro_batches
                    loss.backward()
                if passes == 0:
                    loss_sum += loss.detach()
            if passes == 1:
                sam_restore_(perturbation)  # the step uses the gradient taken at w + eps
        if cfg.optimizer == "adamw" and cfg.grad_clip_norm > 0:
            clip_global_norm_(model, cfg.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_model is not None:
            update_ema(ema_model, model, cfg.ema_decay, step)
        steps_since_log += 1
        steps_timed += 1
        if state["first_loss"] is None:
            state["first_loss"] = all_reduce_sum([float(loss_sum)])[0] / world_size()
        done = step + 1
        # time-based checkpoints: every step on 1 process; with several, rank 0's clock decides at
        # log steps, carried by the log step's all-reduce (no extra collective, no extra sync)
        clock_due = bool(cfg.checkpoint_every_seconds) and time.monotonic() - t_ckpt >= cfg.checkpoint_every_seconds
        due_time = clock_due and not is_distributed()
        if done % cfg.log_every_steps == 0 or done == steps:
            loss_total, due_votes = all_reduce_sum([float(loss_sum), float(clock_due and is_main_process())])
            due_time = due_time or due_votes > 0
            mean_loss = loss_total / world_size() / steps_since_log
            now = time.monotonic()
            ips = steps_timed * cfg.batch_size / max(now - t_log, 1e-9)
            log({"kind": "train", **position(done), "loss": mean_loss, "lr": lr, "images_per_second": ips})
            progress.update(done, mean_loss, ips, (now - t_log) / steps_timed)
            t_log, steps_since_log, steps_timed = now, 0, 0
            loss_sum.zero_()
            factor = cfg.divergence_loss_factor
            if not math.isfinite(mean_loss) or (factor > 0 and mean_loss > factor * state["first_loss"]):
                status = "diverged"
                progress.message(f"{run_dir}: diverged at step {done} (loss {mean_loss:.4g}, "
                                 f"first-step loss {state['first_loss']:.4g}); lower --lr")
                break
        if cfg.eval_every_steps and done % cfg.eval_every_steps == 0 and done < steps:
            ev = heldout()
            log({"kind": "eval", **position(done), **ev})
            progress.message(_eval_line(done, steps, ev))
        due_steps = cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0
        if (due_steps or due_time) and done < steps:  # every rank: FSDP2 gathers collectively
            pending_loss = all_reduce_sum([float(loss_sum)])[0] / world_size()  # every rank resumes with the mean
            save_checkpoint(run_dir, done, model, optimizer,
                            {**state, **position(done), "loss_sum_since_log": pending_loss,
                             "steps_since_log": steps_since_log}, ema_model)
            t_ckpt = time.monotonic()

    # ---- the end: final evaluation, final checkpoint, result ------------------------------
    done = step + 1 if steps > start_step else start_step
    if status == "done":
        if "final_eval" in state:  # killed after the final checkpoint: its evaluation is stored there
            final_eval = state["final_eval"]
        else:
            final_eval = heldout()
            log({"kind": "eval", **position(done), **final_eval})
            progress.message(_eval_line(done, steps, final_eval))
            save_checkpoint(run_dir, done, model, optimizer,
                            {**state, **position(done), "final_eval": final_eval}, ema_model)
    else:
        final_eval = {"heldout_loss": None, "heldout_top1": None, "heldout_top5": None}
    wall_seconds = position(done)["wall_seconds"]
    result = {
        "status": status,
        **final_eval,
        # held-out loss is softmax cross-entropy: a model that learned nothing scores ln(classes)
        "chance_loss": math.log(model_cfg.num_classes),
        "heldout_resolution": cfg.eval_resolution or cfg.data.resolution,  # px of the held-out metrics above
        "model": model_cfg.name,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": done,
        "planned_steps": steps,
        "images_seen": done * cfg.batch_size,
        "flops_per_image": flops_per_image,
        "forward_backward_passes_per_step": sam_passes,
        "train_flops": done * cfg.batch_size * flops_per_image,
        "wall_seconds": wall_seconds,
        "skipped_images": int(source.skipped_images),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": device.type,
        "processes": world_size(),
    }
    if pretrained is not None:
        result.update(finetune_flops=result["train_flops"], pretrain_run_dir=str(pretrained.run_dir),
                      pretrain_step=pretrained.step, pretrain_train_flops=pretrained.result.get("train_flops"))
    if metrics is not None:
        metrics.close()
    if is_main_process():
        atomic_write_json(run_dir / RESULT_FILE, result)
    progress.message(f"{run_dir}: {status} after {done} steps, {wall_seconds:.1f} s; "
                     f"held-out loss {_fmt(result.get('heldout_loss'))} top-1 {_fmt(result.get('heldout_top1'))}")
    return result


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _eval_line(step: int, steps: int, ev: dict[str, Any]) -> str:
    line = (f"step {step}/{steps}: held-out loss {ev['heldout_loss']:.4f} "
            f"top-1 {ev['heldout_top1']:.3f} top-5 {ev['heldout_top5']:.3f}")
    if "ema_heldout_loss" in ev:
        line += f" | EMA loss {ev['ema_heldout_loss']:.4f} top-1 {ev['ema_heldout_top1']:.3f}"
    return line

