"""Training throughput (forward + backward + SGD step) of our models vs timm's, same process.

    python benchmarks/train_throughput.py --models nfnet-w0.125-d1.1.1 vit-w32-d4-p4 \
        --resolution 16 --batch-size 128 --precision bf16 fp32 --steps 10 --repeats 5

Each of our models is paired with timm's model of the same shape (equal parameter counts are
checked): NFNets with ``dm_nfnet_*``'s NormFreeNet config at our widths (and ``nfnet_f0`` beside
``nfnet-f0``), ViTs with timm's ``VisionTransformer``. Ours and timm's are measured in alternating
rounds (the machine may be shared) and the median images/s of the rounds is reported, with
ours/timm. MFU = training FLOPs/s (3 x our analytic forward FLOPs, the same figure for both) / the
device's peak; on CPU it is "n/a" unless ``--peak-tflops`` states one. Without timm installed
only our models run. On a shared CPU, ``--threads 1 --clock cpu`` (CPU-seconds of this process)
gives far steadier ratios than the wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from convscale.errors import UserError
from convscale.models import get_config
from convscale.models.base import train_flops_per_image
from convscale.models.layers import to_channels_last
from convscale.models.nfnet import NFNetConfig

try:  # run as a script (benchmarks/ on sys.path) or as a module from the repo root
    import timm_shim
except ImportError:  # pragma: no cover
    from benchmarks import timm_shim

# Dense peak TFLOP/s by (device-name fragment, precision), from the vendors' data sheets.
CUDA_PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 67.0,
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 67.0,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5,
}


@dataclass
class Candidate:
    """One model to time: a label, a builder, and the forward FLOPs per image used for MFU."""

    label: str
    build: Callable[[], nn.Module]
    forward_flops_per_image: int
    is_conv: bool


@dataclass
class Timing:
    images_per_second: float
    peak_memory_mib: float | None
    memory_format: str


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ""
    with contextlib.suppress(OSError):
        load = ", load avg " + " ".join(open("/proc/loadavg").read().split()[:3])
    return (f"{cpu}, {torch.get_num_threads()} threads{load}, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def _timm_nfnet(timm, cfg: NFNetConfig, base: str, num_classes: int) -> nn.Module | None:
    """timm's NormFreeNet with ``base``'s config (``dm_nfnet_f0`` or ``nfnet_f0``) at our shape."""
    from timm.models.nfnet import NormFreeNet, model_cfgs

    tcfg = dataclasses.replace(model_cfgs[base], depths=cfg.depths, channels=cfg.widths,
                               stem_chs=cfg.stem_widths[-1], num_features=cfg.final_width,
                               group_size=max(1, round(cfg.group_width * cfg.width_mult)))
    return NormFreeNet(tcfg, num_classes=num_classes)


def candidates(name: str, resolution: int, num_classes: int, timm) -> list[Candidate]:
    """Our model ``name`` first, then timm's equivalents (skipped if their shapes differ)."""
    overrides = {"image_size": resolution} if name.lower().startswith("vit") else {}
    cfg = get_config(name, num_classes=num_classes, **overrides)
    cfg.check_resolution(resolution)
    flops = cfg.forward_flops(resolution)
    conv = isinstance(cfg, NFNetConfig)
    out = [Candidate(f"ours:{cfg.name}", cfg.build, flops, conv)]
    if timm is None:
        return out
    refs: list[tuple[str, Callable[[], nn.Module]]] = []
    if conv:
        refs.append(("dm_nfnet", lambda: _timm_nfnet(timm, cfg, "dm_nfnet_f0", num_classes)))
        if cfg.width_mult == 1.0 and cfg.depths == (1, 2, 6, 3) and not cfg.plus:
            refs.append(("nfnet_f0", lambda: _timm_nfnet(timm, cfg, "nfnet_f0", num_classes)))
    else:
        from timm.models.vision_transformer import VisionTransformer

        refs.append(("vit", lambda: VisionTransformer(
            img_size=resolution, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=cfg.qkv_bias,
            num_classes=num_classes, global_pool=cfg.pool if cfg.pool != "gap" else "avg")))
    def tensor_params(model: nn.Module) -> int:  # scalars left out: timm's nfnet_f0 has no SkipInit gains
        return sum(p.numel() for p in model.parameters() if p.dim() > 0)

    with torch.device("meta"):
        ours_params = tensor_params(cfg.build())
        for label, build in refs:
            theirs = tensor_params(build())
            if theirs != ours_params:  # timm rounds channels to multiples of 8
                print(f"# timm:{label} at {cfg.name}: {theirs} params vs our {ours_params}; not comparable, skipped")
                continue
            out.append(Candidate(f"timm:{label}", build, flops, conv))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step: forward (autocast for bf16), cross-entropy, backward, SGD update."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with amp:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # in place, as the training loop does

    return step


