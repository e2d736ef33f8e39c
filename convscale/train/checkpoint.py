"""Atomic files and checkpoints that survive SIGKILL at any moment.

A checkpoint is a directory ``checkpoints/step-00000123/`` holding
  * ``model.safetensors`` (and ``ema.safetensors`` when EMA is on): the state dicts;
  * ``optimizer.safetensors``: per-parameter optimizer tensors, keyed ``<state key>/<param name>``,
    plus the torch RNG states (``rng/cpu``, ``rng/cuda``);
  * ``state.json``: step, images seen, wall seconds, first-step loss, optimizer scalars. Written last.
It is written under a temporary name and renamed into place, so a directory named ``step-*`` is
always complete; older checkpoints are removed only after a newer one is in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from convscale.errors import UserError
# atomic_write_json: the trainer (train/loop.py) imports it from here
from convscale.fileio import TMP_PREFIX, atomic_write, atomic_write_json, fsync_dir  # noqa: F401
from convscale.train.distributed import has_sharded_params, is_sharded
from convscale.train.layout import CHECKPOINT_DIR, STEP_PREFIX, checkpoint_dir


def is_main_process() -> bool:
    """True on the process that writes files: rank 0 of the process group, or, before one is
    joined, the process torchrun/Slurm calls rank 0 (always True for a plain run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: _save_safetensors(tmp, cpu, Path(path), metadata))


def _save_safetensors(tmp: Path, tensors: dict[str, torch.Tensor], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:  # an I/O error (full disk) as the OSError it is
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full (unsharded) tensors on rank 0 only, on the CPU: a checkpoint loads on any world size
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict; collective for an FSDP2 model (every rank calls it, rank 0 gets it)."""
    if has_sharded_params(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state_options())
    # clone: safetensors refuses tensors that share storage (e.g. tied weights)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """{param name: {state key: value}} with full tensors; collective for an FSDP2 model."""
    if has_sharded_params(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options()).get("state", {})
    names = _param_names(model)
    return {names[p]: pstate for p, pstate in optimizer.state.items()}


def _param_names(model: nn.Module) -> dict[torch.Tensor, str]:
    return {p: n for n, p in model.named_parameters()}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ema_model: Optional[nn.Module] = None,
    keep: int = 1,
    pinned: frozenset[int] = frozenset(),
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep`` checkpoints
    and those of the ``pinned`` steps (a cooldown trunk's branch points).

    Distributed: call it on EVERY rank (FSDP2 gathers full tensors collectively); only rank 0
    writes, and returns the path (the others return it too, unwritten).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = checkpoint_dir(run_dir, step)
    model_tensors = _model_tensors(model)
    ema_tensors = _model_tensors(ema_model) if ema_model is not None else None
    opt_state = _optimizer_state(model, optimizer)
    if not is_main_process():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=TMP_PREFIX))
    try:
        atomic_save_safetensors(tmp / "model.safetensors", model_tensors)
        if ema_tensors is not None:
            atomic_save_safetensors(tmp / "ema.safetensors", ema_tensors)
        opt_tensors: dict[str, torch.Tensor] = {"rng/cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            opt_tensors["rng/cuda"] = torch.cuda.get_rng_state()
        opt_scalars: dict[str, Any] = {}
        for name, pstate in opt_state.items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    opt_tensors[f"{key}/{name}"] = value.detach().clone()
                else:
                    opt_scalars[f"{key}/{name}"] = value
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        # safetensors has no checksum: a flipped byte in a tensor would load as a silently wrong weight
        digests = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.suffix == ".safetensors"}
        atomic_write_json(tmp / "state.json", {**state, "step": step, "optimizer_scalars": opt_scalars,
                                               "sha256": digests})
        if final.exists():  # same step written twice (a resumed run re-saving): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if checkpoint_step(old) not in pinned:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint_file(path: Path) -> None:
    """ValueError if ``path`` (a checkpoint's .safetensors) differs from the checksum its state.json holds."""
    digest = json.loads((path.parent / "state.json").read_text()).get("sha256", {}).get(path.name)
    if digest is not None and file_sha256(path) != digest:
        raise ValueError(f"{path.name} does not match its checksum in state.json")


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory ``path``."""
    return int(path.name[len(STEP_PREFIX):])


def checkpoint_at(run_dir: str | os.PathLike, step: int) -> Optional[Path]:
    """The complete checkpoint of ``run_dir`` at ``step``, or None."""
    path = checkpoint_dir(run_dir, step)
    return path if (path / "state.json").is_file() else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary leftovers of a killed write are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [d for d in root.iterdir() if d.name.startswith(STEP_PREFIX) and (d / "state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    root = Path(run_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if has_sharded_params(model):  # FSDP2: every rank read the full file; each keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(tensors)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_model: Optional[nn.Module] = None,
) -> dict[str, Any]:
    """Restore model, EMA, optimizer and RNG state in place; returns ``state.json``'s dict.

    A checkpoint that cannot be read (edited or damaged by hand: a write of ours is atomic) is a
    UserError naming it; the model may then be half-loaded, so the caller must not go on.
    """
    try:
        return _load_checkpoint(path, model, optimizer, ema_model)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
            raise  # a full or failing disk is not the checkpoint's fault
        detail = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}: {detail}); delete that folder and "
                        f"rerun the same command (the run then resumes from an earlier checkpoint or starts over)") from None


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema_model: Optional[nn.Module]) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0 \
            or not isinstance(state.get("wall_seconds"), (int, float)) or not isinstance(state.get("images_seen"), int) \
            or "first_loss" not in state:
        raise ValueError("state.json lacks step, images_seen, wall_seconds or first_loss")
    for name, digest in state.pop("sha256", {}).items():  # checkpoints of older versions have none
        if file_sha256(path / name) != digest:
            raise ValueError(f"{name} does not match its checksum in state.json")
    _load_model(model, load_file(path / "model.safetensors"))
    if ema_model is not None:
        _load_model(ema_model, load_file(path / "ema.safetensors"))
    tensors = load_file(path / "optimizer.safetensors")
    params = dict(model.named_parameters())
    # torch keeps Adam's "step" on the CPU unless the optimizer is fused/capturable
    step_on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for key, value in tensors.items():
        if key == "rng/cpu":
            torch.set_rng_state(value)
        elif key == "rng/cuda":
            if torch.cuda.is_available():
                torch.cuda.set_rng_state(value)
        else:
            skey, pname = key.split("/", 1)
            p = params[pname]
            on_device = skey != "step" or step_on_device
            value = value.to(p.device) if on_device else value
            if is_sharded(p) and value.shape == p.shape:  # FSDP2: keep this rank's shard of it
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            optimizer.state[p][skey] = value
    for key, value in state.pop("optimizer_scalars", {}).items():
        skey, pname = key.split("/", 1)
        optimizer.state[params[pname]][skey] = value
    return state
