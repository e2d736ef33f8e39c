"""The sections of ``benchmarks/gpu_check.sh``: each prints JSON rows, ``table`` prints them all.

    python benchmarks/gpu_check.py peak --out rows.jsonl
    python benchmarks/gpu_check.py throughput --family nfnet --out rows.jsonl [--compile]
    python benchmarks/gpu_check.py largest-batch --out rows.jsonl
    python benchmarks/gpu_check.py procedural-sync --out rows.jsonl
    python benchmarks/gpu_check.py table rows.jsonl

Every section appends one JSON object per measurement to ``--out`` (and writes a row with
``status`` "error: ..." when a measurement fails, so the table shows it), and is run by the
shell script in its own process under a time limit: one failure or hang never loses the others.
``--tiny`` shrinks every section to small models at 32 px on whatever device there is: a CPU
smoke run of this file (tests run it), not a measurement.

Throughput: one training step = forward (bf16 autocast) + cross-entropy + backward +
``torch.optim.SGD`` (momentum) step, on a fixed random batch, as benchmarks/train_throughput.py.
Ours: ``nfnet-f0`` and ``vit-b16`` at 224 px; timm: ``dm_nfnet_f0`` and ``vit_base_patch16_224``
(``timm.create_model``, same parameter counts). MFU = 3 x forward FLOPs per image (ours:
analytic; timm: ``torch.utils.flop_counter``; both 2 x MACs) x images/s / the bf16 matmul peak
that ``peak`` measured on this device (8192^3 bf16 matmuls), so the ratio is against what this
GPU really does, not a data sheet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timm_shim beside this file
import timm_shim  # noqa: E402

#: the goals of the GPU-readiness issue: (model, ours/timm images/s at least, MFU at least)
GOALS = {"nfnet-f0": (1.3, 0.40), "vit-b16": (1.0, 0.50)}
TIMM_NAMES = {"nfnet-f0": "dm_nfnet_f0", "vit-b16": "vit_base_patch16_224"}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(out: str, **row: Any) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def guarded(out: str, section: str, **labels: Any):
    """Run a measurement; on any failure write an error row for it and go on."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except Exception as e:  # noqa: BLE001 - the table must show the failure, the rest must run
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            emit(out, section=section, status=f"error: {msg}", **labels)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return guard()


# ------------------------------------------------------------------------------ peak


def measured_peak_flops(tiny: bool) -> tuple[float, str]:
    """Best FLOP/s of square bf16 matmuls (n = 8192; 512 with --tiny), over ~1 s of repeats. On a
    CPU the better of bf16 and fp32: without native bf16 (AVX2 only) a bf16 matmul is emulated and
    several times slower than the fp32 the models train in, which would put MFU above 100 %."""
    n = 512 if tiny else 8192
    dev = device()
    best = 0.0
    for dtype in (torch.bfloat16,) if dev.type == "cuda" else (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        reps = 2 if tiny else 20
        for _ in range(3 if tiny else 5):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return best, name


def cmd_peak(args: argparse.Namespace) -> None:
    with guarded(args.out, "peak"):
        flops, name = measured_peak_flops(args.tiny)
        emit(args.out, section="peak", status="ok", device=name, bf16_matmul_tflops=flops / 1e12,
             torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())


def read_peak(out: str) -> Optional[float]:
    for row in read_rows(out):
        if row.get("section") == "peak" and row.get("status") == "ok":
            return row["bf16_matmul_tflops"] * 1e12
    return None


# ------------------------------------------------------------------------------ throughput


def our_model(name: str, resolution: int) -> tuple[nn.Module, float]:
    from convscale.models import get_config

    kw = {"image_size": resolution} if name.startswith("vit") else {}
    cfg = get_config(name, num_classes=1000, **kw)
    return cfg.build(), float(cfg.forward_flops(resolution))


def timm_model(name: str, resolution: int, tiny: bool) -> tuple[nn.Module, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        timm = timm_shim.import_timm()
    if timm is None:
        raise RuntimeError(f"timm unavailable ({timm_shim.unavailable_reason()})")
    if tiny:  # the same timm classes at our tiny shapes
        from convscale.models import get_config

        if name.startswith("nfnet"):
            import dataclasses

            from timm.models.nfnet import NormFreeNet, model_cfgs

            c = get_config(name)
            tcfg = dataclasses.replace(model_cfgs["dm_nfnet_f0"], depths=c.depths, channels=c.widths,
                                       stem_chs=c.stem_widths[-1], num_features=c.final_width,
                                       group_size=max(1, round(c.group_width * c.width_mult)))
            model = NormFreeNet(tcfg, num_classes=1000)
        else:
            from timm.models.vision_transformer import VisionTransformer

            c = get_config(name, image_size=resolution)
            model = VisionTransformer(img_size=resolution, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                                      num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.width, num_classes=1000)
    else:
        model = timm.create_model(TIMM_NAMES[name], num_classes=1000)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)  # one image's forward, on the CPU before the move
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, resolution, resolution))
    model.train()
    return model, float(counter.get_total_flops())


