"""The data contract between the `data` stage and the trainer.

Every source is built from a ``DataConfig`` alone (``convscale.data.build_source``) and serves
batches as ``(images, labels)``: ``images`` float32 ``[B, 3, R, R]`` normalised to roughly zero
mean / unit std, ``labels`` int64 ``[B]`` in ``[0, num_classes)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Protocol

import torch

DataKind = Literal["procedural", "folder", "shards", "arrays", "digits"]
DATA_KINDS: tuple[str, ...] = ("procedural", "folder", "shards", "arrays", "digits")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are shaped.

    kind: ``procedural`` (built-in FractalDB-style stream, no download), ``folder`` (ImageFolder
    layout: one sub-folder per class), ``shards`` (WebDataset-style ``.tar`` files with
    ``.jpg``/``.png`` + ``.cls`` members; ``path`` is a file, a folder of tars or a glob),
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
    workers: int = 0  # DataLoader worker processes (0 = in the training process)
    strict: bool = False  # real data: a corrupt image is an error instead of skipped+counted
    device: str = "cpu"  # procedural: where images are generated ("cuda" on a GPU machine)

    def replace(self, **kw) -> "DataConfig":
        return dataclasses.replace(self, **kw)


class DataSource(Protocol):
    """What the trainer needs from any data source."""

    num_classes: int
    #: training images in one epoch (None = unlimited stream; epoch budgets then use ``epoch_images``)
    num_train_images: Optional[int]
    #: distinct images skipped so far because they could not be decoded (always 0 for procedural data)
    skipped_images: int

    def train_batches(self, batch_size: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches. Batch k is a deterministic function of (config seed, k,
        batch_size): starting at ``start_step=k`` yields exactly what a run from 0 yields at step k
        (that is what makes a killed run resume bit-identically)."""
        ...

    def heldout_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set, once, in a fixed order; never overlaps training images."""
        ...
