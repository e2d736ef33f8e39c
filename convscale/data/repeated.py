"""Repeated augmentation: each image of a batch seen several times under different augmentations.

The fine-tuning recipe's ``aug_repeats`` (train/config.py); steps and compute per epoch are
unchanged, distinct images per step drop ``repeats``-fold.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch

from convscale.data.config import WHOLE
from convscale.data.loading import BatchPlan, Sample, build_batches, plan_part
from convscale.errors import UserError


class RepeatedAugmentSource:
    """Repeated augmentation (Hoffer et al. 2020; Smith et al. 2023, §3) over an indexed source
    (digits, arrays, folder).

    Batch k of size B holds the B/m distinct images of the wrapped source's batch k of size B/m,
    each m times under different augmentations: repeat r of an image uses the source's own
    augmentation seed with r appended. The block for repeat r is contiguous ([all images, r=0],
    [all images, r=1], ...), so micro-batches or data-parallel shards see different copies.
    Steps per epoch are unchanged; distinct images per step drop m-fold (see config.py).
    """

    def __init__(self, source: Any, repeats: int):
        if not hasattr(source, "train_plan"):
            raise UserError("aug_repeats > 1 needs an indexed data source (digits, arrays, folder); "
                            "set aug_repeats=1 for this data kind")
        self.source, self.repeats = source, repeats
        self.num_classes = source.num_classes
        self.num_train_images = source.num_train_images

    @property
    def skipped_images(self) -> int:
        return self.source.skipped_images

    def train_plan(self, step: int, batch_size: int) -> BatchPlan:
        """The plan of batch ``step``: ``batch_size / repeats`` distinct images, ``repeats`` times each."""
        if batch_size % self.repeats:
            raise UserError(f"batch size {batch_size} must be a multiple of aug_repeats {self.repeats}")
        distinct = self.source.train_plan(step, batch_size // self.repeats).samples
        samples = tuple(Sample(s.ref, s.label, tuple(s.seed) + (r,)) for r in range(self.repeats) for s in distinct)
        return BatchPlan(samples, train=True)

    def train_batches(self, batch_size: int, start_step: int = 0, part: tuple[int, int] = WHOLE,
                      uint8: bool = False, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plans = (plan_part(self.train_plan(k, batch_size), part) for k in itertools.count(start_step))
        src = self.source
        yield from src.receive_all(build_batches(src._builder, plans, src.cfg.workers, pin_memory), uint8)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.source.normalize(images_uint8)

    def heldout_batches(self, batch_size: int, part: tuple[int, int] = WHOLE, uint8: bool = False,
                        pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.heldout_batches(batch_size, part, uint8, pin_memory)
