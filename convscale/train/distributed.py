"""Data-parallel training across processes: torchrun or Slurm ``srun``, DDP or FSDP2.

A run started by ``torchrun --nproc_per_node=N -m convscale train ...`` (or one task per GPU under
``srun``) trains on N processes with the same numbers as one process with the same global batch:
every rank builds only its own contiguous share of the deterministic global batch k (the data
sources take a ``part``; the shares together are the 1-process batch, so data order and resume
stay those of a 1-process run), gradients are averaged (once per step: micro-batches before the
last accumulate without communication), and only rank 0 writes files. Checkpoints hold full,
unsharded tensors, so a run resumes on any world size.

Collectives run on the device the backend serves (NCCL: the rank's GPU; gloo: the CPU).

``parallel="fsdp"`` shards parameters, gradients and optimizer state on dim 0 with FSDP2
(``fully_shard``), one unit per residual block (a family's ``traits.block_types``, the same blocks activation
checkpointing wraps) plus the root; under bf16 the all-gathers move
bf16 parameters and gradients are reduced in fp32. FSDP2 cannot shard 0-dim parameters (NFNet
SkipInit gains): those stay replicated and their gradients are averaged by a hook.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from convscale.models import is_residual_block

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
    when torchrun's are absent and this process is one task of an ``srun`` step with 2+ tasks.
    Changes ``environ`` in place.

    Only a job STEP's variables count (``SLURM_STEP_NUM_TASKS``, set by srun): a batch script
    also has SLURM_PROCID=0 and SLURM_NTASKS=N (the allocation's tasks), and a plain
    ``convscale train`` there, or a local sweep's cells, would wait forever for ranks that
    were never started.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        if name in environ and not environ[name].strip().isdigit():
            raise UserError(f"{name}={environ[name]!r} is not a whole number; unset it or run under srun")
    step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if step_tasks < 2:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = str(step_tasks)
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


#: variables that make a process join a process group; a 1-process child must not inherit them
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_LOCALID",
                      "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_STEPID")


def single_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the launcher variables: a child started from it is a 1-process run
    even when this process is one rank of torchrun or one task of an srun step."""
    return {k: v for k, v in environ.items() if k not in LAUNCHER_VARIABLES}


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device this rank drives: ``local_rank`` when the node's GPUs are all visible, 0
    when the task sees one GPU (Slurm ``--gpus-per-task=1`` hides the others)."""
    if visible_devices < 1:
        raise UserError("this machine has no visible CUDA device; unset CUDA_VISIBLE_DEVICES limits or run on CPU")
    if local_rank < visible_devices:
        return local_rank
    if visible_devices == 1:
        return 0
    raise UserError(f"local rank {local_rank} sees only {visible_devices} GPUs; give each task one GPU "
                    f"(srun --gpus-per-task=1) or all of the node's (one task per GPU)")


def info_from_env(environ: Mapping[str, str] = os.environ) -> DistInfo:
    """The process's place from torchrun's variables (1 process when they are absent)."""
    return DistInfo(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


def init_distributed() -> bool:
    """Join the process group the environment describes (torchrun, or Slurm via ``env_from_slurm``).

    Returns True if this call created the group (the caller then owns ``shutdown``); False for a
    plain run (no launcher variables) or when a group already exists. Backend: NCCL with CUDA,
    else gloo. A 1-process torchrun joins a group of one too: it takes the data-parallel path
    (DDP, collectives) with one GPU, which is how ``benchmarks/gpu_check.sh`` checks NCCL.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    env_from_slurm(os.environ)
    if "RANK" not in os.environ:
        return False
    info = info_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_device_index(info.local_rank, torch.cuda.device_count()))
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
    """True in a process group (torchrun/srun, any size, one included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return rank() == 0


def local_part() -> tuple[int, int]:
    """This rank's part of every global batch: ``(rank, world size)``; (0, 1) without a group."""
    return (rank(), world_size()) if is_distributed() else (0, 1)


