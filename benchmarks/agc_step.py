"""SGD + Nesterov + AGC optimizer step: convscale's ``SGDAGC`` against a per-tensor reference.

    python benchmarks/agc_step.py --model nfnet-f0 --threads 2 --steps 5

Three implementations of the same update, timed in alternating rounds in one process:
  * ``ours``: ``convscale.train.optim.SGDAGC`` (per-tensor unit norms, one vectorised clip, foreach SGD);
  * ``reference``: AGC with one ``torch.linalg.vector_norm`` per tensor and ``torch.where``, then
    torch's own ``torch.optim.SGD(foreach=True, nesterov=True)`` on the same parameter groups;
  * ``unit-views``: the AGC that convscale used before (every output unit a separate view
    through ``unbind``, ~0.5M tensors for F7), kept here only to show what changed.
Before timing, ours and the reference take three steps in float64 from the same state and must
agree to 1e-12 (``tests/test_train.py`` runs the same check on a tiny model). Prints images-free
step times (ms, median of rounds) and the ratios ours/reference and unit-views/ours.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from convscale.models import get_config
from convscale.train.optim import GRAD_NORM_FLOOR, SGDAGC, parameter_groups, set_lr


def reference_agc_(params: list[torch.Tensor], grads: list[torch.Tensor], clip: float, eps: float) -> None:
    """Unit-wise AGC, one tensor at a time (the plain reading of Brock et al. 2021, §4)."""
    for p, g in zip(params, grads):
        dims = tuple(range(1, p.ndim)) if p.ndim >= 2 else None
        p_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=p.ndim >= 2).clamp_min(eps)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=p.ndim >= 2)
        max_norm = p_norm * clip
        g.copy_(torch.where(g_norm > max_norm, g * (max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR)), g))


class ReferenceSGDAGC:
    """The reference update: ``reference_agc_`` on the AGC groups, then torch's foreach SGD."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, momentum: float,
                 agc_clip: float, agc_eps: float, exempt_scalar_gains: bool):
        groups = parameter_groups(model, weight_decay, True, exempt_scalar_gains)
        self.agc_groups = [g["params"] for g in groups if g["agc"]]
        self.clip, self.eps = agc_clip, agc_eps
        self.sgd = torch.optim.SGD([{"params": g["params"], "weight_decay": g["weight_decay"],
                                     "lr_scale": g["lr_scale"]} for g in groups],
                                   lr=lr, momentum=momentum, nesterov=True, foreach=True)

    def step(self) -> None:
        with torch.no_grad():
            for params in self.agc_groups:
                reference_agc_(params, [p.grad for p in params], self.clip, self.eps)
        self.sgd.step()


def unit_views_agc_(params: list[torch.Tensor], grads: list[torch.Tensor], clip: float, eps: float) -> None:
    """convscale's AGC before it was rewritten: one view per output unit."""
    views = lambda ts: [u for t in ts for u in (t.unbind(0) if t.ndim >= 2 else (t,))]  # noqa: E731
    counts = [p.shape[0] if p.ndim >= 2 else 1 for p in params]
    p_norm = torch.stack(torch._foreach_norm(views(params))).clamp_min_(eps).mul_(clip)
    g_norm = torch.stack(torch._foreach_norm(views(grads)))
    scale = torch.where(g_norm > p_norm, p_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
    scales = [s.view((c,) + (1,) * (g.ndim - 1)) if g.ndim >= 2 else s.view([1] * g.ndim)
              for s, c, g in zip(scale.split(counts), counts, grads)]
    torch._foreach_mul_(grads, scales)


class UnitViewsSGDAGC(ReferenceSGDAGC):
    def step(self) -> None:
        with torch.no_grad():
            for params in self.agc_groups:
                unit_views_agc_(params, [p.grad for p in params], self.clip, self.eps)
        self.sgd.step()


def build(kind: str, model: nn.Module, args: argparse.Namespace):
    kw = dict(lr=args.lr, momentum=0.9, agc_clip=args.agc_clip, agc_eps=1e-3)
    if kind == "ours":
        groups = parameter_groups(model, args.weight_decay, True, args.exempt_scalar_gains)
        return SGDAGC(groups, nesterov=True, **kw)
    cls = ReferenceSGDAGC if kind == "reference" else UnitViewsSGDAGC
    return cls(model, weight_decay=args.weight_decay, exempt_scalar_gains=args.exempt_scalar_gains, **kw)


def set_grads(model: nn.Module, seed: int) -> None:
    """Gradients of a size that clips some units and leaves others (0.1-10 x lambda |W|)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        scale = 10 ** (torch.rand((), generator=g).item() * 2 - 1) * 0.02 * p.detach().abs().mean().clamp_min(1e-3)
        p.grad = (noise * scale).contiguous(memory_format=torch.channels_last) if p.ndim == 4 else noise * scale


def step_with(opt, lr: float) -> None:
    set_lr(opt.sgd if hasattr(opt, "sgd") else opt, lr)
    opt.step()


def max_difference(args: argparse.Namespace, model: nn.Module, steps: int = 3) -> float:
    """Largest |ours - reference| over parameters after ``steps`` float64 steps from one state."""
    base = copy.deepcopy(model).double()
    models = {k: copy.deepcopy(base) for k in ("ours", "reference")}
    opts = {k: build(k, m, args) for k, m in models.items()}
    for s in range(steps):
        for k, m in models.items():
            set_grads(m, seed=100 + s)
            step_with(opts[k], args.lr * (1 + s))
    return max((a - b).abs().max().item()
               for a, b in zip(models["ours"].parameters(), models["reference"].parameters()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nfnet-f0")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=2e-5)
    p.add_argument("--agc-clip", type=float, default=0.01)
    p.add_argument("--exempt-scalar-gains", action="store_true")
    p.add_argument("--no-unit-views", action="store_true", help="skip the old implementation (slow for F7)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = get_config(args.model, num_classes=1000).build()
    tensors = sum(1 for _ in model.parameters())
    units = sum(q.shape[0] if q.ndim >= 2 else 1 for q in model.parameters())
    diff = max_difference(args, model)
    print(f"# {args.model}: {tensors} tensors, {units} AGC units; float64 |ours - reference| after 3 steps: {diff:.3g}")
    if diff > 1e-12:
        raise SystemExit(f"ours and the reference disagree by {diff:.3g} (> 1e-12)")
    kinds = ["ours", "reference"] + ([] if args.no_unit_views else ["unit-views"])
    models = {k: copy.deepcopy(model).to(device).to(memory_format=torch.channels_last) for k in kinds}
    opts = {k: build(k, m, args) for k, m in models.items()}
    for k, m in models.items():
        set_grads(m, seed=1)
        step_with(opts[k], args.lr)  # warm-up: momentum buffers allocated
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step_with(opts[k], args.lr)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t) / args.steps * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    print(f"# device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps} steps, median ms per optimizer step")
    print("implementation,ms_per_step,min,max")
    for k in kinds:
        print(f"{k},{ms[k]:.1f},{min(times[k]):.1f},{max(times[k]):.1f}")
    print(f"ratio reference/ours = {ms['reference'] / ms['ours']:.2f} (> 1: ours faster)")
    if "unit-views" in ms:
        print(f"ratio unit-views/ours = {ms['unit-views'] / ms['ours']:.2f}")


if __name__ == "__main__":
    main()
