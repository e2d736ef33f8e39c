"""In-memory image arrays: an ``.npz`` file, or scikit-learn's bundled handwritten digits."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from convscale.data.config import DataConfig
from convscale.data.indexed import IndexedSource
from convscale.data.loading import check_class_ids, check_heldout_fraction, stratified_split
from convscale.data.transforms import TransformSpec, crop_scale_for
from convscale.errors import UserError


class ArrayReader:
    """References are ``(array id, index)`` into a list of uint8 ``[N, H, W, C]`` arrays."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def read(self, ref: tuple[int, int], draft_side_px: Optional[int]) -> Image.Image:
        pixels = self.arrays[ref[0]][ref[1]]
        if pixels.shape[-1] == 1:
            return Image.fromarray(pixels[..., 0]).convert("RGB")  # 2-D uint8 decodes as mode "L"
        img = Image.fromarray(pixels)
        return img if img.mode == "RGB" else img.convert("RGB")

    def describe(self, ref: tuple[int, int]) -> str:
        return f"array {ref[0]} image {ref[1]}"


def check_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise to (uint8 ``[N, H, W, C]`` with C in 1/3/4, int64 ``[N]``)."""
    if images.dtype != np.uint8:
        raise UserError(
            f"{where}: 'images' must be uint8 0..255, got {images.dtype}; "
            "convert with images.astype(np.uint8)"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise UserError(f"{where}: 'images' must be [N,H,W], [N,H,W,1], [N,H,W,3] or [N,H,W,4], got shape {images.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{where}: 'labels' must be [N] with N = {len(images)} images, got shape {labels.shape}")
    if len(labels) == 0:
        raise UserError(f"{where}: holds no images; save a non-empty 'images' array")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(labels == np.round(labels)):
            raise UserError(f"{where}: 'labels' must be integer class ids, got {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(np.abs(labels) < 2**62):
        raise UserError(f"{where}: labels out of range (max {labels.max()}); class ids must be 0..num_classes-1")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise UserError(f"{where}: labels out of range (min {labels.min()}); class ids must be 0..num_classes-1")
    check_class_ids(int(labels.max()), len(labels), where)
    return images, labels


def load_npz(path: str, what: str = "path") -> tuple[np.ndarray, np.ndarray]:
    """``images`` and ``labels`` of an ``.npz`` file, validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data {what} {p} does not exist; point it at an .npz with 'images' and 'labels'")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise UserError(
                    f"{p} lacks {' and '.join(repr(m) for m in missing)}; "
                    "save it with np.savez(path, images=..., labels=...)"
                )
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or not a zip at all
        raise UserError(
            f"cannot read {p} as .npz ({type(e).__name__}); "
            "save it with np.savez(path, images=..., labels=...)"
        ) from None
    return check_arrays(images, labels, str(p))


class ArraySource(IndexedSource):
    """Images from memory; held out: ``cfg.heldout_path`` (.npz) or a seeded stratified share.

    ``flip``: horizontal flips in training (off for data where handedness matters, e.g. digits).
    Images under 64 px use a milder crop-area range (see ``transforms.SMALL_IMAGE_CROP_SCALE``).
    """

    def __init__(
        self,
        cfg: DataConfig,
        flip: bool = True,
        arrays: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ):
        check_heldout_fraction(cfg.heldout_fraction)
        if arrays is not None:
            images, labels = check_arrays(*arrays, where="arrays")
        elif cfg.path is None:
            raise UserError("data kind 'arrays' needs a path; set data.path to an .npz with 'images' and 'labels'")
        else:
            images, labels = load_npz(cfg.path)
        num_classes = int(labels.max()) + 1
        if cfg.heldout_path is not None:
            held_images, held_labels = load_npz(cfg.heldout_path, "heldout_path")
            if held_labels.max() >= num_classes:
                raise UserError(
                    f"held-out labels out of range: {held_labels.max()} >= {num_classes} training classes; "
                    f"fix {cfg.heldout_path}"
                )
            reader = ArrayReader([images, held_images])
            train_refs = [(0, i) for i in range(len(images))]
            held_refs = [(1, i) for i in range(len(held_images))]
            train_labels = labels
        else:
            train_idx, held_idx = stratified_split(labels, cfg.heldout_fraction, cfg.seed)
            reader = ArrayReader([images])
            train_refs = [(0, int(i)) for i in train_idx]
            held_refs = [(0, int(i)) for i in held_idx]
            train_labels, held_labels = labels[train_idx], labels[held_idx]
        spec = TransformSpec(cfg.resolution, crop_scale=crop_scale_for(min(images.shape[1:3])), flip=flip)
        super().__init__(cfg, reader, spec, train_refs, train_labels, held_refs, held_labels, num_classes)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten 8x8 digits as uint8 ``[1797, 8, 8, 3]`` and labels 0..9."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


class DigitsSource(ArraySource):
    """A real 10-class image set that ships with scikit-learn; no flips (a mirrored 3 is not a 3).

    Held out: a seeded stratified ``cfg.heldout_fraction`` of the 1797 images (the default 0.01
    holds out 18; studies on digits want ~0.2).
    """

    def __init__(self, cfg: DataConfig):
        if cfg.heldout_path is not None:
            raise UserError("data kind 'digits' splits its own held-out set; unset heldout_path (use heldout_fraction)")
        super().__init__(cfg, flip=False, arrays=digits_arrays())