def time_training(model: nn.Module, batch: int, resolution: int, channels_last: bool, compile_: bool,
                  steps: int, rounds: int) -> dict[str, float]:
    """Median images/s over ``rounds`` of ``steps`` steps, and peak memory, of one model."""
    dev = device()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt).train()
    step_model = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    x = torch.randn(batch, 3, resolution, resolution, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step() -> None:
        with amp:
            loss = nn.functional.cross_entropy(step_model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # compile, cudnn autotuning, allocator warm-up
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * batch / (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"images_per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
            "peak_memory_gib": peak, "warmup_seconds": warmup_s}


def configure() -> None:
    """What a convscale run sets on CUDA (train/loop.py configure_cuda)."""
    if torch.cuda.is_available():
        from convscale.train.loop import configure_cuda

        configure_cuda()


def cmd_throughput(args: argparse.Namespace) -> None:
    configure()
    name = {"nfnet": "nfnet-w0.125-d1.1.1", "vit": "vit-w32-d2-p4"}[args.family] if args.tiny else \
        {"nfnet": "nfnet-f0", "vit": "vit-b16"}[args.family]
    res = 32 if args.tiny else args.resolution
    batch = 8 if args.tiny else args.batch_size
    steps, rounds = (2, 2) if args.tiny else (args.steps, args.rounds)
    formats = args.formats or (["channels_last", "contiguous"] if args.family == "nfnet" else ["contiguous"])
    peak = read_peak(args.out)
    for impl, build in (("ours", lambda: our_model(name, res)), ("timm", lambda: timm_model(name, res, args.tiny))):
        for fmt in formats:
            labels = dict(model=name if impl == "ours" else (TIMM_NAMES.get(name, "timm:" + name)), impl=impl,
                          family=args.family, memory_format=fmt, compile=args.compile, batch=batch, resolution=res)
            with guarded(args.out, "throughput", **labels):
                torch.manual_seed(0)
                model, fwd_flops = build()
                r = time_training(model, batch, res, fmt == "channels_last", args.compile, steps, rounds)
                tflops = 3 * fwd_flops * r["images_per_second"] / 1e12
                emit(args.out, section="throughput", status="ok", **labels, **r, train_tflops=tflops,
                     mfu=tflops * 1e12 / peak if peak else None, forward_gflops=fwd_flops / 1e9)
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ F7+ largest micro-batch


def cmd_largest_batch(args: argparse.Namespace) -> None:
    """F7+ at 224 px with activation checkpointing and our SGD + AGC step (as the paper preset
    trains it): double the micro-batch from 8 until a step runs out of memory."""
    configure()
    from convscale.models import get_config
    from convscale.train.memory import enable_activation_checkpointing
    from convscale.train.optim import SGDAGC, parameter_groups

    name, res = ("nfnet-w0.125-d1.1.1", 32) if args.tiny else ("nfnet-f7+", args.resolution)
    dev = device()
    labels = dict(model=name, impl="ours", activation_checkpointing=True, resolution=res)
    with guarded(args.out, "largest-batch", **labels):
        torch.manual_seed(0)
        cfg = get_config(name, num_classes=1000)
        model = cfg.build().to(dev).train()
        blocks = enable_activation_checkpointing(model)
        opt = SGDAGC(parameter_groups(model, 1e-6, True, False), lr=1e-4)
        peak = read_peak(args.out)
        best: Optional[dict] = None
        batch = 2 if args.tiny else 8
        limit = 8 if args.tiny else 1024
        while batch <= limit:
            x = y = None
            try:
                x = torch.randn(batch, 3, res, res, device=dev)
                y = torch.randint(0, 1000, (batch,), device=dev)
                times = []
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(2 if args.tiny else 3):  # the first is warm-up
                    sync()
                    t = time.perf_counter()
                    with torch.autocast(dev.type, dtype=torch.bfloat16):
                        loss = nn.functional.cross_entropy(model(x).float(), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync()
                    times.append(time.perf_counter() - t)
                ips = batch / min(times[1:])
                tflops = 3 * cfg.forward_flops(res) * ips / 1e12
                best = dict(batch=batch, images_per_second=ips, train_tflops=tflops,
                            mfu=tflops * 1e12 / peak if peak else None,
                            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
                print(json.dumps(best), flush=True)
                batch *= 2
            except torch.OutOfMemoryError:
                break
            finally:
                del x, y
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if best is None:
            raise RuntimeError("not even the smallest micro-batch fits")
        emit(args.out, section="largest-batch", status="ok", **labels, checkpointed_blocks=blocks,
             out_of_memory_at=batch if batch <= limit else None, **best)


# ------------------------------------------------------------------------------ procedural without syncs


def cmd_procedural_sync(args: argparse.Namespace) -> None:
    """Render procedural training batches on the GPU with CUDA's sync debug mode set to "error":
    any host sync in the generator raises. (On the CPU: renders, nothing to check.)"""
    from convscale.data.config import DataConfig
    from convscale.data.feed import DeviceFeed
    from convscale.data.procedural import ProceduralSource

    dev = device()
    res, batch = (32, 8) if args.tiny else (224, 256)
    labels = dict(resolution=res, batch=batch, device=str(dev))
    with guarded(args.out, "procedural-sync", **labels):
        src = ProceduralSource(DataConfig(resolution=res, num_classes=1000, device=dev.type))
        feed = DeviceFeed(src.train_batches(batch, uint8=True), dev, src.normalize)
        next(feed)  # first batch: class tables sampled on the host (once per class), CUDA initialised
        sync()
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        t = time.perf_counter()
        n = 2 if args.tiny else 10
        try:
            for _ in range(n):
                x, y = next(feed)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        sync()
        emit(args.out, section="procedural-sync", status="ok", **labels,
             images_per_second=n * batch / (time.perf_counter() - t),
             checked=dev.type == "cuda", dtype=str(x.dtype), shape=list(x.shape))


# ------------------------------------------------------------------------------ table


def read_rows(path: str) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def cmd_table(args: argparse.Namespace) -> None:
    rows = read_rows(args.rows)
    lines = []
    head = ["section", "model", "impl", "format", "compile", "batch", "img/s", "ours/timm", "MFU", "peak GiB", "status"]
    peak = next((r for r in rows if r.get("section") == "peak" and r.get("status") == "ok"), None)
    timm_rate = {(r["family"], r["memory_format"], r["compile"]): r["images_per_second"]
                 for r in rows if r.get("section") == "throughput" and r.get("impl") == "timm" and r.get("status") == "ok"}
    best_timm = {}
    for (fam, _, comp), v in timm_rate.items():  # timm at its own best format, for the goals
        best_timm[(fam, comp)] = max(v, best_timm.get((fam, comp), 0.0))
    for r in rows:
        sec = r.get("section", "?")
        ratio = None
        if sec == "throughput" and r.get("impl") == "ours" and r.get("status") == "ok":
            ref = timm_rate.get((r["family"], r["memory_format"], r["compile"]))
            ratio = r["images_per_second"] / ref if ref else None
        model = r.get("model", r.get("device", ""))
        if sec == "peak" and r.get("status") == "ok":
            model = f"{r['device']}: bf16 matmul {r['bf16_matmul_tflops']:.0f} TFLOP/s"
        lines.append([sec, model, r.get("impl", ""), r.get("memory_format", ""), _fmt(r.get("compile", "")),
                      _fmt(r.get("batch")), _fmt(r.get("images_per_second"), ".1f"), _fmt(ratio, ".2f"),
                      "-" if r.get("mfu") is None else f"{r['mfu']:.1%}", _fmt(r.get("peak_memory_gib"), ".1f"),
                      r.get("status", "?")])
    for sec in args.expect:
        if not any(r.get("section") == sec for r in rows):
            lines.append([sec, "", "", "", "", "", "", "", "", "", "missing (timed out or crashed: see its log)"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    print()
    if peak is None:
        print("MFU: no measured peak (the peak section failed)")
    if any(str(r.get("model", "")).startswith("nfnet-w") for r in rows):
        print("tiny smoke run (--tiny): small models at 32 px; the goals below are not measured by it")
    for name, (want_ratio, want_mfu) in GOALS.items():
        fam = "nfnet" if name.startswith("nfnet") else "vit"
        ours = [r for r in rows if r.get("section") == "throughput" and r.get("impl") == "ours"
                and r.get("family") == fam and r.get("status") == "ok" and not r.get("model", "").startswith("nfnet-w")]
        if not ours:
            print(f"goal {name}: not measured")
            continue
        best = max(ours, key=lambda r: r["images_per_second"])
        ref = best_timm.get((fam, best["compile"]))
        ratio = best["images_per_second"] / ref if ref else None
        ok = ratio is not None and ratio >= want_ratio and best.get("mfu") is not None and best["mfu"] >= want_mfu
        print(f"goal {name}: >= {want_ratio}x timm at >= {want_mfu:.0%} MFU -> best ours {best['images_per_second']:.0f} img/s "
              f"({best['memory_format']}, compile={best['compile']}), {_fmt(ratio, '.2f')}x timm's best format, "
              f"MFU {'-' if best.get('mfu') is None else format(best['mfu'], '.1%')}: {'MET' if ok else 'NOT MET'}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {
        "peak": cmd_peak, "throughput": cmd_throughput, "largest-batch": cmd_largest_batch,
        "procedural-sync": cmd_procedural_sync, "table": cmd_table}
    for name in commands:
        s = sub.add_parser(name)
        if name == "table":
            s.add_argument("rows")
            s.add_argument("--expect", nargs="*", default=[], help="sections that should have rows")
            continue
        s.add_argument("--out", required=True, help="JSON-lines file the rows are appended to")
        s.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, 32 px")
        s.add_argument("--resolution", type=int, default=224)
        if name == "throughput":
            s.add_argument("--family", choices=["nfnet", "vit"], required=True)
            s.add_argument("--compile", action="store_true")
            s.add_argument("--formats", nargs="*", choices=["channels_last", "contiguous"], default=None)
            s.add_argument("--batch-size", type=int, default=128)
            s.add_argument("--steps", type=int, default=10)
            s.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
