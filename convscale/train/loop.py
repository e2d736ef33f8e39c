"""The training loop: one run from a TrainConfig to result.json, resumable from its run directory.

``_run`` reads top to bottom: resolve (device, data, model config, budget, schedule) -> claim the
run directory -> build the modules (trainee.py) -> restore the latest checkpoint -> train (one
update, a log row, evaluations, checkpoints per step) -> finish (final evaluation, result.json).

Run directory:
  config.json     resolved TrainConfig + model config + steps + flops_per_image (written first)
  metrics.jsonl   one row per log step ("kind": "train") and per evaluation ("kind": "eval")
  checkpoints/    the latest checkpoint (see checkpoint.py)
  result.json     written last: status "done" | "diverged" and the final held-out metrics
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from convscale import __version__, signals
from convscale.data import build_source
from convscale.data.config import DataSource, resolve_workers
from convscale.data.feed import DeviceFeed
from convscale.errors import UserError
from convscale.models import config_at_resolution, get_config
from convscale.models.base import config_to_dict
from convscale.fileio import atomic_write_json, atomic_write_text, jsonl_line, read_jsonl
from convscale.train.checkpoint import (
    is_main_process,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from convscale.train.distributed import (
    all_reduce_sum,
    all_reduce_sums,
    init_distributed,
    is_distributed,
    local_part,
    rank,
    rank_seed,
    run_on_main,
    shutdown,
    world_size,
)
from convscale.train import divergence
from convscale.train.config import TrainConfig, budget_to_steps, build_schedule
from convscale.data.repeated import RepeatedAugmentSource
from convscale.train.evaluate import heldout_sums, means
from convscale.train.finetune import PretrainedRun, find_pretrained
from convscale.train.memory import peak_memory_bytes, physical_memory_bytes
from convscale.train.loggers import open_loggers
from convscale.train.loggers.fanout import FanOut
from convscale.train.metrics import Progress
from convscale.train.precision import resolve_precision
from convscale.train.rundir import RESULT_FILE, lock_run_dir, prepare_run_dir, read_run_json
from convscale.train.optim import set_lr
from convscale.train.schedules import Schedule
from convscale.train.trainee import Trainee, build_trainee, optimizer_update

from convscale.status import EXIT_DIVERGED  # noqa: F401  (`convscale train`'s exit code of a diverged run)


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
    """The run in its steps: resolve, claim the run directory, build, restore, train, finish."""
    plan = _resolve(cfg, restart, source)
    finished = run_on_main(functools.partial(_claim_run_dir, plan, restart, locks))  # one rank touches files
    if finished is not None:
        plan.progress.message(f"{plan.run_dir}: already finished ({finished['status']}); "
                              f"result: {json.dumps(finished)}")
        return finished
    trainee = build_trainee(plan.cfg, plan.model_cfg, plan.device, plan.source.num_classes, plan.pretrained)
    loop = _restore(plan, trainee)
    done = loop.start_step if loop.status == "diverged" else _train(plan, trainee, loop)
    return _finish(plan, trainee, loop, done)


# ---- resolve: machine, data, model, budget --------------------------------------------------


@dataclass
class RunPlan:
    """What a run resolves before it builds a model: its config, device, data and budget."""

    cfg: TrainConfig  # precision resolved ("auto" -> bf16 | fp32)
    run_dir: Path
    device: torch.device
    part: Any  # this rank's share of every batch (distributed.local_part)
    pretrained: Optional[PretrainedRun]
    source: DataSource
    eval_source: DataSource  # held-out images at eval_resolution (the training source if the same)
    model_cfg: Any
    steps: int  # the schedule's length
    schedule: Schedule
    flops_per_image: float  # training FLOPs per image (3 x forward, x2 with SAM)
    resolved: dict[str, Any]  # what config.json holds
    progress: Progress

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def end_step(self) -> int:
        """Where training stops: the schedule's end, or a trunk's ``stop_at_step`` before it."""
        return min(self.steps, self.cfg.stop_at_step or self.steps)


def _check_machine(cfg: TrainConfig) -> None:
    if cfg.batch_size % (world_size() * cfg.grad_accum_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be a multiple of processes ({world_size()}) "
                        f"x grad_accum_steps ({cfg.grad_accum_steps}); change --batch-size")
    batch_bytes = cfg.batch_size * 3 * cfg.data.resolution**2 * 4  # one float32 global batch (every rank builds it)
    if batch_bytes > physical_memory_bytes():
        raise UserError(f"one batch of {cfg.batch_size} images at {cfg.data.resolution} px takes "
                        f"{batch_bytes / 2**30:.3g} GiB, more than this machine's memory; lower --batch-size")


def _resolve(cfg: TrainConfig, restart: bool, source: Optional[DataSource]) -> RunPlan:
    cfg.validate()
    _check_machine(cfg)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        configure_cuda()
    run_dir = Path(cfg.run_dir)
    cfg = cfg.replace(precision=_precision_for(cfg, run_dir, device.type, restart))  # "auto" -> bf16 | fp32

    get_config(cfg.model, **cfg.model_overrides)  # a bad model name fails before data is loaded
    ft = cfg.finetune
    pretrained = find_pretrained(ft.init_from, ft.init_from_ema) if ft.init_from else None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    data_cfg = cfg.data.replace(workers=resolve_workers(cfg.data, device.type, local_processes))
    source = source if source is not None else build_source(data_cfg)
    if ft.aug_repeats > 1:
        source = RepeatedAugmentSource(source, ft.aug_repeats)
    model_cfg = config_at_resolution(cfg.model, cfg.data.resolution, num_classes=source.num_classes,
                                     **cfg.model_overrides)
    model_cfg.check_resolution(cfg.data.resolution)
    eval_source = source
    if ft.eval_resolution is not None and ft.eval_resolution != cfg.data.resolution:
        model_cfg.check_resolution(ft.eval_resolution)
        eval_source = build_source(data_cfg.replace(resolution=ft.eval_resolution))
    for src in {id(source): source, id(eval_source): eval_source}.values():
        if getattr(src, "num_heldout_images", None) == 0:  # found now, not by the final evaluation
            raise UserError(f"the data holds no held-out images (heldout_fraction {cfg.data.heldout_fraction} "
                            f"of {src.num_train_images} images); raise data.heldout_fraction or set data.heldout_path")
    flops_per_image = cfg.train_flops_per_image(model_cfg.forward_flops(cfg.data.resolution))
    steps = budget_to_steps(cfg, flops_per_image, source.num_train_images)
    schedule = build_schedule(cfg, steps)
    resolved = {
        "train": cfg.to_dict(),
        "model": config_to_dict(model_cfg),
        "model_name": model_cfg.name,
        "steps": steps,
        "warmup_steps": schedule.warmup_steps,
        "flops_per_image": flops_per_image,
        "train_flops": flops_per_image * cfg.batch_size * steps,
        "num_classes": source.num_classes,
        "num_train_images": source.num_train_images,
        "convscale_version": __version__,
    }
    if schedule.cooldown_start_step is not None:  # where cooldown branches would start (absent for cosine)
        resolved["cooldown_start_step"] = schedule.cooldown_start_step
    if cfg.stop_at_step is not None:
        resolved["stop_step"] = min(steps, cfg.stop_at_step)
    if pretrained is not None:
        resolved["init_from"] = pretrained.record()
    progress = Progress(steps, cfg.runtime.quiet, stream=None if is_main_process() else io.StringIO())
    return RunPlan(cfg, run_dir, device, local_part(), pretrained, source, eval_source, model_cfg, steps,
                   schedule, flops_per_image, resolved, progress)


def _claim_run_dir(plan: RunPlan, restart: bool, locks: list) -> Optional[dict[str, Any]]:
    """Lock the run directory and write or check its config.json; the stored result if finished."""
    locks.append(lock_run_dir(plan.run_dir))  # a second `convscale train` on this directory stops here
    return prepare_run_dir(plan.run_dir, plan.resolved, restart)


# ---- restore: the latest checkpoint, the metrics file -------------------------------------


@dataclass
class LoopState:
    """What the loop carries from step to step. ``state`` is what a checkpoint stores."""

    state: dict[str, Any]  # images_seen, wall_seconds, first_loss, step (and final_eval once evaluated)
    start_step: int
    metrics: Optional[FanOut]  # rank 0 only: metrics.jsonl and the trackers (train/loggers)
    loss_sum: torch.Tensor  # training loss summed since the last log row (also across a resume)
    steps_since_log: int
    steps_timed: int = 0  # steps since t_log in this process (images/s)
    status: str = "done"
    t_start: float = 0.0  # monotonic clock: this process's start of training, last log row, last checkpoint
    t_log: float = 0.0
    t_ckpt: float = 0.0


def _restore(plan: RunPlan, trainee: Trainee) -> LoopState:
    state: dict[str, Any] = {"images_seen": 0, "wall_seconds": 0.0, "first_loss": None, "step": 0}
    if is_main_process():
        remove_partial_checkpoints(plan.run_dir)
    checkpoints = list_checkpoints(plan.run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], trainee.model, trainee.optimizer, trainee.ema_model)
        plan.progress.message(f"{plan.run_dir}: resuming from step {state['step']}/{plan.steps}")
    elif plan.cfg.branch_from is not None:
        state = _start_branch(plan, trainee)
    start_step = state["step"]
    # metrics.jsonl and the trackers cfg.log names (train/loggers), on the process that writes files
    metrics = open_loggers(plan.cfg, plan.run_dir, plan.resolved, start_step) if is_main_process() else None
    if plan.cfg.compile:
        trainee.train_model = torch.compile(trainee.train_model)
    # a log row averages the steps since the last one, also when a resume falls between them
    loss_sum = torch.tensor(float(state.get("loss_sum_since_log", 0.0)), device=plan.device)
    loop = LoopState(state, start_step, metrics, loss_sum, int(state.get("steps_since_log", 0)))
    # a run with nothing left to train (a branch of a diverged trunk) times from here, not from boot
    loop.t_start = loop.t_log = loop.t_ckpt = time.monotonic()
    if "trunk_diverged_at" in state:  # a branch whose trunk diverged before its cooldown start
        loop.status = "diverged"
    return loop


#: TrainConfig fields in which a cooldown branch may differ from its trunk (besides the runtime
#: ones): its length, and what makes the trunk a trunk
BRANCH_FREE_FIELDS = frozenset({"epochs", "steps", "images", "train_flops", "stop_at_step", "keep_checkpoint_steps",
                                "branch_from"})


def _start_branch(plan: RunPlan, trainee: Trainee) -> dict[str, Any]:
    """A cooldown branch's first start: the trunk's checkpoint at this run's cooldown start, whose
    steps are this run's own (same config but for length, same schedule before its cooldown)."""
    from convscale.train.checkpoint import checkpoint_at
    from convscale.train.config import numbers_part

    cfg, start = plan.cfg, plan.schedule.cooldown_start_step
    trunk = Path(str(cfg.branch_from))
    stored = read_run_json(trunk / "config.json") if (trunk / "config.json").is_file() else None
    if stored is None:
        raise UserError(f"branch_from {trunk}: no trunk run there (no config.json); train the trunk first")
    theirs, mine = (_dotted(numbers_part(d)) for d in (stored.get("train", {}), cfg.to_dict()))
    differ = sorted(k for k in set(theirs) | set(mine) if k not in BRANCH_FREE_FIELDS and theirs.get(k) != mine.get(k))
    if differ or stored.get("warmup_steps") != plan.schedule.warmup_steps:
        what = ", ".join(differ) or f"warmup_steps {stored.get('warmup_steps')} vs {plan.schedule.warmup_steps}"
        raise UserError(f"branch_from {trunk}: the trunk differs from this run in {what}; a branch continues "
                        f"its own trunk only (give the same settings, or train without branch_from)")
    trunk_cooldown = stored.get("cooldown_start_step")
    if trunk_cooldown is None or trunk_cooldown < start:
        raise UserError(f"branch_from {trunk}: the trunk cools down from step {trunk_cooldown}, before this run's "
                        f"cooldown start {start}; branch from a trunk of at least this run's length")
    path = checkpoint_at(trunk, start)
    trunk_result = read_run_json(trunk / RESULT_FILE) if (trunk / RESULT_FILE).is_file() else None
    if path is None and trunk_result and trunk_result.get("status") == "diverged" \
            and int(trunk_result.get("steps", start)) < start:
        # this budget's run is the trunk up to its cooldown start, and the trunk diverged before it:
        # the run diverged there too (nothing to train; its curve is the trunk's)
        at = int(trunk_result["steps"])
        if is_main_process():
            _copy_trunk_metrics(trunk, plan.run_dir, at)
        plan.progress.message(f"{plan.run_dir}: its trunk {trunk} diverged at step {at}, before this run's "
                              f"cooldown start {start}: this run diverged there too")
        why = trunk_result.get("diverged_reason") or f"at step {at}"
        return {"images_seen": at * cfg.batch_size, "wall_seconds": 0.0, "first_loss": None, "step": at,
                "branch_start_step": start, "trunk_diverged_at": at,
                "diverged_reason": f"with its trunk {why}, before this run's cooldown start {start}"}
    if path is None:
        raise UserError(f"branch_from {trunk}: no checkpoint at step {start} (this run's cooldown start) yet; "
                        f"let the trunk reach it, with keep_checkpoint_steps including {start}")
    state = load_checkpoint(path, trainee.model, trainee.optimizer, trainee.ema_model)
    state.pop("final_eval", None)  # the trunk's own end, not this run's
    # this run's clock starts now: the trunk's time is the trunk's (its prefix FLOPs still count:
    # a branch stands for the whole budget run)
    state.update(wall_seconds=0.0, branch_start_step=start)
    if is_main_process():
        _copy_trunk_metrics(trunk, plan.run_dir, start)
    plan.progress.message(f"{plan.run_dir}: branching from {trunk} at step {start}/{plan.steps}")
    return state


