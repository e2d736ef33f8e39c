"""Shared machinery for real-image sources: seeded randomness, decoding with skip-and-count,
batch building in DataLoader workers, and a seeded stratified held-out split.

Every source turns step ``k`` into a :class:`BatchPlan` (which images, which labels, which
augmentation seeds) in the main process; :class:`BatchBuilder` decodes and transforms a whole
plan, in the main process (``workers=0``) or in a DataLoader worker. Because a plan fixes all
randomness, ``workers=2`` yields exactly the batches of ``workers=0``.

Batches travel as uint8 (a quarter of float32's bytes through the worker pipes and to the GPU),
in page-locked memory when asked (``pin_memory``: the DataLoader pins in a background thread),
and are normalised by the consumer (``normalize``), on the GPU in training.

Corrupt images: a train slot whose image cannot be decoded is refilled with another image of
the same plan that did decode (chosen by the slot's seed) under the slot's own augmentation, so
batch size and determinism survive; with ``part`` a plan is one rank's share, so the donor comes
from that share. Held-out batches simply drop such images. Either way the file name travels
back with the batch and the source counts it in ``skipped_images``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from convscale.data.config import WHOLE, part_bounds
from convscale.data.transforms import TransformSpec, eval_transform, normalize_uint8, stack_uint8, to_rgb, train_transform
from convscale.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Stream tags keep the random streams of different purposes independent under one seed.
TAG_PERMUTE, TAG_AUGMENT, TAG_REPLACE, TAG_SPLIT, TAG_SHARD_ORDER, TAG_BUFFER = 1, 2, 3, 4, 5, 6

#: names of skipped files kept for messages (the count itself is unbounded)
MAX_SKIPPED_NAMES = 100


def rng_for(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (any sign): same keys, same stream, any process."""
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**64 for k in keys]))


def _find_simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - a dependency; PIL alone decodes the same pixels
        return None
    return simplejpeg


#: the JPEG decoder: simplejpeg (libjpeg-turbo, pixel-identical to PIL's own decode and draft
#: scaling, measured in benchmarks/jpeg_decode.py) where it is installed, else PIL. Set to None
#: to decode with PIL alone.
SIMPLEJPEG = _find_simplejpeg()
_JPEG_MAGIC = b"\xff\xd8"


def decode_image(data: bytes, draft_side_px: Optional[int] = None) -> Optional[Image.Image]:
    """Decode encoded image bytes to RGB, or None if they are not a readable image.

    ``draft_side_px`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale while the shorter side stays at
    least that long (DCT scaling: several times faster for large photos at small resolutions).
    JPEGs go through ``SIMPLEJPEG`` when it is there (the same pixels, less overhead); what it
    cannot take (CMYK, damaged files) falls back to PIL, which decides.
    """
    if SIMPLEJPEG is not None and data[:2] == _JPEG_MAGIC:
        side = draft_side_px or 0
        try:
            return Image.fromarray(SIMPLEJPEG.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side))
        except ValueError:
            pass
    try:
        img = Image.open(io.BytesIO(data))
        if draft_side_px is not None and img.format == "JPEG":
            img.draft("RGB", (draft_side_px, draft_side_px))
        img.load()  # truncated files fail here, not at open
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError):
        return None


class ImageReader(Protocol):
    """Turns a sample reference into an RGB image (None = undecodable) and a name for messages."""

    def read(self, ref: Any, draft_side_px: Optional[int]) -> Optional[Image.Image]: ...

    def describe(self, ref: Any) -> str: ...


class FileReader:
    """References are file paths."""

    def read(self, ref: str, draft_side_px: Optional[int]) -> Optional[Image.Image]:
        try:
            with open(ref, "rb") as f:
                data = f.read()
        except OSError:  # vanished or unreadable mid-run: skip like a corrupt file
            return None
        return decode_image(data, draft_side_px)

    def describe(self, ref: str) -> str:
        return str(ref)


@dataclass(frozen=True)
class Sample:
    """One image to load: ``seed`` is the augmentation seed tuple (None = eval transform)."""

    ref: Any
    label: int
    seed: Optional[tuple[int, ...]]


