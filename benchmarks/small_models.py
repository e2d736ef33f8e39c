"""Training speed of the CPU presets' small models as convscale trains them, against the same model
in plain eager fp32, measured in the same run.

    python benchmarks/small_models.py                      # every model of the quick and medium presets
    python benchmarks/small_models.py --models nfnet-w0.046875-d1.1.1 --threads 1 --clock cpu

"ours" is what a study's cell runs: the precision the preset resolves to on this machine
("auto": bf16 where the CPU computes it natively, else fp32), the family's memory format (NHWC
for NFNets on a CPU) and the 1x1 convolutions as matrix products. "eager fp32" is the same model,
same weights and batch, in fp32, NCHW, every convolution through F.conv2d. Both take the same SGD
step on a fixed batch; they are timed in alternating rounds (the machine may be shared) and the
medians are reported: images/s, achieved GFLOP/s (3 x our analytic forward FLOPs per image,
per core when --threads is given) and ours / eager fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from convscale.models import config_at_resolution
from convscale.models.base import train_flops_per_image
from convscale.models.layers import ScaledStdConv2d, to_channels_last
from convscale.sweep.presets import PRESETS
from convscale.train.precision import resolve_precision

try:  # run as a script (benchmarks/ on sys.path) or as a module from the repo root
    from train_throughput import machine_description, make_step
except ImportError:  # pragma: no cover
    from benchmarks.train_throughput import machine_description, make_step

CPU_PRESETS = ("demo", "medium")


def preset_models() -> dict[str, str]:
    """Every model of the CPU presets -> the precision its preset asks for (possibly "auto")."""
    out: dict[str, str] = {}
    for name in CPU_PRESETS:
        study = PRESETS[name]
        for fam in study["family"]:
            precision = fam.get("train", {}).get("precision", study["train"].get("precision", "auto"))
            for m in fam["models"]:
                out.setdefault(m, precision)
    return out


@dataclass
class Variant:
    label: str
    precision: str  # bf16 | fp32
    channels_last: bool
    pointwise_matmul: bool


class Timed:
    """One model in one variant, with its optimizer and fixed batch, ready to time again and again."""

    def __init__(self, name: str, v: Variant, args: argparse.Namespace):
        torch.manual_seed(0)
        cfg = config_at_resolution(name, args.resolution, num_classes=args.num_classes)
        model = cfg.build().train()
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        if v.channels_last:
            model = to_channels_last(model)  # as a cell does
        for m in model.modules():
            if isinstance(m, ScaledStdConv2d):
                m.pointwise_matmul = v.pointwise_matmul
        self.step: Callable = make_step(model, torch.device("cpu"), v.precision)
        self.x = torch.randn(args.batch_size, 3, args.resolution, args.resolution).contiguous(memory_format=fmt)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,))
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        self.train_flops = train_flops_per_image(cfg.forward_flops(args.resolution))
        for _ in range(args.warmup):
            self.step(self.x, self.y)

    def images_per_second(self, steps: int) -> float:
        start = self.clock()
        for _ in range(steps):
            self.step(self.x, self.y)
        return steps * self.x.shape[0] / (self.clock() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="default: every model of the quick and medium presets")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds; medians are reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (figures are per core with 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="cpu: per CPU-second of this process (steadier on a shared machine with 1 thread)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = preset_models()
    names = args.models or list(wanted)
    print(f"# {machine_description()}; batch {args.batch_size}, {args.resolution} px, "
          f"{args.steps} steps x {args.repeats} rounds, clock {args.clock}")
    print("model,ours_precision,ours_format,ours_images_per_s,ours_gflops_per_s,"
          "eager_fp32_images_per_s,eager_fp32_gflops_per_s,ratio_ours_over_eager_fp32")
    ratios = []
    for name in names:
        precision = resolve_precision(wanted.get(name, "auto"), "cpu")
        traits = config_at_resolution(name, args.resolution, num_classes=args.num_classes).traits
        ours = Variant("ours", precision, traits.channels_last(None, "cpu"), True)
        eager = Variant("eager fp32", "fp32", False, False)
        timed = [Timed(name, v, args) for v in (ours, eager)]
        rates: list[list[float]] = [[], []]
        for _ in range(args.repeats):
            for t, got in zip(timed, rates):
                got.append(t.images_per_second(args.steps))
        r_ours, r_eager = (statistics.median(r) for r in rates)
        per = max(args.threads, 1)
        g = timed[0].train_flops / 1e9 / per
        ratios.append(r_ours / r_eager)
        print(f"{name},{precision},{'nhwc' if ours.channels_last else 'nchw'},{r_ours:.0f},{r_ours * g:.2f},"
              f"{r_eager:.0f},{r_eager * g:.2f},{r_ours / r_eager:.3f}", flush=True)
    if ratios:
        geo = statistics.geometric_mean(ratios)
        print(f"# geometric mean ours / eager fp32 over {len(ratios)} models: {geo:.3f}")


if __name__ == "__main__":
    main()