def _dotted(train: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict with each group's fields as ``group.field`` (so a difference names its field)."""
    from convscale.train.config import GROUPS

    out = {k: v for k, v in train.items() if k not in GROUPS}
    for g in GROUPS:
        out.update({f"{g}.{k}": v for k, v in (train.get(g) or {}).items()})
    return out


def _copy_trunk_metrics(trunk: Path, run_dir: Path, step: int) -> None:
    """The trunk's metric rows up to ``step`` as the start of this branch's metrics.jsonl (its
    curve is the whole run's); nothing if the branch has rows already."""
    src, dst = trunk / "metrics.jsonl", run_dir / "metrics.jsonl"
    if not src.is_file() or dst.exists():
        return
    rows = [r for r in read_jsonl(src) if isinstance(r, dict) and int(r.get("step", 0)) <= step]
    atomic_write_text(dst, "".join(jsonl_line(r) for r in rows))


# ---- one training step ---------------------------------------------------------------------


def _train_step(plan: RunPlan, trainee: Trainee, loop: LoopState, step: int,
                images: torch.Tensor, labels: torch.Tensor) -> float:
    """One optimizer update on this rank's share of global batch ``step``; returns its lr."""
    cfg = plan.cfg
    if is_distributed():  # every rank its own dropout / drop-path masks, a function of the step
        torch.manual_seed(rank_seed(cfg.seed, rank(), step))
    lr = plan.schedule.lr(step)
    set_lr(trainee.optimizer, lr)
    optimizer_update(trainee, images, labels, cfg, plan.device.type, step, loop.loss_sum)
    loop.steps_since_log += 1
    loop.steps_timed += 1
    if loop.state["first_loss"] is None:
        loop.state["first_loss"] = all_reduce_sum([float(loop.loss_sum)])[0] / world_size()
    return lr


def _position(plan: RunPlan, loop: LoopState, step: int) -> dict[str, Any]:
    return {"step": step, "images_seen": step * plan.cfg.batch_size,
            "train_flops": step * plan.cfg.batch_size * plan.flops_per_image,
            "wall_seconds": loop.state["wall_seconds"] + time.monotonic() - loop.t_start}


def _log(loop: LoopState, row: dict[str, Any]) -> None:
    if loop.metrics is not None:
        loop.metrics.write(row)


def _log_train_row(plan: RunPlan, loop: LoopState, done: int, lr: float, clock_due: bool) -> bool:
    """Write the log row of the steps since the last one (all ranks' mean loss); mark the run
    diverged if that loss is not finite, too high or collapsed back to the start (train/divergence.py). Returns whether rank 0's clock asks for a
    checkpoint (its vote rides on the loss all-reduce: no extra collective)."""
    cfg = plan.cfg
    loss_total, due_votes = all_reduce_sum([float(loop.loss_sum), float(clock_due and is_main_process())])
    steps_in_row = loop.steps_since_log
    mean_loss = loss_total / world_size() / steps_in_row
    now = time.monotonic()
    ips = loop.steps_timed * cfg.batch_size / max(now - loop.t_log, 1e-9)
    _log(loop, {"kind": "train", **_position(plan, loop, done), "loss": mean_loss, "lr": lr, "images_per_second": ips})
    plan.progress.update(done, mean_loss, ips, (now - loop.t_log) / loop.steps_timed)
    loop.t_log, loop.steps_since_log, loop.steps_timed = now, 0, 0
    loop.loss_sum.zero_()
    why = divergence.check(loop.state, mean_loss, steps_in_row, factor=cfg.divergence_loss_factor,
                           collapse_patience_fraction=cfg.collapse_patience_fraction, total_steps=plan.steps,
                           log_every_steps=cfg.log_every_steps)
    if why is not None:
        loop.status = "diverged"
        loop.state["diverged_reason"] = f"at step {done} ({why})"  # reads after "diverged "
        plan.progress.message(f"{plan.run_dir}: diverged at step {done} ({why}); lower --lr")
    return due_votes > 0


# ---- evaluate, checkpoint -------------------------------------------------------------------


def _evaluate(plan: RunPlan, trainee: Trainee) -> dict[str, Any]:
    """Held-out metrics of the model (and ``ema_``-prefixed of the EMA model) over every rank."""
    # one pass: the EMA model sees the images decoded for the live one; each rank evaluates its
    # share of every held-out batch and the sums are all-reduced
    cfg, source = plan.cfg, plan.eval_source
    models = {"": trainee.model, **({"ema_": trainee.ema_model} if trainee.ema_model is not None else {})}
    batches = DeviceFeed(source.heldout_batches(cfg.resolved_eval_batch_size(), plan.part, uint8=True,
                                                pin_memory=plan.pin_memory),
                         plan.device, getattr(source, "normalize", None), trainee.memory_format)
    sums = heldout_sums(models, batches, plan.device, cfg.precision, trainee.channels_last,
                        sigmoid=cfg.loss == "sigmoid")
    out = {}
    for prefix, s in sums.items():
        out.update({f"{prefix}heldout_{k}": v for k, v in means(all_reduce_sums(s)).items()})
    return out


def _checkpoint(plan: RunPlan, trainee: Trainee, loop: LoopState, done: int, **extra: Any) -> None:
    """Save the state after ``done`` steps (every rank: FSDP2 gathers collectively)."""
    save_checkpoint(plan.run_dir, done, trainee.model, trainee.optimizer,
                    {**loop.state, **_position(plan, loop, done), **extra}, trainee.ema_model,
                    pinned=frozenset(plan.cfg.keep_checkpoint_steps))


# ---- the loop -------------------------------------------------------------------------------


def _train(plan: RunPlan, trainee: Trainee, loop: LoopState) -> int:
    """Train from ``loop.start_step`` to the end of the budget (or divergence); returns the steps done."""
    cfg, steps = plan.cfg, plan.end_step
    keep = set(cfg.keep_checkpoint_steps)
    trainee.model.train()
    batches = DeviceFeed(plan.source.train_batches(cfg.batch_size, loop.start_step, plan.part, uint8=True,
                                                   pin_memory=plan.pin_memory),
                         plan.device, getattr(plan.source, "normalize", None), trainee.memory_format)
    loop.t_start = loop.t_log = loop.t_ckpt = time.monotonic()
    done = loop.start_step
    for step in range(loop.start_step, steps):
        signals.check()  # a SIGTERM whose interrupt a library swallowed still stops the run here
        images, labels = next(batches)  # this rank's share of global batch k, on the device
        lr = _train_step(plan, trainee, loop, step, images, labels)
        done = step + 1
        # time-based checkpoints: every step on 1 process; with several, rank 0's clock decides at
        # log steps, carried by the log step's all-reduce (no extra collective, no extra sync)
        every_seconds = cfg.runtime.checkpoint_every_seconds
        clock_due = bool(every_seconds) and time.monotonic() - loop.t_ckpt >= every_seconds
        due_time = clock_due and not is_distributed()
        if done % cfg.log_every_steps == 0 or done == steps:
            due_time = _log_train_row(plan, loop, done, lr, clock_due) or due_time
            if loop.status == "diverged":
                break
        if cfg.eval_every_steps and done % cfg.eval_every_steps == 0 and done < steps:
            ev = _evaluate(plan, trainee)
            _log(loop, {"kind": "eval", **_position(plan, loop, done), **ev})
            plan.progress.message(_eval_line(done, steps, ev))
        due_steps = (cfg.runtime.checkpoint_every_steps and done % cfg.runtime.checkpoint_every_steps == 0) \
            or done in keep
        if (due_steps or due_time) and done < steps:
            pending_loss = all_reduce_sum([float(loop.loss_sum)])[0] / world_size()  # every rank resumes with the mean
            _checkpoint(plan, trainee, loop, done, loss_sum_since_log=pending_loss,
                        steps_since_log=loop.steps_since_log)
            loop.t_ckpt = time.monotonic()
    return done


# ---- the end: final evaluation, final checkpoint, result -----------------------------------


def _finish(plan: RunPlan, trainee: Trainee, loop: LoopState, done: int) -> dict[str, Any]:
    cfg = plan.cfg
    if loop.status == "done":
        if "final_eval" in loop.state:  # killed after the final checkpoint: its evaluation is stored there
            final_eval = loop.state["final_eval"]
        else:
            final_eval = _evaluate(plan, trainee)
            _log(loop, {"kind": "eval", **_position(plan, loop, done), **final_eval})
            plan.progress.message(_eval_line(done, plan.steps, final_eval))
            _checkpoint(plan, trainee, loop, done, final_eval=final_eval)
    else:
        final_eval = {"heldout_loss": None, "heldout_top1": None, "heldout_top5": None}
    wall_seconds = _position(plan, loop, done)["wall_seconds"]
    result = {
        "status": loop.status,
        **final_eval,
        # held-out loss is softmax cross-entropy: a model that learned nothing scores ln(classes)
        "chance_loss": math.log(plan.model_cfg.num_classes),
        "heldout_resolution": cfg.finetune.eval_resolution or cfg.data.resolution,  # px of the held-out metrics above
        "model": plan.model_cfg.name,
        "params": sum(p.numel() for p in trainee.model.parameters()),
        "steps": done,
        "planned_steps": plan.end_step,
        "schedule_steps": plan.steps,
        "images_seen": done * cfg.batch_size,
        "flops_per_image": plan.flops_per_image,
        "forward_backward_passes_per_step": cfg.passes_per_step,
        "train_flops": done * cfg.batch_size * plan.flops_per_image,
        "wall_seconds": wall_seconds,
        "skipped_images": int(plan.source.skipped_images),
        "peak_memory_bytes": peak_memory_bytes(plan.device),
        "device": plan.device.type,
        "processes": world_size(),
    }
    if loop.status == "diverged":  # what stopped it, for the sweep's log line
        result["diverged_reason"] = loop.state.get("diverged_reason", "")
    pretrained = plan.pretrained
    if pretrained is not None:
        result.update(finetune_flops=result["train_flops"], pretrain_run_dir=str(pretrained.run_dir),
                      pretrain_step=pretrained.step, pretrain_train_flops=pretrained.result.get("train_flops"))
    if loop.metrics is not None:
        loop.metrics.close()
    if is_main_process():
        atomic_write_json(plan.run_dir / RESULT_FILE, result)
    plan.progress.message(f"{plan.run_dir}: {loop.status} after {done} steps, {wall_seconds:.1f} s; "
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