@dataclass(frozen=True)
class BatchPlan:
    """Everything that decides one batch; built in the main process, executed anywhere."""

    samples: tuple[Sample, ...]
    train: bool


@dataclass
class LoadedBatch:
    """A built batch plus what went wrong while building it (travels back from workers)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[str, ...]
    error: Optional[str] = None  # set instead of raising, so the main process raises a one-line UserError

    def pin_memory(self) -> "LoadedBatch":
        """Page-locked copy (the DataLoader's pin-memory thread calls this)."""
        return LoadedBatch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped, self.error)


class BatchBuilder(torch.utils.data.Dataset):
    """Map-style dataset whose index is a :class:`BatchPlan` and whose item is a whole batch."""

    def __init__(self, reader: ImageReader, spec: TransformSpec, strict: bool):
        self.reader, self.spec, self.strict = reader, spec, strict

    def __len__(self) -> int:  # plans are not enumerable; DataLoader only needs the sampler
        raise TypeError("BatchBuilder is indexed by BatchPlan objects")

    def __getitem__(self, plan: BatchPlan) -> LoadedBatch:
        draft = self.spec.draft_side_px(plan.train)
        decoded = [self.reader.read(s.ref, draft) for s in plan.samples]
        skipped = tuple(self.reader.describe(s.ref) for s, img in zip(plan.samples, decoded) if img is None)
        if skipped and self.strict:
            return _error_batch(
                f"cannot decode image {skipped[0]}; "
                "remove or replace it, or set strict=False to skip corrupt images"
            )
        good = [i for i, img in enumerate(decoded) if img is not None]
        if plan.train and skipped and not good:
            return _error_batch(
                f"no image of a {len(plan.samples)}-image batch could be decoded (first: {skipped[0]}); "
                "check the data files"
            )
        arrays, labels = [], []
        for i, (sample, img) in enumerate(zip(plan.samples, decoded)):
            if not plan.train:
                if img is not None:
                    arrays.append(eval_transform(img, self.spec))
                    labels.append(sample.label)
                continue
            assert sample.seed is not None
            label = sample.label
            if img is None:
                donor = good[int(rng_for(*sample.seed, TAG_REPLACE).integers(len(good)))]
                img, label = decoded[donor], plan.samples[donor].label
            arrays.append(train_transform(img, self.spec, rng_for(*sample.seed)))
            labels.append(label)
        r = self.spec.resolution
        images = stack_uint8(arrays) if arrays else torch.empty(0, 3, r, r, dtype=torch.uint8)  # an empty share
        return LoadedBatch(images, torch.tensor(labels, dtype=torch.int64), skipped)


def _error_batch(message: str) -> LoadedBatch:
    return LoadedBatch(torch.empty(0), torch.empty(0, dtype=torch.int64), (), message)


class _PlanSampler(torch.utils.data.Sampler):
    """Feeds plans to the DataLoader lazily (the train stream is endless)."""

    def __init__(self, plans: Iterable[BatchPlan]):
        self.plans = plans

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.plans)


def _identity(batch: LoadedBatch) -> LoadedBatch:
    return batch


def _worker_init(_: int) -> None:
    # each worker builds a whole batch; intra-op threads would only fight the other workers
    torch.set_num_threads(1)


def build_batches(builder: BatchBuilder, plans: Iterable[BatchPlan], workers: int,
                  pin_memory: bool = False) -> Iterator[LoadedBatch]:
    """Execute plans in order, in this process (workers <= 0) or in DataLoader worker processes."""
    if workers <= 0:
        for plan in plans:
            batch = builder[plan]
            yield batch.pin_memory() if pin_memory and batch.error is None else batch
        return
    loader = torch.utils.data.DataLoader(
        builder,
        batch_size=None,
        sampler=_PlanSampler(plans),
        num_workers=workers,
        collate_fn=_identity,
        worker_init_fn=_worker_init,
        pin_memory=pin_memory,
        prefetch_factor=2,
    )
    yield from loader


def plan_part(plan: BatchPlan, part: tuple[int, int]) -> BatchPlan:
    """Share ``part`` of a plan's samples (``part_bounds``)."""
    if part == WHOLE:
        return plan
    lo, hi = part_bounds(len(plan.samples), part)
    return BatchPlan(plan.samples[lo:hi], plan.train)


