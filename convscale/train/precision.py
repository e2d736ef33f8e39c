"""``precision = "auto"``: bf16 autocast where the device computes bf16 natively, else fp32.

bf16 autocast pays on CUDA GPUs with bf16 and on CPUs with avx512_bf16 or AMX (measured ~1.5-1.9x
faster than fp32 there); on a CPU with AVX2 only it is ~4.5x *slower* (emulated conversions). A
study resolves "auto" once, when it is planned, and records the result in every cell, so all cells
of a study share their numerics whichever machine later runs them.
"""

from __future__ import annotations

from functools import lru_cache

AUTO = "auto"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` among its flags)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu" | "cuda") computes bf16 natively on this machine."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def resolve_precision(precision: str, device_type: str) -> str:
    """"bf16" or "fp32": ``precision`` itself unless it is "auto"."""
    if precision != AUTO:
        return precision
    return "bf16" if native_bf16(device_type) else "fp32"