def collective_device(backend: Optional[str] = None) -> torch.device:
    """Where tensors for the default group's collectives must live: NCCL serves only CUDA tensors
    (the rank's current GPU), gloo the CPU. ``backend``: the group's (read from it by default)."""
    backend = backend if backend is not None else str(dist.get_backend())
    if "nccl" in backend.lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (float64; identity without a group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64).to(collective_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    """The same dict with every value summed over ranks (one collective; identity without a group)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce_sum([float(sums[k]) for k in keys])))


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


def fsdp_shard(model: nn.Module, average_replicated_grads: bool = True,
               param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` every residual block (``is_residual_block``), then the root.

    ``param_dtype`` (bf16 runs): parameters are all-gathered and used in that dtype (half the
    bytes of fp32), gradients reduced in fp32; the optimizer keeps fp32 shards.
    0-dim parameters stay replicated plain fp32 tensors (FSDP2 refuses them); with
    ``average_replicated_grads`` a hook averages their gradients over ranks after each backward
    that syncs gradients (``gradient_sync``), on a separate group, so its collectives never
    interleave with FSDP's.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # FSDP2 refuses non-contiguous (channels_last) parameters
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    scalars = set(_scalar_params(model))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for module in model.modules():
        if module is not model and is_residual_block(module):
            fully_shard(module, ignored_params=scalars, mp_policy=policy)
    fully_shard(model, ignored_params=scalars, mp_policy=policy)
    if average_replicated_grads and scalars and is_distributed():
        group = dist.new_group()
        world = world_size()

        def average(p: torch.Tensor) -> None:
            if getattr(model, _SYNC_FLAG, True):
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(world)

        for p in scalars:  # hooks fire in backward order, the same on every rank
            p.register_post_accumulate_grad_hook(average)
    return model


_SYNC_FLAG = "_convscale_gradient_sync"


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside communicate gradients only if ``enabled``: the micro-batches before
    a step's last one accumulate locally (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)
    and the last one reduces the sum once. ``train_model``: what ``wrap_model`` returned (maybe
    compiled); ``model``: the module it wraps."""
    if enabled or not is_distributed():
        yield
        return
    ddp = getattr(train_model, "_orig_mod", train_model)  # torch.compile keeps the wrapped module there
    if hasattr(ddp, "no_sync"):
        with ddp.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        setattr(model, _SYNC_FLAG, False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            setattr(model, _SYNC_FLAG, True)
        return
    yield


def rank_seed(seed: int, rank_: int, step: int) -> int:
    """The seed of rank ``rank_``'s training randomness (dropout, stochastic depth) at ``step`` of a
    multi-process run: distinct per rank (every rank sees other images, so its masks must differ
    too) and a function of the step, so a resumed run draws what an uninterrupted one does."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + (rank_ + 1) * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % 2**64
    return h % 2**63


def wrap_model(model: nn.Module, parallel: str, device: torch.device,
               param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The module to call in the training step: ``model`` itself (1 process, or FSDP2, which
    shards ``model`` in place, gathering in ``param_dtype``), or a DDP wrapper around it.
    Parameters of ``model`` stay the optimizer's and the checkpoint's view."""
    mode = resolve_parallel(parallel)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        return fsdp_shard(model, param_dtype=param_dtype)
    return model


def _dtensor_module():
    """``torch.distributed.tensor`` if something imported it, else None. It is not imported here:
    it takes ~0.75 s (sympy), paid by every sweep cell, and no DTensor can exist before it is."""
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor split across ranks on some dim (an FSDP2 parameter or its gradient)."""
    m = _dtensor_module()
    return m is not None and isinstance(t, m.DTensor) and any(isinstance(pl, m.Shard) for pl in t.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (in-place ops on it change the DTensor), else ``t``."""
    m = _dtensor_module()
    return t.to_local() if m is not None and isinstance(t, m.DTensor) else t


def process_group_of(t: torch.Tensor):
    """The process group a sharded DTensor is split over (FSDP2 uses a 1-D mesh)."""
    return t.device_mesh.get_group()


def has_sharded_params(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())
