"""How long a sweep will take: a short measured throughput probe, and device-hours on reference hardware.

The probe times a few real training steps (forward + backward + SGD update, the study's precision
and batch size, random images) of each model on this machine, a few batches of the study's data
source, and one whole one-step `convscale train` run (the fixed cost of each cell: start-up, set-up,
final evaluation). A cell's estimate is that fixed cost plus its images at the measured rates. It
assumes the machine's load stays as it was during the probe, and that N jobs at once scale N-fold.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

#: Peak dense throughput (FLOP/s) of reference devices. Sources: NVIDIA H100 SXM datasheet
#: (989.4 TFLOP/s bf16 dense tensor core; 1979 is with 2:4 sparsity), Google Cloud TPU v4 docs
#: (275 TFLOP/s bf16 per chip, two TensorCores per chip -> 137.5 per core; the paper counts cores).
REFERENCE_DEVICES: dict[str, tuple[float, str]] = {
    "h100": (989.4e12, "NVIDIA H100 SXM GPU, bf16 dense peak 989.4 TFLOP/s"),
    "tpu-v4-core": (137.5e12, "TPU-v4 core, bf16 peak 137.5 TFLOP/s (275 per chip, 2 cores per chip)"),
}
#: Model FLOPs utilisation assumed for reference hardware; large ConvNets/ViTs typically reach 30-50 %.
DEFAULT_MFU = 0.4
#: Seconds a `convscale train` subprocess spends starting when not measured (``probe_startup``).
STARTUP_SECONDS = 3.0


@dataclass(frozen=True)
class ModelProbe:
    """Measured training throughput of one model on this machine."""

    model: str
    images_per_second: float
    steps_timed: int
    seconds_timed: float
    threads: int
    device: str
    precision: str


def reference_device_hours(train_flops: float, device: str, mfu: float = DEFAULT_MFU) -> float:
    """Device-hours to do ``train_flops`` on a reference device at ``mfu`` of its peak."""
    peak, _ = REFERENCE_DEVICES[device]
    return train_flops / (peak * mfu) / 3600.0


def default_threads(jobs: int) -> int:
    """Torch threads per job when ``jobs`` CPU runs share this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def probe_model(
    name: str,
    batch_size: int,
    resolution: int,
    num_classes: int,
    precision: str = "bf16",
    channels_last: Optional[bool] = None,
    model_overrides: Optional[dict[str, Any]] = None,
    seconds: float = 1.0,
    max_steps: int = 20,
    threads: Optional[int] = None,
    activation_checkpointing: bool = False,
) -> ModelProbe:
    """Time training steps of ``name`` for about ``seconds`` (after one untimed warm-up step).

    ``batch_size``: the micro-batch one process steps on (the global batch over processes and
    accumulation steps); ``channels_last`` None: NHWC for NFNets on the CPU only, as in training."""
    import torch

    from convscale.models import get_config
    from convscale.models.layers import to_channels_last
    from convscale.train.memory import enable_activation_checkpointing

    device = "cuda" if torch.cuda.is_available() else "cpu"
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = get_config(name, num_classes=num_classes, **(model_overrides or {}))
        torch.manual_seed(0)
        model = cfg.build().to(device)
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        x = torch.randn(batch_size, 3, resolution, resolution, device=device)
        if cfg.traits.channels_last(channels_last, device):
            model = to_channels_last(model)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        dtype = torch.bfloat16 if precision == "bf16" else None

        def step() -> None:
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        for _ in range(2):  # warm-up: allocations, kernel selection (the first steps are slow)
            step()
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_steps and (len(times) < 3 or time.perf_counter() - start < seconds):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        # the median step, not the mean: on a shared machine a few steps stall behind other processes
        step_seconds = sorted(times)[len(times) // 2]
    finally:
        torch.set_num_threads(old_threads)
    return ModelProbe(
        model=cfg.name,
        images_per_second=batch_size / step_seconds,
        steps_timed=len(times),
        seconds_timed=sum(times),
        threads=threads or old_threads,
        device=device,
        precision=precision,
    )


def probe_data(data_cfg, batch_size: int, batches: int = 4, threads: Optional[int] = None) -> float:
    """Images per second the study's training data source delivers (after one untimed batch)."""
    import torch

    from convscale.data import build_source

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        it = iter(build_source(data_cfg).train_batches(batch_size))
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(old_threads)


def probe_startup(train_config, threads: Optional[int] = None) -> float:
    """Seconds of a whole one-step `convscale train` run of ``train_config`` in a fresh process:
    import, data and model set-up, the final held-out evaluation, result files. Each cell pays it once."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory(prefix="convscale-probe-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = train_config.replace(run_dir=str(run_dir), steps=1, epochs=None, images=None, train_flops=None,
                                   warmup_steps=0, quiet=True)
        (Path(tmp) / "config.json").write_text(cfg.to_json())
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "convscale", "train", "--config", str(Path(tmp) / "config.json"),
                               "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"one-step probe run failed with exit code {proc.returncode}: {last}")
    return seconds


def estimate_cell_seconds(
    images: int,
    model_images_per_second: float,
    data_images_per_second: Optional[float],
    startup_seconds: float = STARTUP_SECONDS,
) -> float:
    """Wall seconds of one cell: start-up plus each image's model step and data time (serial)."""
    per_image = 1.0 / model_images_per_second
    if data_images_per_second:
        per_image += 1.0 / data_images_per_second
    return startup_seconds + images * per_image