class PlannedSource:
    """Base of the real-image sources: runs plans and keeps the skip count.

    Subclasses set ``num_classes``, ``num_train_images``, ``cfg``, ``_builder`` and implement
    ``_train_plans(batch_size, start_step)`` and ``_heldout_plans(batch_size)``.
    """

    num_classes: int
    num_train_images: Optional[int]
    skipped_images: int = 0

    def __init__(self) -> None:
        self.skipped_images = 0
        self.skipped_names: list[str] = []
        self._skipped_set: set[str] = set()

    def train_batches(self, batch_size: int, start_step: int = 0, part: tuple[int, int] = WHOLE,
                      uint8: bool = False, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches (share ``part`` of each); batch k depends only on (seed, k, batch_size)."""
        _check_batch(batch_size, start_step)
        plans = (plan_part(p, part) for p in self._train_plans(batch_size, start_step))
        yield from self.receive_all(build_batches(self._builder, plans, self.cfg.workers, pin_memory), uint8)

    def heldout_batches(self, batch_size: int, part: tuple[int, int] = WHOLE, uint8: bool = False,
                        pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out set once, in a fixed order, eval transform; undecodable images dropped."""
        _check_batch(batch_size, 0)
        plans = (plan_part(p, part) for p in self._heldout_plans(batch_size))
        for images, labels in self.receive_all(build_batches(self._builder, plans, self.cfg.workers, pin_memory),
                                               uint8):
            if len(labels) or part != WHOLE:  # every rank one item per batch (FSDP2 forwards gather collectively)
                yield images, labels

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return normalize_uint8(images_uint8)

    def receive_all(self, batches: Iterable[LoadedBatch], uint8: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            images, labels = self._receive(batch)
            yield (images if uint8 else normalize_uint8(images)), labels

    def _receive(self, batch: LoadedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.error is not None:
            raise UserError(batch.error)
        new = [name for name in batch.skipped if name not in self._skipped_set]
        if new:  # counted once per distinct file, however often later epochs draw it again
            if not self.skipped_images:
                log.warning("skipping undecodable image %s (further ones are counted in skipped_images)", new[0])
            self._skipped_set.update(new)
            self.skipped_images = len(self._skipped_set)
            room = MAX_SKIPPED_NAMES - len(self.skipped_names)
            self.skipped_names.extend(new[: max(room, 0)])
        return batch.images, batch.labels


def _check_batch(batch_size: int, start_step: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if start_step < 0:
        raise UserError(f"start step must be >= 0, got {start_step}")


def check_heldout_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise UserError(f"heldout_fraction must be in [0, 1), got {fraction}")


def check_class_ids(max_label: int, num_images: int, where: str) -> None:
    """UserError if class ids run past the number of images: some class would have no image, and a
    stray id like 10**9 would make a classifier of a billion outputs."""
    if max_label >= num_images:
        raise UserError(f"{where}: label {max_label} but only {num_images} images; class ids must be "
                        f"0..num_classes-1 with every class present: renumber the labels")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split into (train indices, held-out indices), both sorted.

    The held-out total is ``round(fraction * N)`` (at least 1 when fraction > 0), spread over
    classes by largest remainder; a class never loses its last training image.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    classes, counts = np.unique(labels, return_counts=True)
    want = max(1, int(round(fraction * n)))
    exact = counts * (want / n)
    quota = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    rng = rng_for(seed, TAG_SPLIT)
    # largest remainder first; a seeded random key breaks ties so no class is favoured by its id
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
    for c in order:
        if quota.sum() >= want:
            break
        if quota[c] < counts[c] - 1:
            quota[c] += 1
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    heldout = [members[rng.permutation(len(members))[:q]] for members, q in zip(by_class, quota)]
    held = np.sort(np.concatenate(heldout)) if heldout else np.arange(0)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def chunked(items: Sequence[Sample], batch_size: int) -> Iterator[tuple[Sample, ...]]:
    for start in range(0, len(items), batch_size):
        yield tuple(items[start : start + batch_size])
