"""Iterated-function-system (IFS) fractals: counter-based randomness, class systems, chaos-game rendering.

Every image is a pure function of ``(seed, split, index)``: all its random numbers come from a hash of
that key and a counter, never from a sequential generator, so an image is the same whatever batch,
batch size, process or worker renders it. Class systems are a pure function of ``(seed, class id)``.

Determinism across batch shapes also dictates the arithmetic: only elementwise ``+ - * /``, ``floor``,
comparisons, exact reductions (min/max, integer counts) and integer hashing. Transcendental functions
are avoided because ATen's vectorised and scalar-tail code paths may differ in the last bit, which
would make a pixel depend on the image's position in the batch; sin/cos are polynomials here instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # odd, < 2**31: x * _MUL stays exact in int64 for x < 2**32
_GOLD = 0x9E3779B1
_SPLITS = {"train": 0x1B873593, "heldout": 0x5BD1E995, "class": 0x27D4EB2F}

MAX_MAPS = 4
NUM_PARAMS = 6  # per map: t1, t2 (angles), s1, s2 (signed singular values), tx, ty
CHAIN_STEPS = 20  # chaos-game steps per chain; chains start on the attractor (a map's fixed point)
FILL_RESOLUTION = 32  # class acceptance is judged at this size, whatever the served resolution
MIN_FILL_FRACTION = 0.10  # reject class systems whose attractor covers less of the frame
MAX_CLASS_ATTEMPTS = 64
PIXEL_MEAN = 0.5  # of the [0, 1] pixel values this generator produces (measured, see tests)
PIXEL_STD = 0.28


def mix32_int(x: int) -> int:
    """The 32-bit integer hash of ``mix32`` on a Python int (for keys)."""
    x &= M32
    x ^= x >> 16
    x = (x * _MUL) & M32
    x ^= x >> 16
    x = (x * _MUL) & M32
    return x ^ (x >> 16)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash, elementwise on int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = x.mul_(_MUL).bitwise_and_(M32)
    x = x ^ (x >> 16)
    x = x.mul_(_MUL).bitwise_and_(M32)
    return x ^ (x >> 16)


def stream_key(seed: int, split: str) -> int:
    """32-bit key of one random stream (the seed's training images, held-out images, classes)."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    h = mix32_int(mix32_int(seed & M32) ^ _SPLITS[split])
    return mix32_int(h + (seed >> 32) * _GOLD)


def item_hashes(key: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-item 32-bit hashes of ``indices`` (int64 >= 0) within one stream; distinct for distinct
    indices below 2**32."""
    lo, hi = indices & M32, indices >> 32
    return mix32((mix32(lo ^ key) + hi * _GOLD) & M32)


def uniforms(base: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """``[n, count]`` floats in [0, 1): random numbers ``first .. first+count-1`` of each item."""
    counters = mix32(torch.arange(first, first + count, dtype=torch.int64, device=base.device))
    h = mix32(base[:, None] ^ counters[None, :])
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def normals(base: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Approximately standard normal ``[n, count]`` (Irwin-Hall sum of 4 uniforms): only adds."""
    u = uniforms(base, first, 4 * count).view(-1, count, 4)
    return (u.sum(-1) - 2.0) * math.sqrt(3.0)


def sincos(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos from Taylor polynomials after exact range reduction to [-pi, pi] (see module doc)."""
    t = theta - torch.round(theta / (2 * math.pi)) * (2 * math.pi)
    t2 = t * t
    s = torch.full_like(t, 1.0 / math.factorial(17))
    c = torch.full_like(t, 1.0 / math.factorial(18))
    for k in range(15, 0, -2):  # Horner in t**2 with alternating signs
        s = (1.0 / math.factorial(k)) - t2 * s
        c = (1.0 / math.factorial(k + 1)) - t2 * c
    return t * s, 1.0 - t2 * c


def maps_to_coefficients(params: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` (t1, t2, s1, s2, tx, ty) -> ``[..., 6]`` (a11, a12, a21, a22, b1, b2) of
    A = R(t1) diag(s1, s2) R(t2), b = (tx, ty)."""
    t1, t2, s1, s2, tx, ty = params.unbind(-1)
    sn1, c1 = sincos(t1)
    sn2, c2 = sincos(t2)
    a11 = c1 * s1 * c2 - sn1 * s2 * sn2
    a12 = -(c1 * s1 * sn2) - sn1 * s2 * c2
    a21 = sn1 * s1 * c2 + c1 * s2 * sn2
    a22 = c1 * s2 * c2 - sn1 * s1 * sn2
    return torch.stack([a11, a12, a21, a22, tx, ty], dim=-1)


def map_thresholds(params: torch.Tensor, num_maps: torch.Tensor) -> torch.Tensor:
    """``[n, 3]`` int64 16-bit thresholds: map k is chosen with probability proportional to
    |det A_k| = |s1 s2| (unused maps get probability 0)."""
    active = torch.arange(MAX_MAPS, device=params.device)[None, :] < num_maps[:, None]
    w = (params[..., 2] * params[..., 3]).abs() * active
    c0 = w[:, 0]
    c1 = c0 + w[:, 1]
    c2 = c1 + w[:, 2]
    total = c2 + w[:, 3]
    cum = torch.stack([c0, c1, c2], dim=1) / total[:, None]
    return torch.floor(cum * 65536.0).to(torch.int64)


def chaos_game(coef: torch.Tensor, thresholds: torch.Tensor, base: torch.Tensor, chains: int,
               first_counter: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on the attractors of ``n`` systems at once: ``x, y`` each ``[CHAIN_STEPS + 1, n, chains]``.

    ``chains`` independent chains per system each start on a random map's fixed point (which lies on
    the attractor, so no burn-in is wasted) and take ``CHAIN_STEPS`` random map applications.
    """
    n, device = coef.shape[0], coef.device
    steps = CHAIN_STEPS + 1
    half = (chains + 1) // 2
    counters = mix32(first_counter + torch.arange(steps * half, dtype=torch.int64, device=device))
    counters = counters.view(steps, 1, half)
    thr = thresholds.contiguous()
    bcol = base[:, None]

    def chosen_maps(t: int) -> torch.Tensor:
        # hashed per step so the working set stays in cache; 2 choices of 16 bits per hash
        h = mix32(bcol ^ counters[t])
        u16 = torch.cat([h & 0xFFFF, h >> 16], dim=1)[:, :chains]
        k = (u16 >= thr[:, 0:1]).to(torch.int64)  # index of the chosen map: thresholds <= u16
        return k.add_(u16 >= thr[:, 1:2]).add_(u16 >= thr[:, 2:3])

    a11, a12, a21, a22, b1, b2 = (coef[..., j].contiguous() for j in range(NUM_PARAMS))
    # fixed point of each map: (I - A) p = b
    d11, d22 = 1.0 - a11, 1.0 - a22
    det = d11 * d22 - a12 * a21
    fx = (d22 * b1 + a12 * b2) / det
    fy = (a21 * b1 + d11 * b2) / det
    xs = torch.empty(steps, n, chains, device=device)
    ys = torch.empty(steps, n, chains, device=device)
    k0 = chosen_maps(0)
    torch.gather(fx, 1, k0, out=xs[0])
    torch.gather(fy, 1, k0, out=ys[0])
    for t in range(1, steps):
        kt, x, y, xt, yt = chosen_maps(t), xs[t - 1], ys[t - 1], xs[t], ys[t]
        # gather on [n, 4] tables (2x faster than take); separate kernels, never a fused
        # multiply-add, so results are bitwise identical whatever the batch layout
        torch.mul(a11.gather(1, kt), x, out=xt)
        xt.add_(a12.gather(1, kt).mul_(y)).add_(b1.gather(1, kt))
        torch.mul(a21.gather(1, kt), x, out=yt)
        yt.add_(a22.gather(1, kt).mul_(y)).add_(b2.gather(1, kt))
    return xs, ys


def rasterize(xs: torch.Tensor, ys: torch.Tensor, scale: torch.Tensor, flip: torch.Tensor,
              shift: torch.Tensor, resolution: int) -> torch.Tensor:
    """Hit counts ``[n, R*R]`` of points fitted (aspect kept) into the frame: the attractor's
    bounding box spans ``scale`` of the half-width, is mirrored where ``flip`` and moved by
    ``shift`` ``[n, 2]`` (in half-widths)."""
    n = xs.shape[1]
    # reduce over steps first (contiguous, vectorised), then over chains; min/max are exact
    xmin, xmax = xs.amin(0).amin(1), xs.amax(0).amax(1)
    ymin, ymax = ys.amin(0).amin(1), ys.amax(0).amax(1)
    half = torch.maximum(xmax - xmin, ymax - ymin).clamp_min(1e-6) * 0.5
    alpha = scale / half * (resolution * 0.5)
    ax = torch.where(flip, -alpha, alpha)
    bx = (shift[:, 0] + 1.0) * (resolution * 0.5) - (xmin + xmax) * 0.5 * ax
    by = (shift[:, 1] + 1.0) * (resolution * 0.5) - (ymin + ymax) * 0.5 * alpha
    px = torch.floor(xs * ax[None, :, None] + bx[None, :, None]).clamp_(0, resolution - 1).to(torch.int64)
    py = torch.floor(ys * alpha[None, :, None] + by[None, :, None]).clamp_(0, resolution - 1).to(torch.int64)
    row = (torch.arange(n, device=xs.device) * resolution)[None, :, None]
    flat = ((py + row) * resolution + px).reshape(-1)
    return hit_counts(flat, n * resolution * resolution, sync_free=flat.device.type != "cpu").view(n, -1)


def hit_counts(flat: torch.Tensor, size: int, sync_free: bool) -> torch.Tensor:
    """How often each of ``size`` bins occurs in ``flat``. ``sync_free`` (on GPUs): a scatter-add
    into a buffer of the known size, because bincount sizes its output from the data (a
    device-to-host sync); integer sums are exact in any order, so the counts are bincount's."""
    if not sync_free:
        return torch.bincount(flat, minlength=size)
    counts = torch.zeros(size, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; CPU -> GPU through page-locked memory, so the host does not wait for
    the GPU's queue (a pageable copy would block until every queued kernel has run)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class ClassSystems:
    """The IFS of every class, sampled lazily and cached: a pure function of (seed, class id).

    A class has 2-4 maps A = R(t1) diag(s1, +-s2) R(t2), s1 ~ U(0.25, 0.85), |s2| = s1 U(0.15, 1),
    translation ~ U(-1, 1)^2; a system whose attractor covers < 10 % of a 32 px frame is redrawn
    (the next attempt of the same class key), which removes near-degenerate dust and line shapes.
    """

    def __init__(self, num_classes: int, seed: int):
        self.num_classes = num_classes
        self.key = stream_key(seed, "class")
        self.params = torch.zeros(num_classes, MAX_MAPS, NUM_PARAMS)
        self.num_maps = torch.zeros(num_classes, dtype=torch.int64)
        self.ready = torch.zeros(num_classes, dtype=torch.bool)

    def get(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(params [n, 4, 6], num_maps [n])`` of the given class ids (CPU tensors)."""
        classes = classes.cpu()
        todo = torch.unique(classes[~self.ready[classes]])
        if todo.numel():
            self._sample(todo)
        return self.params[classes], self.num_maps[classes]

    def _sample(self, classes: torch.Tensor) -> None:
        pending = classes
        for attempt in range(MAX_CLASS_ATTEMPTS):
            base = mix32(item_hashes(self.key, pending) ^ mix32_int(attempt))
            params, num_maps = self._draw(base)
            last = attempt == MAX_CLASS_ATTEMPTS - 1
            ok = self.fill_fraction(params, num_maps, base) >= MIN_FILL_FRACTION
            keep = torch.ones_like(ok) if last else ok
            self.params[pending[keep]] = params[keep]
            self.num_maps[pending[keep]] = num_maps[keep]
            self.ready[pending[keep]] = True
            pending = pending[~keep]
            if not pending.numel():
                return

    @staticmethod
    def _draw(base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = uniforms(base, 0, 1 + MAX_MAPS * NUM_PARAMS)
        num_maps = 2 + torch.floor(u[:, 0] * 3).to(torch.int64)
        u = u[:, 1:].view(-1, MAX_MAPS, NUM_PARAMS)
        t1 = (u[..., 0] * 2 - 1) * math.pi
        t2 = (u[..., 1] * 2 - 1) * math.pi
        s1 = 0.25 + 0.6 * u[..., 2]
        # one uniform gives both |s2|/s1 ~ U(0.15, 1) and the sign (a reflection or not)
        frac = (u[..., 3] * 2) - torch.floor(u[..., 3] * 2)
        s2 = s1 * (0.15 + 0.85 * frac) * torch.where(u[..., 3] < 0.5, -1.0, 1.0)
        tx, ty = u[..., 4] * 2 - 1, u[..., 5] * 2 - 1
        return torch.stack([t1, t2, s1, s2, tx, ty], dim=-1), num_maps

    @staticmethod
    def fill_fraction(params: torch.Tensor, num_maps: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Share of a 32 px frame that the (unperturbed, centred, full-size) attractor covers."""
        n = params.shape[0]
        coef = maps_to_coefficients(params)
        xs, ys = chaos_game(coef, map_thresholds(params, num_maps), base, chains=96)
        ones = torch.ones(n)
        counts = rasterize(xs, ys, ones, torch.zeros(n, dtype=torch.bool), torch.zeros(n, 2), FILL_RESOLUTION)
        return (counts > 0).sum(1).to(torch.float32) / FILL_RESOLUTION**2


def points_per_image(resolution: int) -> int:
    """Chaos-game points per image: 1920 at 32 px and the same density (1.9 per pixel) below it,
    about one per pixel above. Below 32 px a fixed 1920 points would cost 4x the rendering work
    at 16 px for the same picture, and make the generator slower than the demo models train."""
    same_density = round(1920 * min(1.0, (resolution / 32) ** 2))
    return max(resolution * resolution, same_density)


def render_uint8(systems: ClassSystems, key: int, indices: torch.Tensor, labels: torch.Tensor,
                 resolution: int, noise: float, device: torch.device,
                 points: Optional[int] = None) -> torch.Tensor:
    """uint8 ``[n, 3, R, R]`` images of class ``labels`` for item ``indices`` of stream ``key``.

    Instance variation (all from the item's own hash): every map parameter perturbed (angles
    sigma 0.15 rad, singular values x(1 + 0.08 z), translations sigma 0.12, all times ``noise``),
    a random rotation, size 0.64-0.85 of the frame, a horizontal flip, a shift of up to 0.12,
    and random foreground/background colours at least 0.3 apart in every channel.
    """
    n = indices.numel()
    params, num_maps = systems.get(labels)
    params, num_maps = to_device(params, device), to_device(num_maps, device)
    base = item_hashes(key, to_device(indices, device))
    z = normals(base, 0, MAX_MAPS * NUM_PARAMS).view(n, MAX_MAPS, NUM_PARAMS)
    sigma = to_device(torch.tensor([0.15, 0.15, 0.08, 0.08, 0.12, 0.12]) * noise, device)
    u = uniforms(base, 1 << 12, 12)
    theta = (u[:, 0] * 2 - 1) * math.pi
    p = params + z * sigma
    t1, t2, s1, s2, tx, ty = p.unbind(-1)
    s1 = params[..., 2] * (1 + z[..., 2] * sigma[2])
    s2 = params[..., 3] * (1 + z[..., 3] * sigma[3])
    # keep every map contractive (singular values < 0.9) so the chaos game stays bounded
    s1 = s1.clamp(0.05, 0.9)
    s2 = torch.where(s2 < 0, s2.clamp(-0.9, -0.02), s2.clamp(0.02, 0.9))
    # conjugating every map by the instance rotation R(theta) rotates the attractor
    sn, cs = sincos(theta)
    sn, cs = sn[:, None], cs[:, None]
    rx, ry = cs * tx - sn * ty, sn * tx + cs * ty
    th = theta[:, None]
    p = torch.stack([t1 + th, t2 - th, s1, s2, rx, ry], dim=-1)
    coef = maps_to_coefficients(p)
    pts = points or points_per_image(resolution)
    chains = -(-pts // (CHAIN_STEPS + 1))
    xs, ys = chaos_game(coef, map_thresholds(p, num_maps), base, chains)
    scale = 0.64 + 0.21 * u[:, 1]
    flip = u[:, 2] < 0.5
    shift = (u[:, 3:5] * 2 - 1) * 0.12
    counts = rasterize(xs, ys, scale, flip, shift, resolution).to(torch.float32)
    # graded density: a pixel hit once is faint, a dense one saturates
    tau = max(0.5, 0.25 * xs.numel() / n / resolution**2)
    v = counts / (counts + tau)
    bg = u[:, 5:8]
    off = bg + 0.3 + 0.4 * u[:, 8:11]
    fg = off - torch.floor(off)
    img = bg[:, :, None] + (fg - bg)[:, :, None] * v[:, None, :]
    return torch.floor(img * 255.0 + 0.5).to(torch.uint8).view(n, 3, resolution, resolution)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 with roughly zero mean and unit std (shared by cache and generator)."""
    return (images_uint8.to(torch.float32) * (1.0 / 255.0) - PIXEL_MEAN) * (1.0 / PIXEL_STD)