class Runner:
    """A built model with its optimizer and a fixed batch, ready to be timed again and again."""

    def __init__(self, cand: Candidate, args: argparse.Namespace, precision: str, memory_format: str):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        model = cand.build().to(self.device).train()
        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        model = to_channels_last(model) if fmt == torch.channels_last else model  # as training does
        self.step = make_step(torch.compile(model) if args.compile else model, self.device, precision)
        self.x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=self.device)
        self.x = self.x.contiguous(memory_format=fmt)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), device=self.device)
        self.memory_format = memory_format
        self.clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for _ in range(args.warmup):  # compile, autotune, allocator warm-up
            self.step(self.x, self.y)
        _sync(self.device)

    def time(self, steps: int) -> Timing:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        start = self.clock()
        for _ in range(steps):
            self.step(self.x, self.y)
        _sync(self.device)
        seconds = self.clock() - start
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return Timing(steps * self.x.shape[0] / seconds, peak, self.memory_format)


def choose_memory_format(cand: Candidate, args: argparse.Namespace, precision: str) -> str:
    """channels_last vs NCHW for a conv net, by the median of 3 alternating short rounds of
    each (one round picked the slower format now and then on a shared machine); ViTs: NCHW."""
    if args.memory_format != "auto":
        return args.memory_format
    if not cand.is_conv:
        return "contiguous"
    runners = {fmt: Runner(cand, args, precision, fmt) for fmt in ("channels_last", "contiguous")}
    rates: dict[str, list[float]] = {fmt: [] for fmt in runners}
    for _ in range(3):
        for fmt, runner in runners.items():
            rates[fmt].append(runner.time(max(2, args.steps // 2)).images_per_second)
    return max(rates, key=lambda fmt: statistics.median(rates[fmt]))


def peak_flops(args: argparse.Namespace, precision: str) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if torch.device(args.device).type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        for (frag, prec), tflops in CUDA_PEAK_TFLOPS.items():
            if frag in name and prec == precision:
                return tflops * 1e12
    return None  # CPU: no honest default peak


def bench_model(name: str, precision: str, args: argparse.Namespace, timm) -> list[dict]:
    """Rows for our ``name`` and its timm equivalents, measured in alternating rounds."""
    cands = candidates(name, args.resolution, args.num_classes, timm)
    runners = [Runner(c, args, precision, choose_memory_format(c, args, precision)) for c in cands]
    samples: list[list[Timing]] = [[] for _ in runners]
    for _ in range(args.repeats):
        for runner, got in zip(runners, samples):
            got.append(runner.time(args.steps))
    peak = peak_flops(args, precision)
    rows = []
    for cand, got in zip(cands, samples):
        rate = statistics.median(t.images_per_second for t in got)
        mem = [t.peak_memory_mib for t in got if t.peak_memory_mib is not None]
        achieved = train_flops_per_image(cand.forward_flops_per_image) * rate
        rows.append(dict(model=cand.label, precision=precision, memory_format=got[0].memory_format,
                         images_per_second=rate, spread=(min(t.images_per_second for t in got),
                                                         max(t.images_per_second for t in got)),
                         peak_memory_mib=max(mem) if mem else None,
                         tflops=achieved / 1e12, mfu=achieved / peak if peak else None))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["nfnet-w0.125-d1.1.1", "nfnet-w0.25-d1.2.6.3", "vit-w32-d4-p4"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--precision", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: images per CPU-second of this process (CPU only; with --threads 1 it "
                        "leaves out the time other processes hold the core, so a shared machine gives "
                        "steadier figures)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (needed on CPU)")
    p.add_argument("--no-timm", action="store_true", help="time our models only")
    args = p.parse_args(argv)
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        p.error("--clock cpu times CPU work only; use --clock wall on an accelerator")
    if args.threads:
        torch.set_num_threads(args.threads)
    timm = None
    if not args.no_timm:
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints optional-import noise
            timm = timm_shim.import_timm()
        if timm is None:
            print(f"# timm unavailable ({timm_shim.unavailable_reason()}): ours only")
    print(f"# {machine_description()}; device {args.device}; batch {args.batch_size}, "
          f"{args.resolution} px, {args.steps} steps x {args.repeats} rounds, compile={args.compile}, clock {args.clock}")
    print("model,precision,memory_format,images_per_second,min,max,ratio_ours_over_timm,"
          "peak_memory_mib,train_tflops_per_s,mfu")
    for name in args.models:
        for precision in args.precision:
            try:
                rows = bench_model(name, precision, args, timm)
            except UserError as e:  # e.g. a resolution below the model's stride: say so, go on
                print(f"# {name}: {e}")
                break
            ours = rows[0]["images_per_second"]
            for r in rows:
                ratio = "" if r is rows[0] else f"{ours / r['images_per_second']:.3f}"
                mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
                mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3%}"
                print(f"{r['model']},{precision},{r['memory_format']},{r['images_per_second']:.1f},"
                      f"{r['spread'][0]:.1f},{r['spread'][1]:.1f},{ratio},{mem},{r['tflops']:.4f},{mfu}",
                      flush=True)
    if torch.device(args.device).type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"# CPU: per-model peak memory n/a (no allocator stats); process max RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
