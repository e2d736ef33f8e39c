"""Image transforms for real data, written with Pillow and torch only (torchvision is not used).

Train: Inception-style random resized crop + optional horizontal flip. Eval: resize the shorter
side to ``resolution / 0.875`` (rounded), then centre crop. Both end in a float tensor
``[3, R, R]`` normalised with the ImageNet mean/std. All randomness comes from an explicit
``numpy.random.Generator`` so a sample's augmentation is a function of its seed alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: crop-area range for images whose shorter side is below ``SMALL_IMAGE_SIDE_PX``. Inception's
#: 8 % crop keeps a 2x2-pixel patch of an 8x8 digit or a 9x9 patch of a 32x32 image, which no
#: longer shows the object; CIFAR-style training keeps most of the frame (pad-4 crops keep ~64 %
#: of the area), so small images use 35-100 %.
SMALL_IMAGE_CROP_SCALE: tuple[float, float] = (0.35, 1.0)
SMALL_IMAGE_SIDE_PX = 64

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class TransformSpec:
    """How images are shaped for the model.

    crop_scale: range of the crop's share of the image area (train); crop_ratio: range of the
    crop's width/height; eval_crop_fraction: centre-crop side over resized shorter side (eval).
    """

    resolution: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    interpolation: str = "bicubic"
    eval_crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")

    @property
    def eval_resize_px(self) -> int:
        """Shorter side after the eval resize (256 for resolution 224)."""
        return int(round(self.resolution / self.eval_crop_fraction))

    def draft_side_px(self, train: bool) -> int:
        """Smallest shorter side a JPEG may be decoded at (via ``Image.draft``) without losing
        detail: the smallest train crop (side ~ sqrt(scale_min * 3/4) of the image) must still
        cover ``resolution`` pixels."""
        if not train:
            return self.eval_resize_px
        return int(math.ceil(self.resolution / math.sqrt(self.crop_scale[0] * self.crop_ratio[0])))


def crop_scale_for(shorter_side_px: int) -> tuple[float, float]:
    """Inception's (0.08, 1) for normal photos, the milder range for tiny images."""
    return SMALL_IMAGE_CROP_SCALE if shorter_side_px < SMALL_IMAGE_SIDE_PX else (0.08, 1.0)


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """An Inception-style crop box (left, top, right, bottom): area share ~ U(scale), log aspect
    ratio ~ U(log ratio); after 10 misses, the largest centred box within the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(img: Image.Image, spec: TransformSpec, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop (+ flip) of an RGB image: uint8 ``[R, R, 3]``."""
    box = sample_crop_box(img.width, img.height, spec.crop_scale, spec.crop_ratio, rng)
    r = spec.resolution
    # resize with box crops and resamples in one pass, without materialising the crop
    out = img.resize((r, r), _RESAMPLE[spec.interpolation], box=box)
    if spec.flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def eval_transform(img: Image.Image, spec: TransformSpec) -> np.ndarray:
    """Resize the shorter side to ``spec.eval_resize_px``, centre crop ``R``: uint8 ``[R, R, 3]``."""
    short = spec.eval_resize_px
    if img.width <= img.height:
        size = (short, max(short, int(round(img.height * short / img.width))))
    else:
        size = (max(short, int(round(img.width * short / img.height))), short)
    resized = img.resize(size, _RESAMPLE[spec.interpolation])
    r = spec.resolution
    left, top = (size[0] - r) // 2, (size[1] - r) // 2
    return np.asarray(resized.crop((left, top, left + r, top + r)), dtype=np.uint8)


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def stack_uint8(images_uint8: list[np.ndarray]) -> torch.Tensor:
    """Stack uint8 ``[R, R, 3]`` images into a uint8 ``[B, 3, R, R]`` batch (NCHW, contiguous)."""
    if not images_uint8:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images_uint8)).permute(0, 3, 1, 2).contiguous()


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, R, R]`` -> float32 normalised with the ImageNet mean/std, on ``x``'s device."""
    if x.device not in _ON_DEVICE:  # once per device: a tensor copied to a GPU every batch would sync
        _ON_DEVICE[x.device] = (_MEAN.to(x.device), _STD.to(x.device))
    mean, std = _ON_DEVICE[x.device]
    return ((x.float() - mean) / std).contiguous()


def normalize_batch(images_uint8: list[np.ndarray]) -> torch.Tensor:
    """Stack uint8 ``[R, R, 3]`` images into a float32 ``[B, 3, R, R]`` normalised batch."""
    return normalize_uint8(stack_uint8(images_uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any Pillow image (greyscale, palette, RGBA, CMYK ...)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:  # direct P->RGB warns for such palettes
        img = img.convert("RGBA")
    return img.convert("RGB")
