"""Procedural generator images/s beside the training images/s of demo-sized models, and the ratio.

    python benchmarks/gen_vs_train.py --resolution 16 --batch-size 128 --repeats 5

The goal is generator >= 3 x training, so that generating the stream costs a run at most a quarter
of its time. The generator is timed rendering MATERIALIZE_CHUNK_IMAGES at a time, as a sweep
writes its shared stream (--generator-batch), and also at the training batch, as a run that
renders its own batches does (reported beside it). The models are those of the CPU demo presets (quick and medium), each trained at the
precision its preset uses (NFNets bf16, ViTs fp32) unless --precision says otherwise. The
generator and each model are measured in alternating rounds (the machine may be shared) and
medians are reported.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from convscale.data.procedural import MATERIALIZE_CHUNK_IMAGES
from convscale.models import config_at_resolution
from convscale.sweep.presets import PRESETS

try:  # run as a script (benchmarks/ on sys.path) or as a module from the repo root
    from data_throughput import measure_generator
    from train_throughput import Candidate, Runner, machine_description
except ImportError:  # pragma: no cover
    from benchmarks.data_throughput import measure_generator
    from benchmarks.train_throughput import Candidate, Runner, machine_description

GOAL_RATIO = 3.0
CPU_PRESETS = ("demo", "medium")


def preset_models() -> dict[str, str]:
    """Every model of the CPU demo presets -> the precision its preset trains it at."""
    out: dict[str, str] = {}
    for name in CPU_PRESETS:
        study = PRESETS[name]
        for fam in study["family"]:
            precision = fam.get("train", {}).get("precision", study["train"].get("precision", "bf16"))
            for m in fam["models"]:
                out.setdefault(m, precision)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="default: every model of the quick and medium demo presets")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: each model's preset precision")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    p.add_argument("--generator-seconds", type=float, default=2.0, help="generator time per round")
    p.add_argument("--generator-batch", type=int, default=MATERIALIZE_CHUNK_IMAGES,
                   help="images per render call (default: the shared stream's chunk)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args = argparse.Namespace(device=args.device, compile=False, batch_size=args.batch_size,
                                  resolution=args.resolution, num_classes=args.num_classes, warmup=2,
                                  clock="wall")
    models = {m: args.precision or "bf16" for m in args.models} if args.models else preset_models()
    if args.precision:
        models = {m: args.precision for m in models}
    runners, precisions = {}, {}
    for name, precision in models.items():
        cfg = config_at_resolution(name, args.resolution, num_classes=args.num_classes)
        cfg.check_resolution(args.resolution)
        cand = Candidate(cfg.name, cfg.build, cfg.forward_flops(args.resolution), cfg.family == "nfnet")
        # channels_last only pays for larger images; at demo sizes NCHW was as fast or faster.
        runners[cfg.name] = Runner(cand, run_args, precision, "contiguous")
        precisions[cfg.name] = precision
    gen: list[float] = []
    gen_small: list[float] = []
    train: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.repeats):
        gen.append(measure_generator(args.resolution, args.generator_batch, args.generator_seconds,
                                     num_classes=args.num_classes, device=args.device))
        gen_small.append(measure_generator(args.resolution, args.batch_size, args.generator_seconds / 2,
                                           num_classes=args.num_classes, device=args.device))
        for name, runner in runners.items():
            train[name].append(runner.time(args.steps).images_per_second)
    gen_rate = statistics.median(gen)
    print(f"# {machine_description()}; {args.resolution} px, batch {args.batch_size}, "
          f"{args.repeats} alternating rounds, medians")
    print(f"# generator: {gen_rate:.0f} images/s rendering {args.generator_batch} at a time (min {min(gen):.0f}, "
          f"max {max(gen):.0f}); {statistics.median(gen_small):.0f} images/s at the training batch {args.batch_size}")
    print("model,precision,train_images_per_second,min,max,generator_over_train,meets_goal")
    for name, rates in train.items():
        rate = statistics.median(rates)
        ratio = gen_rate / rate
        print(f"{name},{precisions[name]},{rate:.0f},{min(rates):.0f},{max(rates):.0f},{ratio:.2f},"
              f"{'yes' if ratio >= GOAL_RATIO else 'no'}", flush=True)


if __name__ == "__main__":
    main()
