"""Decode + augment speed of real JPEGs, images/s per core, for the folder and shard sources.

Writes ImageNet-sized photos-like JPEGs (500 x 375, quality 90) into a temporary ImageFolder tree
and into tar shards, then times the training batches each source builds (decode, Inception crop,
flip, resize to ``--resolutions``, uint8 stack) on one thread in this process (``workers = 0``),
with each JPEG decoder: PIL alone, and simplejpeg (data/loading.py's default where it installs).
Ratio = simplejpeg / PIL images/s, both measured in this run, alternating rounds.

    python benchmarks/jpeg_decode.py --images 256 --seconds 4 --rounds 3 --resolutions 224 64

Prints CSV rows, the ratio per case, and how many such cores a GPU that trains NFNet-F0 at 224 px
would need (``--gpu-images-per-s``; the default comes from timm's RTX 3090 figure for dm_nfnet_f0,
600 images/s at 192 px, scaled by pixels to 224 px: 441 images/s).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convscale.data import build_source, loading
from convscale.data.config import DataConfig

PHOTO_SIZE = (500, 375)  # ImageNet's typical photo (width, height)
QUALITY = 90
CLASSES = 10
F0_3090_IMAGES_PER_S_192PX = 600.1  # ../shared/notes/gpu-anchors.md: timm, RTX 3090, AMP, NCHW


def photo(rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE) -> np.ndarray:
    """A photo-like image: smooth colour waves plus sensor-like noise (JPEG sizes near real photos')."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / 100.0
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(6):
            fx, fy, ph = rng.uniform(0.2, 3, 3)
            img[..., c] += np.sin(fx * x * 3 + fy * y * 2 + ph * 6)
    img = (img - img.min()) / (img.max() - img.min()) * 200 + rng.normal(0, 16, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_data(root: Path, images: int, shards: int = 4) -> tuple[Path, Path, float]:
    """An ImageFolder tree and ``shards`` tars of the same JPEGs; returns both and the mean file KB."""
    rng = np.random.default_rng(0)
    folder, shard_dir = root / "folder", root / "shards"
    shard_dir.mkdir(parents=True)
    tars = [tarfile.open(shard_dir / f"train-{s:03d}.tar", "w") for s in range(shards)]
    sizes = []
    for i in range(images):
        buf = io.BytesIO()
        Image.fromarray(photo(rng)).save(buf, format="JPEG", quality=QUALITY)
        data, label = buf.getvalue(), i % CLASSES
        sizes.append(len(data))
        d = folder / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[i % shards].addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    return folder, shard_dir, float(np.mean(sizes)) / 1024


def measure(cfg: DataConfig, batch_size: int, seconds: float) -> float:
    """Training images/s of the source ``cfg`` names, after one warm-up batch."""
    source = build_source(cfg)
    batches = source.train_batches(batch_size, uint8=True)
    next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        n += batch_size
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-images-per-s", type=float,
                        default=F0_3090_IMAGES_PER_S_192PX * (192 / 224) ** 2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    simplejpeg = loading.SIMPLEJPEG
    decoders = {"pil": None, **({"simplejpeg": simplejpeg} if simplejpeg is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards, kb = write_data(Path(tmp), args.images)
        print(f"# {args.images} JPEGs {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} quality {QUALITY}, mean {kb:.0f} KB; "
              f"1 thread, workers 0, cpu: {os.cpu_count()} cores visible")
        print("source,resolution_px,decoder,images_per_second_per_core,min,max")
        summary = []
        for kind, path in (("folder", folder), ("shards", shards)):
            for res in args.resolutions:
                cfg = DataConfig(kind=kind, path=str(path), resolution=res, workers=0, heldout_fraction=0.05)
                rates: dict[str, list[float]] = {d: [] for d in decoders}
                for _ in range(args.rounds):
                    for name, module in decoders.items():
                        loading.SIMPLEJPEG = module
                        rates[name].append(measure(cfg, args.batch_size, args.seconds))
                loading.SIMPLEJPEG = simplejpeg
                for name, r in rates.items():
                    print(f"{kind},{res},{name},{statistics.median(r):.0f},{min(r):.0f},{max(r):.0f}", flush=True)
                best = max(statistics.median(r) for r in rates.values())
                ratio = (statistics.median(rates["simplejpeg"]) / statistics.median(rates["pil"])
                         if "simplejpeg" in rates else float("nan"))
                summary.append((kind, res, best, ratio))
        print(f"\nsimplejpeg / PIL, and cores to feed a GPU training NFNet-F0 at {args.gpu_images_per_s:.0f} images/s:")
        for kind, res, best, ratio in summary:
            print(f"  {kind:6s} {res:4d} px: ratio {ratio:.2f}, best {best:.0f} images/s/core -> "
                  f"{args.gpu_images_per_s / best:.1f} cores")


if __name__ == "__main__":
    main()
