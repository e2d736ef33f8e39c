"""Procedural generator images/s beside the training images/s of demo-sized models, and the ratio.

    python benchmarks/gen_vs_train.py --resolution 16 --batch-size 128 --precision bf16 --repeats 5

The goal is generator >= 3 x training, so that generating the stream costs a run at most a quarter
of its time. The generator and each model are measured in alternating rounds (the machine may be
shared) and medians are reported.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from convscale.models import get_config

try:  # run as a script (benchmarks/ on sys.path) or as a module from the repo root
    from data_throughput import measure_generator
    from train_throughput import Candidate, Runner, machine_description
except ImportError:  # pragma: no cover
    from benchmarks.data_throughput import measure_generator
    from benchmarks.train_throughput import Candidate, Runner, machine_description

DEMO_MODELS = ("nfnet-w0.0625-d1.1.1", "nfnet-w0.125-d1.1.1", "vit-w32-d4-p4", "vit-w64-d4-p4")
GOAL_RATIO = 3.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    p.add_argument("--generator-seconds", type=float, default=2.0, help="generator time per round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_args = argparse.Namespace(device=args.device, compile=False, batch_size=args.batch_size,
                                  resolution=args.resolution, num_classes=args.num_classes, warmup=2)
    runners = {}
    for name in args.models:
        overrides = {"image_size": args.resolution} if name.lower().startswith("vit") else {}
        cfg = get_config(name, num_classes=args.num_classes, **overrides)
        cfg.check_resolution(args.resolution)
        cand = Candidate(cfg.name, cfg.build, cfg.forward_flops(args.resolution), cfg.family == "nfnet")
        # channels_last only pays for larger images; at demo sizes NCHW was as fast or faster.
        runners[cfg.name] = Runner(cand, run_args, args.precision, "contiguous")
    gen: list[float] = []
    train: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.repeats):
        gen.append(measure_generator(args.resolution, args.batch_size, args.generator_seconds,
                                     num_classes=args.num_classes, device=args.device))
        for name, runner in runners.items():
            train[name].append(runner.time(args.steps).images_per_second)
    gen_rate = statistics.median(gen)
    print(f"# {machine_description()}; {args.resolution} px, batch {args.batch_size}, {args.precision}, "
          f"{args.repeats} alternating rounds, medians")
    print(f"# generator: {gen_rate:.0f} images/s (min {min(gen):.0f}, max {max(gen):.0f})")
    print("model,train_images_per_second,min,max,generator_over_train,meets_goal")
    for name, rates in train.items():
        rate = statistics.median(rates)
        ratio = gen_rate / rate
        print(f"{name},{rate:.0f},{min(rates):.0f},{max(rates):.0f},{ratio:.2f},"
              f"{'yes' if ratio >= GOAL_RATIO else 'no'}", flush=True)


if __name__ == "__main__":
    main()
