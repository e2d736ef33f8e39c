"""Sources whose images can be addressed by index (folders, arrays, digits).

Training position ``p = k * batch_size + j`` of batch ``k`` is image ``perm_e[p mod N]`` of epoch
``e = p // N``, where ``perm_e`` is a permutation seeded by ``(seed, e)``; that image is
augmented with the seed ``(seed, e, index)``. So batch ``k`` needs no history and a resumed run
sees the very batches of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from convscale.data.config import DataConfig
from convscale.data.loading import (
    TAG_AUGMENT,
    TAG_PERMUTE,
    BatchBuilder,
    BatchPlan,
    ImageReader,
    PlannedSource,
    Sample,
    chunked,
    rng_for,
)
from convscale.data.transforms import TransformSpec


class IndexedSource(PlannedSource):
    """Training and held-out lists of (reference, label), served by seeded per-epoch permutation."""

    def __init__(
        self,
        cfg: DataConfig,
        reader: ImageReader,
        spec: TransformSpec,
        train_refs: Sequence[Any],
        train_labels: np.ndarray,
        heldout_refs: Sequence[Any],
        heldout_labels: np.ndarray,
        num_classes: int,
    ):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.num_classes = num_classes
        self.num_train_images = len(train_refs)
        self.num_heldout_images = len(heldout_refs)
        self._train_refs, self._train_labels = train_refs, np.asarray(train_labels, dtype=np.int64)
        self._heldout_refs, self._heldout_labels = heldout_refs, np.asarray(heldout_labels, dtype=np.int64)
        self._builder = BatchBuilder(reader, spec, cfg.strict)
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # consecutive batches share an epoch: keep the last one
            self._perm = rng_for(self.cfg.seed, TAG_PERMUTE, epoch).permutation(self.num_train_images)
            self._perm_epoch = epoch
        return self._perm

    def train_plan(self, step: int, batch_size: int) -> BatchPlan:
        """The plan of training batch ``step`` (public so tests and tools can inspect it)."""
        n = self.num_train_images
        samples = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(p, n)
            i = int(self._permutation(epoch)[offset])
            seed = (self.cfg.seed, TAG_AUGMENT, epoch, i)
            samples.append(Sample(self._train_refs[i], int(self._train_labels[i]), seed))
        return BatchPlan(tuple(samples), train=True)

    def _train_plans(self, batch_size: int, start_step: int) -> Iterator[BatchPlan]:
        step = start_step
        while True:
            yield self.train_plan(step, batch_size)
            step += 1

    def _heldout_plans(self, batch_size: int) -> Iterator[BatchPlan]:
        samples = [Sample(r, int(y), None) for r, y in zip(self._heldout_refs, self._heldout_labels)]
        for chunk in chunked(samples, batch_size):
            yield BatchPlan(chunk, train=False)
