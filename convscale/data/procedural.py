"""The built-in JFT-like stream: FractalDB-style IFS fractal classes, unlimited and deterministic.

Training image ``i`` of a config is a pure function of ``(seed, "train", i)`` and batch ``k`` of
size ``b`` holds images ``k*b .. k*b+b-1``, so a resumed run sees exactly what an uninterrupted one
does. Held-out images come from a different hash stream (``"heldout"``), so the splits are disjoint
by construction. A source asked for ``part=(i, n)`` renders only share i of n of each batch.
With ``device = "cuda"`` images are rendered on the GPU without a host sync per batch (the
class tables and indices go over in page-locked memory). ``materialize`` writes the first N training images once, to be shared by every run
of a sweep; a source whose ``cfg.path`` names such a cache serves identical images from it and
generates past its end.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from convscale.data import ifs
from convscale.data.config import WHOLE, DataConfig, part_bounds
from convscale.errors import UserError
from convscale.fileio import atomic_write, atomic_write_json

CACHE_FORMAT = "convscale-procedural-v1"


class ProceduralImages:
    """Renders images of the stream: ``render(split, indices) -> (images [n,3,R,R] float32, labels [n])``.

    ``noise`` scales the per-instance perturbation of the class maps (task difficulty).
    """

    def __init__(self, num_classes: int, resolution: int, seed: int, device: str = "cpu", noise: float = 1.0):
        self.num_classes = int(num_classes)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.noise = float(noise)
        self.systems = ifs.ClassSystems(self.num_classes, self.seed)
        self._keys = {s: ifs.stream_key(self.seed, s) for s in ("train", "heldout")}
        self._blocks: dict[tuple[str, int], tuple[int, int]] = {}

    def labels(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        """Balanced labels: every aligned block of ``num_classes`` indices holds each class once,
        in a hashed affine order ``(pos * mult + offset) % C`` (mult coprime with C)."""
        c = self.num_classes
        indices = indices.to(torch.int64).cpu()
        block, pos = indices // c, indices % c
        uniq = torch.unique(block).tolist()
        mult = torch.empty(len(uniq), dtype=torch.int64)
        off = torch.empty(len(uniq), dtype=torch.int64)
        for i, blk in enumerate(uniq):
            mult[i], off[i] = self._block_permutation(split, blk)
        where = torch.searchsorted(torch.tensor(uniq, dtype=torch.int64), block)
        return (pos * mult[where] + off[where]) % c

    def _block_permutation(self, split: str, block: int) -> tuple[int, int]:
        if (split, block) not in self._blocks:
            c = self.num_classes
            h1 = ifs.mix32_int(self._keys[split] ^ ifs.mix32_int(block & ifs.M32) ^ (block >> 32))
            h2 = ifs.mix32_int(h1 + 0x68E31DA4)
            mult = 1 + h1 % max(c - 1, 1)
            while math.gcd(mult, c) != 1:
                mult += 1
            self._blocks[(split, block)] = (mult % c if c > 1 else 0, h2 % c)
        return self._blocks[(split, block)]

    def render_uint8(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[n, 3, R, R]`` and int64 labels of items ``indices`` of ``split``."""
        if split not in self._keys:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
        indices = torch.as_tensor(indices, dtype=torch.int64)
        labels = self.labels(split, indices)
        images = ifs.render_uint8(self.systems, self._keys[split], indices, labels, self.resolution,
                                  self.noise, self.device)
        return images, ifs.to_device(labels, self.device)

    def render(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images ``[n, 3, R, R]`` and int64 labels ``[n]``."""
        images, labels = self.render_uint8(split, indices)
        return ifs.normalize(images), labels


class StreamCache:
    """A materialised prefix of the training stream: ``images.npy`` (uint8), ``labels.npy``, ``meta.json``."""

    def __init__(self, path: str, cfg: DataConfig):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"procedural cache '{path}' not found: create it with "
                            f"convscale.data.procedural.materialize(cfg, num_images, path) or unset data.path")
        with open(meta_path) as f:
            meta = json.load(f)
        want = _cache_meta(cfg, meta.get("num_images", 0))
        for key in ("format", "seed", "resolution", "num_classes", "noise"):
            if meta.get(key) != want[key]:
                raise UserError(f"procedural cache '{path}' has {key}={meta.get(key)} but the config needs "
                                f"{want[key]}: rebuild it with materialize() or match the config")
        self.num_images = int(meta["num_images"])
        self.images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")

    def read(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.array(self.images[lo:hi])),
                torch.from_numpy(np.array(self.labels[lo:hi])))


def _cache_meta(cfg: DataConfig, num_images: int) -> dict:
    return {"format": CACHE_FORMAT, "seed": cfg.seed, "resolution": cfg.resolution,
            "num_classes": cfg.num_classes, "noise": 1.0, "num_images": int(num_images)}


class ProceduralSource:
    """DataSource over the procedural stream (see module doc); ``cfg.path`` (or ``cache_path``) may
    name a cache written by ``materialize``."""

    num_train_images: Optional[int] = None
    skipped_images: int = 0

    def __init__(self, cfg: DataConfig, cache_path: Optional[str] = None):
        if cfg.num_classes < 1:
            raise UserError(f"procedural data needs num_classes >= 1, got {cfg.num_classes}")
        if cfg.resolution < 8:
            raise UserError(f"data resolution must be >= 8 px, got {cfg.resolution}")
        if cfg.device != "cpu" and cfg.workers > 0:
            raise UserError(f"procedural data on '{cfg.device}' is generated in-process: set data.workers=0")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.cache_path = cache_path or cfg.path
        self.images = ProceduralImages(cfg.num_classes, cfg.resolution, cfg.seed, cfg.device)
        self.cache = StreamCache(self.cache_path, cfg) if self.cache_path else None

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return ifs.normalize(images_uint8)

    def train_batch(self, step: int, batch_size: int, part: tuple[int, int] = WHOLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step`` (share ``part`` of it): images ``step*batch_size ..`` normalised, and labels."""
        x, y = self.train_batch_uint8(step, batch_size, part)
        return ifs.normalize(x), y

    def train_batch_uint8(self, step: int, batch_size: int,
                          part: tuple[int, int] = WHOLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``step`` (share ``part``) as uint8 (from the cache as far as it reaches, then generated)."""
        first, last = part_bounds(batch_size, part)
        lo, hi = step * batch_size + first, step * batch_size + last
        parts_x, parts_y = [], []
        cached = min(hi, self.cache.num_images) if self.cache else lo
        if cached > lo:
            x, y = self.cache.read(lo, cached)
            parts_x.append(ifs.to_device(x, self.images.device))
            parts_y.append(ifs.to_device(y, self.images.device))
        if hi > max(lo, cached):
            x, y = self.images.render_uint8("train", torch.arange(max(lo, cached), hi))
            parts_x.append(x)
            parts_y.append(y)
        x = parts_x[0] if len(parts_x) == 1 else torch.cat(parts_x)
        y = parts_y[0] if len(parts_y) == 1 else torch.cat(parts_y)
        return x, y

    def train_batches(self, batch_size: int, start_step: int = 0, part: tuple[int, int] = WHOLE,
                      uint8: bool = False, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches from ``start_step``; identical with any number of workers."""
        pin = pin_memory and self.images.device.type == "cpu"
        if self.cfg.workers <= 0:
            batches = (self.train_batch_uint8(step, batch_size, part) for step in itertools.count(start_step))
            if pin:
                batches = ((x.pin_memory(), y.pin_memory()) for x, y in batches)
        else:
            batches = _ordered(_worker_loader(self.cfg, self.cache_path, batch_size, start_step, part, pin), start_step)
        for x, y in batches:
            yield (x if uint8 else ifs.normalize(x)), y

    def heldout_batches(self, batch_size: int, part: tuple[int, int] = WHOLE, uint8: bool = False,
                        pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set (``cfg.heldout_images`` images), once, in order (share ``part`` of each batch)."""
        n = self.cfg.heldout_images
        for start in range(0, n, batch_size):
            first, last = part_bounds(min(n, start + batch_size) - start, part)
            if first == last and part == WHOLE:
                continue
            x, y = self.images.render_uint8("heldout", torch.arange(start + first, start + last))
            if pin_memory and x.device.type == "cpu":
                x, y = x.pin_memory(), y.pin_memory()
            yield (x if uint8 else ifs.normalize(x)), y


class _BatchStream(torch.utils.data.IterableDataset):
    """Whole uint8 batches tagged with their step; worker w of n makes steps start+w, start+w+n, ..."""

    def __init__(self, cfg: DataConfig, cache_path: Optional[str], batch_size: int, start_step: int,
                 part: tuple[int, int] = WHOLE):
        self.cfg, self.cache_path = cfg.replace(workers=0), cache_path
        self.batch_size, self.start_step, self.part = batch_size, start_step, part

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        source = ProceduralSource(self.cfg, self.cache_path)
        step = self.start_step + wid
        while True:
            x, y = source.train_batch_uint8(step, self.batch_size, self.part)  # uint8: 4x less to pickle
            yield step, x, y
            step += nw


def _worker_loader(cfg: DataConfig, cache_path: Optional[str], batch_size: int, start_step: int,
                   part: tuple[int, int] = WHOLE, pin_memory: bool = False):
    # workers are forked with 1 intra-op thread each (DataLoader's default), so n workers use n cores
    return torch.utils.data.DataLoader(_BatchStream(cfg, cache_path, batch_size, start_step, part),
                                       batch_size=None, num_workers=cfg.workers, prefetch_factor=2,
                                       pin_memory=pin_memory)


def _ordered(tagged, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) in step order whatever order workers deliver them in."""
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    want = start_step
    for step, x, y in tagged:
        pending[int(step)] = (x, y)
        while want in pending:
            yield pending.pop(want)
            want += 1


#: images rendered per call when a stream is written once for a sweep: rendering is bound by
#: per-op dispatch at small batches (16 px, 2 threads: 52k images/s at 128, 76k at 2048)
MATERIALIZE_CHUNK_IMAGES = 2048


def materialize(cfg: DataConfig, num_images: int, path: str, chunk_images: int = MATERIALIZE_CHUNK_IMAGES) -> str:
    """Write training images ``0 .. num_images-1`` of ``cfg`` (uint8) and labels to directory ``path``
    (uses ``cfg.workers`` processes); returns ``path``. Point ``cfg.path`` at it to read it back."""
    if num_images < 1:
        raise UserError(f"materialize needs num_images >= 1, got {num_images}")
    r = cfg.resolution
    labels = np.empty(num_images, dtype=np.int64)
    gen_cfg = cfg.replace(path=None, device="cpu")
    steps = -(-num_images // chunk_images)

    def write_images(tmp: Path) -> None:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(num_images, 3, r, r))
        if cfg.workers <= 0:
            source = ProceduralSource(gen_cfg)
            batches = (source.train_batch_uint8(step, chunk_images) for step in range(steps))
        else:
            batches = _ordered(_worker_loader(gen_cfg, None, chunk_images, 0), 0)
        for step, (x, y) in zip(range(steps), batches):
            lo, hi = step * chunk_images, min(num_images, (step + 1) * chunk_images)
            images[lo:hi] = x[: hi - lo].numpy()
            labels[lo:hi] = y[: hi - lo].numpy()
        images.flush()

    def write_labels(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file, not a name: np.save would add ".npy" to the temporary's
            np.save(f, labels)

    # meta.json last: a directory without it (a killed write) is regenerated
    atomic_write(Path(path) / "images.npy", write_images)
    atomic_write(Path(path) / "labels.npy", write_labels)
    atomic_write_json(Path(path) / "meta.json", _cache_meta(cfg, num_images), indent=1, sort_keys=False)
    return path
