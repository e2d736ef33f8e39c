"""Data-parallel training across processes: torchrun or Slurm ``srun``, DDP or FSDP2.

A run started by ``torchrun --nproc_per_node=N -m convscale train ...`` (or one task per GPU under
``srun``) trains on N processes with the same numbers as one process with the same global batch:
every rank draws the deterministic global batch k and keeps its own contiguous slice of it (each
rank decodes the whole batch and throws most away: simple, and data order and resume stay exactly
those of a 1-process run; costly only when decoding dominates), gradients are averaged, and only
rank 0 writes files. Checkpoints hold full, unsharded tensors, so a run resumes on any world size.

``parallel="fsdp"`` shards parameters, gradients and optimizer state on dim 0 with FSDP2
(``fully_shard``), one unit per ``*Block`` module plus the root. FSDP2 cannot shard 0-dim
parameters (NFNet SkipInit gains): those stay replicated and their gradients are averaged by a hook.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from convscale.errors import UserError

PARALLEL_MODES = ("ddp", "fsdp")
DEFAULT_MASTER_PORT = 29500
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size`` and ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"cannot read SLURM_NODELIST={nodelist!r}; set MASTER_ADDR explicitly")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def env_from_slurm(environ: MutableMapping[str, str]) -> None:
    """Fill torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm's variables
    when torchrun's are absent (one task per device under ``srun``). Changes ``environ`` in place."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        if name in environ and not environ[name].strip().isdigit():
            raise UserError(f"{name}={environ[name]!r} is not a whole number; unset it or run under srun")
    if int(environ.get("SLURM_NTASKS", "1")) < 2:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise UserError("SLURM_PROCID and SLURM_NTASKS are set but SLURM_NODELIST is not; "
                            "run under srun, set MASTER_ADDR, or unset the SLURM_* variables")
        environ["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in environ:
        # the same port on every task of a job, different for concurrent jobs on one node
        environ["MASTER_PORT"] = str(DEFAULT_MASTER_PORT + 10 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)


def info_from_env(environ: Mapping[str, str] = os.environ) -> DistInfo:
    """The process's place from torchrun's variables (1 process when they are absent)."""
    return DistInfo(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


def init_distributed() -> bool:
    """Join the process group the environment describes (torchrun, or Slurm via ``env_from_slurm``).

    Returns True if this call created the group (the caller then owns ``shutdown``); False for a
    1-process run or when a group already exists. Backend: NCCL with CUDA, else gloo.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    env_from_slurm(os.environ)
    info = info_from_env()
    if info.world_size < 2:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return True


def shutdown(barrier: bool = True) -> None:
    """Leave the process group. Collect garbage first: destroying the group while a DDP reducer
    is still alive made about one gloo run in six abort at exit ("terminate called without an
    active exception"); callers drop their references to wrapped models before calling this.
    ``barrier=False`` after a failure (the other ranks may never arrive)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()  # nobody tears down while another rank still talks (rank 0 writing)
        dist.destroy_process_group()
    gc.collect()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return rank() == 0


def local_slice(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch (shares differ by at most one row)."""
    if not is_distributed():
        return batch
    return batch.tensor_split(world_size())[rank()]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (float64; identity without a group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_eval(r: dict[str, Any]) -> dict[str, Any]:
    """Global held-out metrics from each rank's means over its ``r["images"]`` images.

    ``top1``/``top5`` come back as exact hit counts over the total, as in a 1-process run.
    """
    if not is_distributed():
        return r
    keys = sorted(k for k in r if k != "images")
    sums = all_reduce_sum([r["images"], *(r[k] * r["images"] for k in keys)])
    n = int(round(sums[0]))
    out: dict[str, Any] = {k: (round(s) if k in ("top1", "top5") else s) / n for k, s in zip(keys, sums[1:])}
    out["images"] = n
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its ``UserError``) to every rank.

    For work with side effects on shared files (creating the run directory) that would race.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("user_error", str(e))
        except BaseException as e:  # a bug: tell the other ranks, keep rank 0's traceback
            dist.broadcast_object_list([("bug", repr(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "user_error":
        raise UserError(value)
    if kind == "bug":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def resolve_parallel(parallel: str) -> str:
    """The data-parallel mode for this world: "" in a 1-process run, else ``parallel`` ("ddp"/"fsdp")."""
    if parallel not in PARALLEL_MODES:
        raise UserError(f"parallel must be one of {list(PARALLEL_MODES)}, not {parallel!r}")
    return parallel if is_distributed() else ""


def _scalar_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def fsdp_shard(model: nn.Module, average_replicated_grads: bool = True) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` every ``*Block`` module, then the root.

    0-dim parameters stay replicated plain tensors (FSDP2 refuses them); with
    ``average_replicated_grads`` a hook averages their gradients over ranks after each backward
    (on a separate gloo/NCCL group, so its collectives never interleave with FSDP's).
    """
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # FSDP2 refuses non-contiguous (channels_last) parameters
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    scalars = set(_scalar_params(model))
    for module in model.modules():
        if module is not model and type(module).__name__.endswith("Block"):
            fully_shard(module, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    if average_replicated_grads and scalars and is_distributed():
        group = dist.new_group()
        world = world_size()

        def average(p: torch.Tensor) -> None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)

        for p in scalars:  # hooks fire in backward order, the same on every rank
            p.register_post_accumulate_grad_hook(average)
    return model


def wrap_model(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """The module to call in the training step: ``model`` itself (1 process, or FSDP2, which
    shards ``model`` in place), or a DDP wrapper around it. Parameters of ``model`` stay the
    optimizer's and the checkpoint's view."""
    mode = resolve_parallel(parallel)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        return fsdp_shard(model)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor split across ranks on some dim (an FSDP2 parameter or its gradient)."""
    return isinstance(t, DTensor) and any(isinstance(pl, Shard) for pl in t.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (in-place ops on it change the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def process_group_of(t: torch.Tensor):
    """The process group a sharded DTensor is split over (FSDP2 uses a 1-D mesh)."""
    return t.device_mesh.get_group()


def has_sharded_params(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())
