"""The data contract between the `data` stage and the trainer.

Every source is built from a ``DataConfig`` alone (``convscale.data.build_source``) and serves
batches as ``(images, labels)``: ``images`` float32 ``[B, 3, R, R]`` normalised to roughly zero
mean / unit std, ``labels`` int64 ``[B]`` in ``[0, num_classes)``; with ``uint8=True`` the images
are the raw uint8 pixels (a quarter of the bytes to pin and copy to a GPU) and
``source.normalize`` turns them into the float batch on whatever device they are (a source
with no uint8 form may serve its float images instead).

``part=(i, n)``: only share ``i`` of ``n`` of every batch is built (``part_bounds``: contiguous
rows, as ``torch.tensor_split``), so each of n data-parallel ranks decodes only its own images;
the n shares of batch k, concatenated, are the whole batch k.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Optional, Protocol

if TYPE_CHECKING:  # type hints only: a config (and a sweep's status) loads no torch
    import torch

#: the whole batch: ``part=(index, count)`` with one part
WHOLE: tuple[int, int] = (0, 1)

DataKind = Literal["procedural", "folder", "shards", "arrays", "digits"]
DATA_KINDS: tuple[str, ...] = ("procedural", "folder", "shards", "arrays", "digits")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are shaped.

    kind: ``procedural`` (built-in FractalDB-style stream, no download), ``folder`` (ImageFolder
    layout: one sub-folder per class), ``shards`` (WebDataset-style ``.tar`` files with
    ``.jpg``/``.png`` + ``.cls`` members; ``path`` is a file, a folder of tars, a glob or a WebDataset brace spec
    such as ``train-{000000..000999}.tar``, several joined by ``::``),
    ``arrays`` (an ``.npz`` with ``images`` uint8 ``[N,H,W,C]`` or ``[N,H,W]`` and ``labels``),
    ``digits`` (scikit-learn's bundled handwritten digits, a real 10-class image set).
    """

    kind: str = "procedural"
    path: Optional[str] = None
    heldout_path: Optional[str] = None  # separate held-out data; else a fraction is held out
    heldout_fraction: float = 0.01  # real data without heldout_path: this share, chosen by seed
    heldout_images: int = 2048  # procedural: size of the fixed held-out set
    num_classes: int = 1000  # procedural: classes to draw; real data: read from the data
    resolution: int = 32  # side length in pixels of the images fed to the model
    seed: int = 0  # data seed: which images (procedural) / which shuffles (real data)
    workers: int = -1  # DataLoader worker processes; 0 = in the training process; -1 = auto (resolve_workers)
    strict: bool = False  # real data: a corrupt image is an error instead of skipped+counted
    device: str = "cpu"  # procedural: where images are generated ("cuda" on a GPU machine)

    def replace(self, **kw) -> "DataConfig":
        return dataclasses.replace(self, **kw)


#: DataLoader workers per training process on a GPU machine when ``workers = -1``
AUTO_GPU_WORKERS = 8


def resolve_workers(cfg: DataConfig, device_type: str, local_processes: int = 1,
                    cpu_count: Optional[int] = None) -> int:
    """Worker processes for ``workers = -1``: none on a CPU-only machine (the cores train), none
    for procedural data generated on the GPU itself, else up to ``AUTO_GPU_WORKERS`` per training
    process, sharing the node's cores among its ``local_processes``. An explicit count is kept."""
    if cfg.workers >= 0:
        return cfg.workers
    if device_type != "cuda" or (cfg.kind == "procedural" and cfg.device != "cpu"):
        return 0
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(AUTO_GPU_WORKERS, cores // max(1, local_processes) - 1))


def part_bounds(n: int, part: tuple[int, int]) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of share ``part = (i, k)`` of ``n`` rows: contiguous shares that differ by
    at most one row, the first ``n % k`` one longer (the split of ``torch.tensor_split``)."""
    i, k = part
    if not 0 <= i < k:
        raise ValueError(f"part {part}: need 0 <= index < count")
    q, r = divmod(n, k)
    lo = i * q + min(i, r)
    return lo, lo + q + (1 if i < r else 0)


class DataSource(Protocol):
    """What the trainer needs from any data source."""

    num_classes: int
    #: training images in one epoch (None = unlimited stream; epoch budgets then use ``epoch_images``)
    num_train_images: Optional[int]
    #: distinct images skipped so far because they could not be decoded (always 0 for procedural data)
    skipped_images: int

    def train_batches(self, batch_size: int, start_step: int = 0, part: tuple[int, int] = WHOLE,
                      uint8: bool = False, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches (share ``part`` of each). Batch k is a deterministic function
        of (config seed, k, batch_size): starting at ``start_step=k`` yields exactly what a run
        from 0 yields at step k (that is what makes a killed run resume bit-identically).
        ``pin_memory``: CPU batches come in page-locked memory (asynchronous copies to a GPU)."""
        ...

    def heldout_batches(self, batch_size: int, part: tuple[int, int] = WHOLE, uint8: bool = False,
                        pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set, once, in a fixed order; never overlaps training images. With
        ``part``: share ``part`` of each batch, one item per batch on every rank even when the
        share is empty (FSDP2 ranks gather parameters in every forward, so they must stay in step)."""
        ...

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """The float32 batch of ``uint8=True`` images, computed where they are (e.g. on the GPU)."""
        ...
