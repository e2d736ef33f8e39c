"""ViT position embeddings: fixed 2-D sin-cos tables and resampling of learned ones.

A ViT's learned position embedding is a ``(1, num_prefix_tokens + gh * gw, width)`` tensor whose
patch part lies on the ``gh x gw`` patch grid (row-major, as ``Conv2d(...).flatten(2)`` orders
patches). Running at another resolution, or fine-tuning a checkpoint at a higher one, needs that
grid resampled; prefix tokens (the class token) have no grid position and are kept as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SINCOS_TEMPERATURE = 10_000.0


def posemb_sincos_2d(
    grid: tuple[int, int],
    width: int,
    temperature: float = SINCOS_TEMPERATURE,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2-D sin-cos embedding of shape ``(1, gh * gw, width)`` (MoCo v3 / big_vision layout).

    Channels are ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``w_k = temperature ** -(k / (width/4 - 1))``,
    ``k = 0 .. width/4 - 1``, x the column and y the row of the patch.
    """
    if width % 4 != 0 or width < 8:
        raise ValueError(f"sin-cos position embeddings need width a multiple of 4 and >= 8, got {width}")
    gh, gw = grid
    quarter = width // 4
    # Computed in float64 and cast once: the table is a constant, so precision costs nothing.
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1))
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    xo = x.reshape(-1, 1) * omega[None, :]
    yo = y.reshape(-1, 1) * omega[None, :]
    pe = torch.cat([xo.sin(), xo.cos(), yo.sin(), yo.cos()], dim=1)
    return pe[None].to(device=device, dtype=dtype)


def square_grid(num_patches: int) -> tuple[int, int]:
    """The ``(g, g)`` grid holding ``num_patches`` tokens; ValueError if not a square number."""
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"cannot infer a square patch grid from {num_patches} position embeddings; pass old_grid")
    return g, g


def resample_pos_embed(
    posemb: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
) -> Tensor:
    """Resample a learned position embedding ``(1, prefix + gh*gw, C)`` to ``new_grid``.

    The first ``num_prefix_tokens`` rows (class token) are kept unchanged; the patch rows are
    interpolated on their 2-D grid (``mode`` "bicubic" or "bilinear", ``align_corners=False``).
    ``old_grid`` defaults to the square grid holding the patch rows. Same grid in, same tensor out.
    """
    if posemb.ndim != 3:
        raise ValueError(f"expected a (1, tokens, width) position embedding, got shape {tuple(posemb.shape)}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    gh0, gw0 = old_grid if old_grid is not None else square_grid(patches.shape[1])
    if gh0 * gw0 != patches.shape[1]:
        raise ValueError(f"old_grid {old_grid} does not hold {patches.shape[1]} patch embeddings")
    gh1, gw1 = int(new_grid[0]), int(new_grid[1])
    if (gh0, gw0) == (gh1, gw1):
        return posemb
    n, _, c = patches.shape
    # Interpolate in float32: bicubic is not implemented for every low-precision dtype on CPU.
    img = patches.float().reshape(n, gh0, gw0, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(gh1, gw1), mode=mode, align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(n, gh1 * gw1, c).to(posemb.dtype)
    return torch.cat([prefix, patches], dim=1)
