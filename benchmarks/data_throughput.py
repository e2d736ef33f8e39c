"""Throughput of the procedural image generator (images/s), for planning sweeps.

    python benchmarks/data_throughput.py --resolutions 16 32 64 224 --threads 1 2 --seconds 5
"""

from __future__ import annotations

import argparse
import time

import torch

from convscale.data.procedural import ProceduralImages


def measure_generator(resolution: int, batch_size: int, seconds: float, num_classes: int = 1000,
                      device: str = "cpu") -> float:
    """Training images/s that ``ProceduralImages.render`` sustains for ``seconds`` (after a warm-up
    batch that also samples the classes it needs), with the current ``torch.get_num_threads()``."""
    gen = ProceduralImages(num_classes, resolution, seed=0, device=device)
    gen.render("train", torch.arange(batch_size))
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = gen.render("train", torch.arange(images + batch_size, images + 2 * batch_size))
        if x.is_cuda:
            torch.cuda.synchronize()
        images += batch_size
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64, 224])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("resolution_px,threads,batch_size,images_per_second")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for res in args.resolutions:
            batch = args.batch_size if res <= 64 else max(16, args.batch_size // 8)
            rate = measure_generator(res, batch, args.seconds, device=args.device)
            print(f"{res},{threads},{batch},{rate:.0f}", flush=True)


if __name__ == "__main__":
    main()
